"""Runs one task (cell, config, shape): build every contender, check it, time it, record it."""

import dataclasses
import time
import traceback

from . import check, contenders, floor, machine, timing
from .workload import make_workload

_FLOOR = "gemm_floor"
QUIET_S = 0.12  # before each timed block: NumPy's OpenBLAS threads spin 2^28 cycles, ~0.08 s


def block_reps(reps):
    """Repetitions in each of a contender's two timing blocks (run_task)."""
    return max(1, (reps + 1) // 2)


@dataclasses.dataclass(frozen=True)
class Task:
    cell: str
    config: object  # workload.Config
    shape: object  # workload.Shape
    sweep: str = None  # "T", "B" or "H" for points of a --full scaling sweep


def _base_record(task, impl, dtype, device):
    s = task.shape
    return {
        "cell": task.cell, "config": task.config.name, "mode": task.config.mode,
        "layers": task.config.layers, "impl": impl, "T": s.T, "B": s.B, "I": s.I, "H": s.H,
        "dtype": dtype, "device": device, "sweep": task.sweep,
        "status": "ok", "detail": "", "median_ms": None,
    }


def _peak_memory_mb(step, device):
    """Peak bytes TensorFlow's allocator holds during one step, above what it held before
    (TF contenders only: PyTorch keeps no CPU allocator statistics)."""
    if step.framework != "tf":
        return None
    import tensorflow as tf

    name = "GPU:0" if device == "gpu" else "CPU:0"
    try:
        tf.config.experimental.reset_memory_stats(name)
        before = tf.config.experimental.get_memory_info(name)["current"]
        step.run()
        return (tf.config.experimental.get_memory_info(name)["peak"] - before) / 2**20
    except (ValueError, RuntimeError):
        return None


def _error(e):
    last = traceback.extract_tb(e.__traceback__)[-1:]
    where = f" (at {last[0].filename.split('/')[-1]}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def run_task(task, impls, dtype, device, reps, warmup, budget_s=None, floor_enabled=True,
             registry=None, tolerance=None):
    """Returns one record per contender in `impls`, names in `registry` (default:
    contenders.REGISTRY; the GPU suite's is gpu.REGISTRY). `tolerance` overrides the value
    check's tolerance for the dtype (TF32 GEMMs round more).

    Each contender's first call (tracing included) produces the values that are checked; a
    contender that disagrees with the reference (the first one that ran: tfcells by default)
    is not timed. Then each contender, and the GEMM floor, is timed in its own block of
    warm-up and repetitions, twice (see below). Not round-robin per repetition: each library's
    thread pool (TF's, OpenBLAS', OpenMP's) spins for a while after its work and steals the
    cores from whichever runs next (seen here: a tiny step's floor 30x slower round-robin than
    alone). So each block starts after a quiet pause long enough for those spins to end
    (NumPy's OpenBLAS spins ~0.1 s: a SimpleRNN step timed right after it took 17-19 ms
    instead of 10-12).
    """
    work = make_workload(task.cell, task.config, task.shape, dtype, device)
    records, steps, outputs = {}, {}, {}
    for impl in impls:
        con = (registry or contenders.REGISTRY)[impl]
        rec = records[impl] = _base_record(task, impl, dtype, device)
        reason = con.unavailable() or con.unsupported(work)
        if reason:
            rec.update(status="skipped", detail=reason)
            continue
        try:
            start = time.perf_counter()
            step = con.build(work)
            raw = step.run()
            # Build and first call, tracing included: what a user waits before step one.
            rec["setup_s"] = time.perf_counter() - start
            outputs[impl] = step.fetch(raw)
            steps[impl] = step
        except Exception as e:  # one broken contender must not end the whole run
            rec.update(status="error", detail=_error(e))

    if outputs:
        reference = next(iter(outputs))
        agreed = False
        for impl, out in outputs.items():
            if impl == reference:
                continue
            ok, errors, message = check.compare(out, outputs[reference], dtype, tolerance)
            records[impl]["check"] = {"reference": reference, "max_rel_err": errors}
            if ok:
                agreed = True
            else:
                records[impl].update(status="mismatch", detail=message)
                del steps[impl]
        records[reference]["check"] = {"reference": reference, "max_rel_err": {}}
        if len(outputs) > 1 and not agreed:
            # Nobody agrees with the reference: it may be the one that is wrong.
            records[reference].update(status="unverified",
                                      detail="no other contender computes the same values")

    timed = {impl: (step.run, step.measure) for impl, step in steps.items()}
    # The floor is NumPy on the CPU; a GPU run has no comparable floor here.
    with_floor = floor_enabled and device == "cpu"
    if with_floor:
        for path, fn in floor.floor_callables(task.cell, task.config, task.shape,
                                              dtype).items():
            timed[_FLOOR + ":" + path] = (fn, timing.measure)
    # Two blocks per contender, the second round in the opposite order, each with half the
    # repetitions; the faster block counts. On a shared machine a whole block now and then runs
    # 1.5-2x slow (seen here: a 10 ms step timed at 18 ms, nothing else on the cores), and one
    # block per contender would put that on whoever was unlucky.
    blocks = {impl: [] for impl in timed}
    order = list(timed)
    with machine.OtherWork() as phase:
        for round_order in (order, order[::-1]):
            for impl in round_order:
                fn, measure = timed[impl]
                time.sleep(QUIET_S)
                with machine.OtherWork() as other:
                    block = measure(fn, block_reps(reps), warmup, budget_s)
                block["other_cores"], block["other_cores_over"] = other.cores, "block"
                blocks[impl].append(block)
    # OtherWork cannot measure a block shorter than 0.5 s: such a block gets the figure of the
    # whole timing phase (its blocks and pauses), so that contention never goes unflagged.
    for block in (b for runs in blocks.values() for b in runs):
        if block["other_cores"] is None and phase.cores is not None:
            block["other_cores"], block["other_cores_over"] = phase.cores, "task"
    stats = {}
    for impl, runs in blocks.items():
        stats[impl] = dict(min(runs, key=lambda b: b["median_ms"]),
                           block_medians_ms=[b["median_ms"] for b in runs])

    flops = floor.flops(task.cell, task.config, task.shape)
    # The floor: the faster GEMM path's block.
    floor_paths = {k: stats.pop(k) for k in list(stats) if k.startswith(_FLOOR + ":")}
    floor_stats = path_summary = None
    if floor_paths:
        path = min(floor_paths, key=lambda k: floor_paths[k]["median_ms"])
        floor_stats = dict(floor_paths[path], path=path.split(":", 1)[1])
        # Every path's GEMM dtype (a 16-bit run also times float32 ones) and median.
        path_summary = {name: {"dtype": floor.path_dtype(name, dtype),
                               "median_ms": v["median_ms"]}
                        for name, v in ((k.split(":", 1)[1], v) for k, v in floor_paths.items())}
    floor_ms = floor_stats["median_ms"] if floor_stats else None
    for impl, rec in records.items():
        rec.update(flops=flops, floor_ms=floor_ms,
                   floor_iqr_ms=floor_stats["iqr_ms"] if floor_stats else None,
                   floor_other_cores=floor_stats["other_cores"] if floor_stats else None,
                   floor_other_cores_over=floor_stats["other_cores_over"] if floor_stats
                   else None,
                   floor_path=floor_stats["path"] if floor_stats else None,
                   floor_dtype=path_summary[floor_stats["path"]]["dtype"] if floor_stats
                   else None,
                   floor_paths=path_summary)
        if impl not in stats:
            continue
        rec.update(stats[impl])
        rec["gflops"] = flops / rec["median_ms"] / 1e6
        rec["floor_ratio"] = floor_ms / rec["median_ms"] if floor_ms else None
        rec["peak_mem_mb"] = _peak_memory_mb(steps[impl], device)
    return list(records.values())
