"""Tests of the Numba CUDA kernels and plugin on Numba's CUDA simulator: no GPU needed.

Numba reads ``NUMBA_ENABLE_CUDASIM`` when it is first imported, so these tests run in a
process of their own::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim

(``scripts/test.sh`` does so after the main suite, whose ``tests/conftest.py`` leaves this
folder out unless the variable is set). Without the simulator, every test here is skipped.

The simulator runs each CUDA thread as a Python thread, so blocks are shrunk to
``ROWS_PER_BLOCK = 8`` rows (and tiles to 8 columns) and problems to a few dozen points.
Its block scheduler polls those threads while they wait at ``syncthreads``: a GIL switch
interval of 0.1 ms (instead of 5 ms) makes the kernels run about 7 times faster.

The simulator (numba 0.68) allocates a block's shared arrays with an unguarded
check-then-insert (``FakeCUDAShared.array``): two threads that switch between the two can
each get an array of their own, and then read a tile that nobody wrote (NaN or a wrong
softmin, now and then; more often with short switch intervals). ``shared_arrays_locked``
replaces it by the same logic under a lock; real GPUs are not concerned.
"""

from __future__ import annotations

import sys
import threading

import pytest
from numba.core import config

SIMULATOR = bool(config.ENABLE_CUDASIM)
#: Rows per block (and columns per tile) under the simulator.
ROWS = 8


def pytest_collection_modifyitems(config, items):
    if SIMULATOR:
        return
    skip = pytest.mark.skip(reason="needs Numba's CUDA simulator: set NUMBA_ENABLE_CUDASIM=1")
    for item in items:
        if "cuda_sim" in item.path.parts:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def shared_arrays_locked():
    """One shared array per block and call site, whichever thread of the block asks first."""
    if not SIMULATOR:
        yield
        return
    import numpy as np
    from numba.cuda.simulator import kernelapi
    from numba.core import types
    from numba.np import numpy_support

    lock = threading.Lock()
    unguarded = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype):
        if shape == 0:  # dynamic shared memory: one buffer, no allocation race
            return unguarded(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)  # as the simulator keys them
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array
    yield
    kernelapi.FakeCUDAShared.array = unguarded


@pytest.fixture(autouse=True, scope="session")
def fast_thread_switches():
    """Let the simulator's block scheduler see its threads reach ``syncthreads`` sooner."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(before)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of ``ROWS`` threads: the simulator's cost grows with the threads per block."""
    from ot_agnostic.kernels import numba_cuda

    monkeypatch.setattr(numba_cuda, "ROWS_PER_BLOCK", ROWS)
