"""Importing ot_agnostic (and computing on NumPy arrays) must not import any heavy framework.

Each check runs in a fresh interpreter (``sys.executable -c``) so that modules imported by
other tests (torch, geomloss, ...) do not leak into ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


FORBIDDEN = ["torch", "cupy", "pykeops", "jax", "sklearn", "numba.cuda"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = textwrap.dedent(
    f"""
    import json, sys
    FORBIDDEN = {FORBIDDEN!r}

    def loaded():
        return sorted(name for name in FORBIDDEN if name in sys.modules)
    """
)


def run_python(code: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_check_itself_detects_an_imported_module():
    """Guard against a vacuous test: a module registered in sys.modules is seen by the check."""
    out = run_python(
        """
        import types
        sys.modules["numba.cuda"] = types.ModuleType("numba.cuda")
        print(json.dumps({"loaded": loaded()}))
        """
    )
    assert out["loaded"] == ["numba.cuda"]


def test_import_loads_no_framework():
    out = run_python(
        """
        import ot_agnostic
        print(json.dumps({"loaded": loaded(), "file": ot_agnostic.__file__}))
        """
    )
    assert out["file"].startswith(os.path.join(ROOT, "ot_agnostic"))
    assert out["loaded"] == []


def test_computing_on_numpy_loads_no_framework():
    out = run_python(
        """
        import numpy as np
        import ot_agnostic

        rng = np.random.default_rng(0)
        x, y = rng.random((20, 2)), rng.random((15, 2))
        values = [
            float(ot_agnostic.sinkhorn_divergence(x, y, blur=0.1)),
            float(ot_agnostic.sinkhorn_divergence(x, y, blur=0.1, backend="online")),
            float(ot_agnostic.sinkhorn_divergence(x, y, blur=0.1, backend="tensorized")),
            float(ot_agnostic.sinkhorn_divergence(x, y, p=1, blur=0.1, reach=0.5)),
            float(ot_agnostic.energy_distance(x, y)),
            float(ot_agnostic.hausdorff_divergence(x, y)),
        ]
        print(json.dumps({"loaded": loaded(), "values": values}))
        """
    )
    assert out["loaded"] == []
    assert len(out["values"]) == 6 and all(v == v and v > 0 for v in out["values"])
