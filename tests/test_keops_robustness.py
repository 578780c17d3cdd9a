"""The KeOps plugin on edge cases: a single point on either side, and calls from several threads.

Single points: pykeops reads a ``(B, 1, 1, D)`` tensor as a parameter rather than a variable,
so ``N = 1`` or ``M = 1`` used to crash (or change the formula). Every loss, its autograd
gradients and ``value_and_grad`` are compared with the dense Array API path
(``backend="tensorized"``) on the same data.

Threads: pykeops keeps one shared object per compiled formula and stores a call's pointers
on it, so concurrent calls used to return wrong values (no error). Several threads run
different problems at once and every result must equal the single-threaded one.

Every problem is float64 with ``D = 3``: the KeOps formulas are those that
``tests/test_keops_plugin.py`` compiles too (nothing new to compile, see ``KEOPS_CACHE_FOLDER``).
"""

from __future__ import annotations

import sys
import threading

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("pykeops", reason="pykeops is not installed")

import ot_agnostic as ota  # noqa: E402
from tests.helpers import skip_unless_keops_works  # noqa: E402
from ot_agnostic.backends.keops import load_kernels  # noqa: E402

D = 3

# float64, KeOps against dense torch: the two paths sum the N x M terms in different orders,
# so they differ by rounding only, amplified a little by the Sinkhorn iterations (measured:
# <= 2e-14 relative). 1e-9 leaves a wide margin; a variable read as a parameter (the single-
# point bug) or a result from another thread's problem is off by O(1).
RTOL = 1e-9

# Same library, same data, same formulas, single- or multi-threaded: KeOps' CPU reductions
# are deterministic (each row is summed in the same order), measured bit for bit equal. The
# tolerance only absorbs a rounding difference should a torch op pick another kernel; a
# mix-up between threads was measured at up to 340 % off.
THREAD_RTOL = 1e-12


@pytest.fixture(scope="module", autouse=True)
def keops_works():
    """Skip the module (with the reason) when KeOps cannot compile or run here."""
    skip_unless_keops_works(D)


def _data(N, M, batch=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)

    def rand(*s):
        return torch.rand(*shape, *s, generator=gen, dtype=torch.float64)

    x, y = rand(N, D), rand(M, D) + 0.2
    a, b = rand(N) + 0.1, rand(M) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def _assert_close(mine, ref, rtol=RTOL):
    mine, ref = mine.detach(), ref.detach()
    assert mine.shape == ref.shape and mine.dtype == ref.dtype
    # relative to the largest entry (a floor for all-zero references)
    scale = max(float(ref.abs().max()), 1e-6)
    assert float((mine - ref).abs().max()) <= rtol * scale, (mine, ref)


def _value_and_autograd(loss, data, backend, kw):
    leaves = [t.clone().requires_grad_(True) for t in data]
    value = loss(*leaves, backend=backend, **kw)
    value.sum().backward()
    return value, [leaf.grad for leaf in leaves]


# ----------------------------------------------------------------------------------------
# A single point on either side
# ----------------------------------------------------------------------------------------

SHAPES = [  # (N, M, batch)
    (1, 20, None), (20, 1, None), (1, 1, None),
    (1, 20, 2), (20, 1, 2), (1, 1, 2),
]

LOSSES = [
    (ota.sinkhorn_divergence, {"p": 1, "blur": 0.1}),
    (ota.sinkhorn_divergence, {"p": 2, "blur": 0.1}),
    (ota.sinkhorn_divergence, {"p": 1, "blur": 0.1, "reach": 0.5}),
    (ota.sinkhorn_divergence, {"p": 2, "blur": 0.1, "reach": 0.5}),
    (ota.energy_distance, {}),
    (ota.gaussian_mmd, {"blur": 0.3}),
    (ota.laplacian_mmd, {"blur": 0.3}),
    (ota.hausdorff_divergence, {"p": 1, "blur": 0.1}),
    (ota.hausdorff_divergence, {"p": 2, "blur": 0.1}),
]


def _loss_id(case):
    loss, kw = case
    return loss.__name__ + "".join(f"-{k}{v}" for k, v in kw.items())


@pytest.mark.parametrize("N, M, batch", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("case", LOSSES, ids=_loss_id)
def test_single_points_match_tensorized(N, M, batch, case):
    loss, kw = case
    data = _data(N, M, batch)
    fast, fast_grads = _value_and_autograd(loss, data, "keops", kw)
    ref, ref_grads = _value_and_autograd(loss, data, "tensorized", kw)
    assert fast.shape == (() if batch is None else (batch,))
    _assert_close(fast, ref)
    for mine, expected in zip(fast_grads, ref_grads):
        _assert_close(mine, expected)


@pytest.mark.parametrize("N, M", [(1, 20), (20, 1), (1, 1)])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_single_points_value_and_grad_match_tensorized(N, M, reach):
    """The autograd-free gradients (envelope theorem: ``softmin_grad`` reductions)."""
    data = _data(N, M, seed=1)
    kw = dict(p=2, blur=0.1, reach=reach)
    fast, fast_grads = ota.value_and_grad(*data, backend="keops", **kw)
    ref, ref_grads = ota.value_and_grad(*data, backend="tensorized", **kw)
    _assert_close(fast, ref)
    for name in ("x", "y", "a", "b"):
        _assert_close(getattr(fast_grads, name), getattr(ref_grads, name))


def test_one_point_against_many_on_the_default_backend():
    """The report: ``backend="auto"`` picked KeOps at this size and used to raise IndexError
    (KeOps now runs when asked, or on CUDA tensors)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(3000, 3, generator=gen, dtype=torch.float64)
    fast = ota.sinkhorn(x, y, backend="keops")
    assert fast.backend == "keops/online"
    _assert_close(fast.value, ota.sinkhorn_divergence(x, y, backend="tensorized"))


# ----------------------------------------------------------------------------------------
# Several threads at once
# ----------------------------------------------------------------------------------------

# Different sizes and blurs, so that a result computed (partly) on another thread's data shows.
PROBLEMS = [(_data(30 + 11 * k, 41 + 7 * k, seed=10 + k), 0.05 + 0.05 * k) for k in range(4)]
THREADS, CALLS = 4, 10


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every 10 microseconds (Python's default: 5 ms), so that a race shows."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


def _run_threads(work):
    """``work(thread, call)`` for ``CALLS`` calls on each of ``THREADS`` threads started together;
    re-raises the first exception in a thread."""
    barrier, errors = threading.Barrier(THREADS), []

    def run(thread):
        try:
            barrier.wait()
            for call in range(CALLS):
                work(thread, call)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _divergence(k, grad):
    (x, y, a, b), blur = PROBLEMS[k]
    x = x.clone().requires_grad_(grad)
    value = ota.sinkhorn_divergence(x, y, a, b, p=2, blur=blur, backend="keops")
    if grad:
        value.backward()
        return value.detach(), x.grad
    return value, None


def test_concurrent_divergences_and_backward_match_single_threaded(frequent_thread_switches):
    expected = [_divergence(k, grad=True) for k in range(len(PROBLEMS))]
    wrong = []

    def work(thread, call):
        k = (thread + call) % len(PROBLEMS)  # the threads run different problems at once
        grad = call % 2 == 1  # forward only, or forward and backward (KeOps reductions too)
        value, x_grad = _divergence(k, grad)
        ref_value, ref_grad = expected[k]
        def close(got, ref):
            return float((got - ref).abs().max()) <= THREAD_RTOL * float(ref.abs().max())

        value_ok = close(value, ref_value)
        grad_ok = not grad or close(x_grad, ref_grad)
        if not (value_ok and grad_ok):
            wrong.append((k, "backward" if grad else "forward", float(value), float(ref_value)))

    _run_threads(work)
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} concurrent calls are off: {wrong[:5]}"


def test_concurrent_pykeops_reductions_outside_ot_agnostic_match(frequent_thread_switches):
    """A pykeops reduction that this module does not call itself (pykeops' own autograd runs
    them in a backward pass, a user may run them too) holds the same lock: built here on the
    formula of the ``p = 2`` softmin, reduced by ``LazyTensor.logsumexp`` directly."""
    kernels = load_kernels()

    def lse(k):
        (x, y, _, b), blur = PROBLEMS[k]
        cost, _ = kernels._cost(x[None], y[None], 2)
        lazy = kernels._cols(b.log()[None]) - cost * kernels._param(1.0 / blur**2, x)
        return lazy.logsumexp(dim=2)[0, :, 0]  # no ot_agnostic lock taken here

    expected = [lse(k) for k in range(len(PROBLEMS))]
    wrong = []

    def work(thread, call):
        k = (thread + call) % len(PROBLEMS)
        got = lse(k)
        if not float((got - expected[k]).abs().max()) <= THREAD_RTOL * float(expected[k].abs().max()):
            wrong.append(k)

    _run_threads(work)
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} concurrent reductions differ"
