"""Progress reports (``ot_agnostic/_progress.py``): ``progress=`` callbacks and ``verbose=True`` bars."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import ot_agnostic as ota


def _clouds(batch=None, n=200):
    rng = np.random.default_rng(0)
    shape = () if batch is None else (batch,)
    return rng.random((*shape, n, 2)), rng.random((*shape, n - 20, 2)) + 0.1


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
@pytest.mark.parametrize("batch", [None, 3])
def test_callback_counts_every_step_up_to_the_total(backend, batch):
    x, y = _clouds(batch)
    calls = []
    res = ota.sinkhorn(x, y, backend=backend, cluster_scale=0.1, tol=None,
                       progress=lambda d, t: calls.append((d, t)))
    items = 1 if batch is None or backend != "multiscale" else batch
    total = items * (len(res.eps_schedule) + 1)  # eps-scaling steps and the final one (per multiscale item)
    assert calls == [(k, total) for k in range(1, total + 1)]


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
@pytest.mark.parametrize("batch", [None, 3])
def test_callback_while_refining_to_tol(backend, batch):
    """With tol, the total grows as refinement runs (its updates are unknown in advance):
    ``done`` never decreases, never exceeds the total, and ends equal to it."""
    x, y = _clouds(batch)
    calls = []
    ota.sinkhorn(x, y, backend=backend, cluster_scale=0.1, blur=0.02, tol=1e-6,
                 progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and all(d <= t for d, t in calls)
    assert calls[-1][0] == calls[-1][1] > len(calls) // 2


def test_no_report_by_default(capsys):
    x, y = _clouds()
    ota.sinkhorn_divergence(x, y)
    assert capsys.readouterr().err == ""


def test_verbose_draws_a_bar_on_stderr(capsys):
    pytest.importorskip("tqdm")
    x, y = _clouds()
    value = ota.sinkhorn_divergence(x, y, verbose=True)
    err = capsys.readouterr().err
    assert "sinkhorn (numba/online)" in err and "100%" in err
    # The bar does not change the numbers; two runs of Numba's parallel kernels may still
    # sum in another order: float64 rounding, 1e-12 relative.
    assert float(value) == pytest.approx(float(ota.sinkhorn_divergence(x, y)), rel=1e-12)


def test_bad_callback_and_missing_tqdm(monkeypatch):
    x, y = _clouds()
    with pytest.raises(TypeError, match="progress must be a function"):
        ota.sinkhorn(x, y, progress=3)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        ota.sinkhorn(x, y, verbose=True)
