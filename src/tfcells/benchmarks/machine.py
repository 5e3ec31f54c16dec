"""Thread settings and the facts about the machine and software that a result depends on."""

import datetime
import os
import platform
import sys
import time

from . import floor


def set_threads(n):
    """Sets every pool the contenders use to n threads; returns warnings for what failed.

    TF's pools can only be sized before its runtime starts, so call this before any TF op.
    """
    warnings = []
    tf = _tensorflow()
    if tf is not None:  # the GPU suite also runs where TensorFlow is absent
        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError as e:  # already initialised (e.g. main() called inside a test)
            warnings.append(f"TensorFlow thread pools not changed: {e}")
    try:
        import tfcells

        tfcells.set_cpu_gemm_threads(n)
    except Exception as e:
        warnings.append(f"tfcells GEMM threads not changed: {e}")
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    if floor.blas_threads(set_to=n) is None:
        warnings.append("NumPy BLAS threads unknown: the GEMM floor uses its default")
    return warnings


def _tensorflow():
    """TensorFlow, or None where it does not import (a GPU machine with PyTorch alone)."""
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


def threads():
    """The thread counts in effect (0 for TF means: TF picks, one per core; None: TensorFlow
    does not import here)."""
    tf = _tensorflow()
    out = {
        "tf_intra_op": tf and tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op": tf and tf.config.threading.get_inter_op_parallelism_threads(),
        "numpy_blas": floor.blas_threads(),
    }
    try:
        import tfcells

        out["tfcells_gemm"] = tfcells.cpu_gemm_threads()
    except Exception:
        out["tfcells_gemm"] = None
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _busy_cpu_seconds():
    """CPU seconds all processes have used (steal included: the hypervisor's share is
    lost to us too), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


class OtherWork:
    """Measures how many cores other processes kept busy while a block ran.

    The load average lags by a minute; this is exact for the block, and tells which numbers
    a neighbour's compile or test run has skewed.
    """

    def __enter__(self):
        self._busy, self._self = _busy_cpu_seconds(), sum(os.times()[:2])
        self._wall = time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc):
        busy = _busy_cpu_seconds()
        wall = time.perf_counter() - self._wall
        # /proc/stat counts in 10 ms ticks: shorter blocks would give noise, not a number.
        if busy is not None and self._busy is not None and wall >= 0.5:
            mine = sum(os.times()[:2]) - self._self
            cores = os.cpu_count() or 1
            self.cores = min(cores, max(0.0, (busy - self._busy - mine) / wall))
        return False


def load_average():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def info():
    import numpy as np

    versions = {m: _version(m) for m in ("tensorflow", "keras", "numpy", "tfcells", "torch")}
    try:
        import tfcells

        build = tfcells.build_info()
    except Exception as e:
        build = {"error": str(e)}
    blas = None
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"].get("version")
    except Exception:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "versions": versions,
        "tfcells_build": build,
        "numpy_blas": blas,
        "threads": threads(),
        "load_average": load_average(),
    }
