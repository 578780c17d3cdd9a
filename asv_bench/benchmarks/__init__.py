"""asv benchmarks for ot_agnostic (run from asv_bench/, see asv_bench/README.md).

The suite measures the ``ot_agnostic`` of the checkout it lives in: the repository root goes
first on ``sys.path`` here, before any benchmark module imports the package. (asv drops
``PYTHONPATH`` from the benchmark processes, and an ``existing`` environment may hold an
install of another tree.) ``OT_ASV_INSTALLED=1`` benchmarks the installed package instead.
"""

import os
import sys

if os.environ.get("OT_ASV_INSTALLED", "0") in ("", "0"):
    _ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(_ROOT, "ot_agnostic", "__init__.py")):
        sys.path.insert(0, _ROOT)
    del _ROOT
