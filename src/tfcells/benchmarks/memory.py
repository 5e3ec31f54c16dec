"""Memory of one contender's step, measured the same way for every contender: the resident
set (RSS) of a fresh process that runs only that contender.

TensorFlow's allocator statistics miss what Keras' while loop holds, and PyTorch's CPU
allocator keeps none, so the suite reads what the operating system counts instead. A fresh
process per contender, because memory a previous contender freed stays resident in the
allocators and would be reused unseen. So that each does not pay for importing TensorFlow
again, one server process imports the libraries (and starts nothing), then forks a child per
measurement. In the child: make the data, start TensorFlow's runtime and PyTorch's (if
installed) whichever contender runs, read the RSS (the baseline), build the step and run it
once (tracing), reset the RSS high-water mark, then run warm steps until the mark has not
grown for STABLE_STEPS steps (at least STABLE_STEPS + 1, at most MAX_STEPS or MAX_S seconds:
allocators settle over several steps) and read it. Reported: that peak minus the baseline, i.e. the weights, the traced graph, what the framework
keeps between steps and the steps' own peak. Where the mark cannot be reset (Linux' clear_refs)
the peak over the child's whole life stands in, tracing included (rss_method says which).

The parent calls measure_all(); the server is `python -m tfcells.benchmarks.memory`.
"""

import json
import os
import subprocess
import sys
import time

STABLE_STEPS = 3
MAX_STEPS = 10
MAX_S = 5.0
PARALLEL = 2  # children at a time: RSS is counted per process, they do not disturb it
TIMEOUT_S = 900
METHOD = ("peak RSS of warm steps above the RSS before the build, in a fresh process per "
          "contender")
METHOD_FALLBACK = "peak RSS of the whole process above the RSS before the build"


def _status_mb(field):
    """VmRSS or VmHWM of this process in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def _rss_mb():
    rss = _status_mb("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
    return rss


def _peak_mb():
    peak = _status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return peak


def _reset_peak():
    """Sets the high-water mark to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _start_runtimes(device):
    """Starts what any contender would start, before the baseline, so that no contender is
    charged for a framework's own start-up (thread pools, kernels, libraries)."""
    import tensorflow as tf

    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
        (tf.constant([[1.0]]) @ tf.constant([[1.0]])).numpy()
    try:
        import torch
    except ImportError:
        return
    torch.ones(1, 1) @ torch.ones(1, 1)


def child(spec):
    """The measurement described in the module docstring, in a fresh process; a dict."""
    from . import contenders, machine
    from .workload import CONFIGS, Shape, make_workload

    if spec.get("threads"):
        machine.set_threads(spec["threads"])
    con = contenders.REGISTRY.get(spec["impl"])
    if con is None:
        return {"rss_error": f"no contender {spec['impl']!r} outside the benchmark's process"}
    work = make_workload(spec["cell"], CONFIGS[spec["config"]], Shape(**spec["shape"]),
                         spec["dtype"], spec["device"])
    reason = con.unavailable() or con.unsupported(work)
    if reason:
        return {"rss_error": reason}
    _start_runtimes(spec["device"])
    base = _rss_mb()
    resettable = _reset_peak()
    step = con.build(work)
    step.run()  # tracing
    first = _peak_mb() - base
    method = METHOD if resettable and _reset_peak() else METHOD_FALLBACK
    # At least STABLE_STEPS + 1 warm steps whatever the load, then on while the mark grows.
    peaks, start = [], time.perf_counter()
    while len(peaks) <= STABLE_STEPS or (
            len(peaks) < MAX_STEPS and time.perf_counter() - start < MAX_S
            and peaks[-1] > peaks[-1 - STABLE_STEPS]):
        step.run()
        peaks.append(_peak_mb())
    return {"rss_peak_mb": peaks[-1] - base, "rss_first_call_peak_mb": first,
            "rss_baseline_mb": base, "rss_steps": len(peaks), "rss_method": method}


def _serve(lines, out):
    """The server: a forked child per spec (PARALLEL at a time); one JSON line per result,
    {"index": i, ...}, in the order they finish."""
    # Imported once, here (TensorFlow with tfcells, NumPy, Keras, PyTorch if installed):
    # importing starts no runtime, so the children fork from a clean state.
    from . import contenders  # noqa: F401
    import keras  # noqa: F401
    try:
        import torch  # noqa: F401
    except ImportError:
        pass

    running = {}  # pid -> (index, read end)

    def reap():
        pid, status = os.wait()
        index, fd = running.pop(pid)
        with os.fdopen(fd) as f:
            text = f.read()
        try:
            result = json.loads(text)
        except ValueError:
            result = {"rss_error": f"the child process ended with status {status >> 8} and "
                                   "no result"}
        out.write(json.dumps({"index": index, **result}) + "\n")
        out.flush()

    for index, line in enumerate(lines):
        if len(running) >= PARALLEL:
            reap()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write, leave without running any cleanup
            os.close(r)
            try:
                result = child(json.loads(line))
            except BaseException as e:
                result = {"rss_error": f"{type(e).__name__}: "
                                       f"{(str(e).splitlines() or [''])[0]}"}
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        running[pid] = (index, r)
    while running:
        reap()


def measure_all(jobs):
    """jobs: [(task, impl, dtype, device, threads)]; returns one dict of record fields per job
    (rss_error where it could not be measured)."""
    if not jobs:
        return []
    specs = [{"cell": t.cell, "config": t.config.name, "impl": impl,
              "shape": {"T": t.shape.T, "B": t.shape.B, "I": t.shape.I, "H": t.shape.H},
              "dtype": dtype, "device": device, "threads": threads}
             for t, impl, dtype, device, threads in jobs]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = [{"rss_error": "the memory server gave no result"} for _ in jobs]
    try:
        proc = subprocess.run([sys.executable, "-m", "tfcells.benchmarks.memory"],
                              input="".join(json.dumps(s) + "\n" for s in specs),
                              capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [{"rss_error": f"the memory server took more than {TIMEOUT_S} s"}
                for _ in jobs]
    for line in proc.stdout.splitlines():
        try:
            result = json.loads(line)
            results[result.pop("index")] = result
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            continue  # not a result line
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        for r in results:
            if "rss_peak_mb" not in r:
                r["rss_error"] = f"the memory server failed (status {proc.returncode}): {last}"
    return results


if __name__ == "__main__":
    _serve([line for line in sys.stdin if line.strip()], sys.stdout)
