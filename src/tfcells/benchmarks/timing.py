"""Wall-clock timing and its summary statistics."""

import time

import numpy as np


def time_call(fn):
    """Milliseconds one call of fn takes; fn must return only when its work is done."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def summarize(times_ms):
    """Median and spread of repeated timings (the median resists the odd slow repetition that
    a shared machine produces; the IQR says how much to trust it)."""
    t = np.asarray(times_ms, dtype=np.float64)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {
        "median_ms": float(med),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_ms": float(q3 - q1),
        "min_ms": float(t.min()),
        "max_ms": float(t.max()),
        "reps": int(t.size),
        "times_ms": [round(float(v), 4) for v in t],
    }


def measure(fn, reps, warmup, budget_s=None, min_reps=3):
    """Times fn `reps` times after `warmup` untimed calls. With a budget, stops early once
    min_reps are done and budget_s has passed: on a loaded machine a step can take 10x
    longer, and --quick must still finish in its time."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps:
        times.append(time_call(fn))
        if budget_s and len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return summarize(times)


def measure_cuda_events(fn, reps, warmup, budget_s=None):
    """Like measure, on the GPU's clock: a pair of CUDA events on PyTorch's current stream
    around each call, read after one synchronisation at the end. fn only enqueues its work,
    so the host queues the repetitions back to back, as a training loop does, and host-side
    launch overhead counts only where the GPU waits for it. budget_s is ignored (a GPU step
    takes milliseconds)."""
    import torch

    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in pairs])
