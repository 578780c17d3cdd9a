"""Root pytest configuration: skip doctest collection of modules whose framework is missing."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torch") else ["ot_agnostic/torch.py"]
if not importlib.util.find_spec("sklearn"):
    collect_ignore.append("ot_agnostic/transformer.py")
