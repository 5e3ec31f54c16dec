"""Where one GPU training step's time goes: host enqueue against GPU time, the kernels it runs,
and what whole-call CUDA graphs change.

For the CUDA kernels through the pybind11 module (build/gpu, as tools/gpu_session.sh builds it)
on PyTorch tensors, per case (cell, dtype, TF32, shape, configuration):
  eager      the step (forward + backward) on CUDA events, queued back to back (as the suite);
  host       the host's time to enqueue one step, the GPU left to run behind it;
  fwd / bwd  the same for the forward and the backward alone;
  graphs     the same with tfcells' whole-call CUDA graphs (csrc/cuda/cuda_graphs.h): the
             same buffers each call (replays), then twelve buffer sets in turn (every call a
             new capture that updates a cached graph);
  kernels    (first case) per kernel name: launches per step and GPU time per step
             (torch.profiler), and their sum, the GPU's busy time.
Usage: python tools/gpu_profile.py (prints; tools/gpu_session.sh keeps it as profile.txt).
"""

import os
import sys
import time

sys.path.insert(0, "src")
os.environ.setdefault("TFCELLS_CUDA_MODULE_DIR", os.path.abspath("build/gpu"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfcells.benchmarks import gpu, timing  # noqa: E402
from tfcells.benchmarks.workload import CONFIGS, Shape, make_workload  # noqa: E402

CASES = [  # cell, dtype, tf32, shape, config
    ("lstm", "float16", False, Shape(100, 64, 1024, 1024), "all_trainable"),
    ("lstm", "float16", False, Shape(100, 64, 1024, 1024), "both_frozen_no_dx"),
    ("simple_rnn", "float32", False, Shape(100, 64, 1024, 1024), "all_trainable"),
    ("gru", "bfloat16", False, Shape(100, 256, 512, 512), "all_trainable"),
    ("lstm", "float32", False, Shape(100, 64, 1024, 1024), "all_trainable"),
    ("lstm", "float32", True, Shape(100, 64, 1024, 1024), "all_trainable"),
]


def cuda_ms(fn, reps=20, warmup=3):
    return timing.measure_cuda_events(fn, reps, warmup)["median_ms"]


def host_ms(fn, reps=10):
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    return float(np.median(times))


def kernels(fn, steps=3):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps / 1e3, e.count / steps, e.key))
    rows.sort(reverse=True)
    return rows


def main():
    module = gpu._cuda_module()[0]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")

    def say(s):
        print(s, flush=True)

    for n, (cell, dtype, tf32, shape, config) in enumerate(CASES):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        work = make_workload(cell, CONFIGS[config], shape, dtype, "gpu")
        arrays = gpu._TorchArrays(torch, dtype)
        step = gpu.TfcellsCudaStep(module, arrays, work, tf32)
        say(f"\n== {cell} {dtype}{' tf32' if tf32 else ''} {shape} {config}")
        os.environ["TFCELLS_CUDA_GRAPHS"] = "0"
        eager = cuda_ms(step.run)
        say(f"direct: {eager:.3f} ms ({eager / shape.T * 1e3:.1f} us/step); host enqueue "
            f"{host_ms(step.run):.3f} ms; fwd {cuda_ms(step.forward):.3f} (host "
            f"{host_ms(step.forward):.3f}); bwd {cuda_ms(step.backward):.3f} (host "
            f"{host_ms(step.backward):.3f})")
        if n == 0:
            rows = kernels(step.run)
            busy = sum(r[0] for r in rows)
            say(f"kernels: GPU busy {busy:.3f} ms of {eager:.3f} ({busy / eager:.0%}); "
                f"{sum(r[1] for r in rows):.0f} launches per step")
            for ms, count, name in rows[:8]:
                say(f"  {ms:8.3f} ms {count:6.0f}x  {name[:110]}")
        os.environ["TFCELLS_CUDA_GRAPHS"] = "1"
        before = module.graph_stats()
        replay = cuda_ms(step.run)
        say(f"graphs, same buffers: {replay:.3f} ms ({replay / eager:.2f} of direct); host "
            f"{host_ms(step.run):.3f} ms; fwd {cuda_ms(step.forward):.3f} bwd "
            f"{cuda_ms(step.backward):.3f}")
        # Twelve buffer sets in turn, more than a shape keeps graphs for (8): every call is a
        # new capture that updates a cached graph in place.
        steps = [step] + [gpu.TfcellsCudaStep(module, arrays, work, tf32) for _ in range(11)]
        turn = iter(range(10**9))
        miss = cuda_ms(lambda: steps[next(turn) % len(steps)].run(), reps=24, warmup=12)
        after = module.graph_stats()
        say(f"graphs, 12 buffer sets in turn (capture + update each call): {miss:.3f} ms "
            f"({miss / eager:.2f} of direct); stats change "
            f"{ {k: after[k] - before[k] for k in after if k != 'last_failure'} }"
            + (f"; last failed capture: {after['last_failure']}" if after["last_failure"] else ""))
        del steps
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
