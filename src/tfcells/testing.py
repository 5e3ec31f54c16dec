"""Introspection for tests: how often each piece of gradient work ran in the kernels."""

import ctypes

from . import _tfcells_core
from ._loader import c_library, gpu_c_library

# The counters' names, in the order the libraries write them (csrc/core/plan.h, kCounterNames).
_COUNTER_NAMES = _tfcells_core.WORK_COUNTERS


def work_counters():
    """Process-wide counts since start-up (CPU and GPU kernels together): forward and backward
    op runs, how often each gradient (dx, dh0, dkernel, drecurrent_kernel, dbias) was actually
    computed, and how many CPU step products copied their rows first (set_cpu_row_copies)."""
    totals = dict.fromkeys(_COUNTER_NAMES, 0)
    for library, reader in ((c_library, "tfcells_work_counters"),
                            (gpu_c_library, "tfcells_gpu_work_counters")):
        if library is None:
            continue
        values = (ctypes.c_int64 * len(_COUNTER_NAMES))()
        if getattr(library, reader)(values, len(_COUNTER_NAMES)) != len(_COUNTER_NAMES):
            raise RuntimeError(f"tfcells: {reader} disagrees on the number of work counters; "
                               "the compiled libraries come from different builds")
        for name, value in zip(_COUNTER_NAMES, values):
            totals[name] += value
    return totals


class CountWork:
    """Context manager recording the counters' growth inside its block, in `.delta`."""

    def __enter__(self):
        self._start = work_counters()
        self.delta = None
        return self

    def __exit__(self, *exc):
        end = work_counters()
        self.delta = {k: end[k] - self._start[k] for k in end}
        return False
