"""Command line: what to run (the plan), how (threads, device), and where results go."""

import argparse
import functools
import os
import sys
import time

from . import check, contenders, fit, gpu, machine, memory, report, runner
from .workload import CELLS, CONFIGS, MIXED_POLICIES, Shape

BASE_SHAPE = Shape(T=100, B=64, I=256, H=256)
# --quick: every configuration for LSTM, the extremes and dropout for the others (~2 min on 2
# cores).
QUICK_CONFIGS = {
    "lstm": list(CONFIGS),
    "gru": ["all_trainable", "both_frozen_no_dx", "dropout", "inference"],
    "simple_rnn": ["all_trainable", "both_frozen_no_dx", "dropout", "inference"],
}
# --full: every configuration for every cell at the base shape, then one dimension at a time
# scaled by these factors (T 25..200, B 16..128, I=H 64..512 around the default shape).
SWEEP_FACTORS = (0.25, 0.5, 1, 2)
SWEEP_CONFIG = "all_trainable"
# Per device: timed repetitions per contender (--quick, --full), half in each of its two
# timing blocks (runner.block_reps), and warm-up calls. A GPU step takes milliseconds, and its
# first calls pay for cuBLAS/cuDNN plan selection.
REPS = {"cpu": (6, 8), "gpu": (20, 50)}
WARMUP = {"cpu": 1, "gpu": 3}


def _list(choices):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items
    return parse


def _shape(text):
    try:
        return Shape.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Times one training step and inference of tfcells' fused LSTM/GRU/"
                    "SimpleRNN against Keras, tf.raw_ops.BlockLSTM and PyTorch, per freeze "
                    "configuration, next to the GEMM floor of this machine.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="default: T,B,I,H = 100,64,256,256; all configs for LSTM, "
                           f"{', '.join(QUICK_CONFIGS['gru'])} for GRU and SimpleRNN. With "
                           "--device gpu: the shapes "
                           + " and ".join(f"{s.T},{s.B},{s.I},{s.H}" for s in gpu.SHAPES))
    mode.add_argument("--full", action="store_true",
                      help="all cells and configs, then sweeps of T, B and H (I=H) at "
                           f"{', '.join(f'{f:g}' for f in SWEEP_FACTORS)}x the shape, for "
                           f"{SWEEP_CONFIG}")
    p.add_argument("--fit", action="store_true",
                   help="instead of the per-layer steps: end-to-end model.fit throughput of "
                        "Embedding + 2-layer LSTM + Dense on synthetic text, Keras' layers vs "
                        "tfcells', per freeze scenario ("
                        + ", ".join(fit.SCENARIOS) + "); default "
                        f"{fit.QUICK_SIZE.samples} sequences x {fit.QUICK_SIZE.epochs} timed "
                        f"epochs, with --full {fit.FULL_SIZE.samples} x "
                        f"{fit.FULL_SIZE.epochs}. Uses --threads, --json, --device")
    p.add_argument("--fit-samples", type=int, metavar="N", help="--fit: sequences per epoch")
    p.add_argument("--fit-len", type=int, metavar="T", help="--fit: sequence length")
    p.add_argument("--fit-epochs", type=int, metavar="N", help="--fit: timed epochs")
    p.add_argument("--fit-scenarios", type=_list(list(fit.SCENARIOS)),
                   help=f"--fit: comma list of {', '.join(fit.SCENARIOS)} (default: all)")
    p.add_argument("--cells", type=_list(CELLS), help=f"comma list of {', '.join(CELLS)}")
    p.add_argument("--configs", type=_list(list(CONFIGS)),
                   help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--impls", type=_list(list(contenders.REGISTRY) + list(gpu.REGISTRY)),
                   help=f"comma list of {', '.join(contenders.REGISTRY)}, or for the "
                        f"pybind11-vs-cuDNN GPU suite {', '.join(gpu.REGISTRY)} (default: "
                        "all of the suite; the first one is the reference the others are "
                        "checked against)")
    p.add_argument("--shape", type=_shape,
                   help="T,B,I,H (default 100,64,256,256; on a GPU the two of --quick)")
    p.add_argument("--dtype", default="float32",
                   choices=("float32", "float64", *MIXED_POLICIES),
                   help="float32 (default) or float64 throughout; bfloat16 or float16: mixed "
                        "precision, float32 weights and 16-bit data: Keras' layers under the "
                        "mixed_bfloat16 / mixed_float16 policy, tfcells' op on 16-bit x and "
                        "states, PyTorch under torch.autocast; the GEMM floor is the faster "
                        "of float32 GEMMs and 16-bit ones (tf.matmul), and says which")
    # The defaults as the report states them: two blocks of block_reps(N) each.
    reps = {d: [f"{n} = 2 x {runner.block_reps(n)}" for n in r] for d, r in REPS.items()}
    p.add_argument("--reps", type=int, metavar="N",
                   help="timed repetitions per contender, in two blocks of N/2 (rounded up); "
                        "the faster block's median counts (default: {0[0]} quick, {0[1]} full; "
                        "on a GPU {1[0]}, {1[1]})".format(reps["cpu"], reps["gpu"]))
    p.add_argument("--budget", type=float, metavar="S",
                   help="seconds per contender's timing block, after which it stops at 3 or "
                        "more repetitions (default: 3 quick, none full; 0: none)")
    p.add_argument("--warmup", type=int,
                   help="untimed calls before the repetitions, after the checked first call "
                        "(default: 1; on a GPU 3)")
    p.add_argument("--threads", type=int,
                   help="threads for TF (intra- and inter-op), tfcells' GEMMs, PyTorch and "
                        "NumPy's BLAS (default: each library's own)")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="gpu: the suite on TensorFlow's GPU where TensorFlow sees one and "
                        "tfcells has CUDA kernels; else tfcells' CUDA kernels through the "
                        "pybind11 module against cuDNN (torch.nn.LSTM/GRU/RNN), for the "
                        f"configurations {', '.join(gpu.CONFIGS)}; else exit status 2")
    p.add_argument("--tf32", action="store_true",
                   help="--device gpu: float32 GEMMs on TF32 tensor cores, for every contender "
                        "(default: off for all, full float32)")
    p.add_argument("--json", metavar="PATH",
                   help="also write every record (all columns, memory, settings, machine) "
                        "as JSON to PATH (default: no JSON is written; the path is printed)")
    p.add_argument("--plot", metavar="PATH",
                   help="also write a PNG chart to PATH, with matplotlib (default: no plot is "
                        "written; the path is printed)")
    p.add_argument("--wide", action="store_true",
                   help="print the full tables: GEMM GFLOP, ± half the IQR, every "
                        "contender's floor ratio, tfcells ÷ all_trainable (default: a compact "
                        "table; the JSON always has every column)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the memory measurement: by default each contender's step in "
                        "the first configuration of the first table (with --full: of every "
                        "table) runs again in a fresh process that reports its peak RSS, "
                        "after all timing (a few seconds per contender)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.tf32 and args.device != "gpu":
        p.error("--tf32 needs --device gpu")
    fit_opts = [o for o, v in (("--fit-samples", args.fit_samples), ("--fit-len", args.fit_len),
                               ("--fit-epochs", args.fit_epochs),
                               ("--fit-scenarios", args.fit_scenarios)) if v is not None]
    if fit_opts and not args.fit:
        p.error(f"{', '.join(fit_opts)} need --fit")
    if args.fit:
        kernel_opts = [o for o, v in (("--cells", args.cells), ("--configs", args.configs),
                                      ("--impls", args.impls), ("--shape", args.shape),
                                      ("--reps", args.reps), ("--budget", args.budget),
                                      ("--plot", args.plot), ("--wide", args.wide or None),
                                      ("--no-memory", args.no_memory or None),
                                      ("--dtype", None if args.dtype == "float32"
                                       else args.dtype))
                       if v is not None]
        if kernel_opts:
            p.error(f"--fit does not use {', '.join(kernel_opts)}")
        if min(v for v in (args.fit_samples, args.fit_len, args.fit_epochs, 1)
               if v is not None) < 1:
            p.error("--fit-samples, --fit-len and --fit-epochs must be at least 1")
    return args


def plan(args, bases=(BASE_SHAPE,), quick_configs=QUICK_CONFIGS, full_configs=tuple(CONFIGS)):
    """The tasks to run, in order: every base shape (or --shape), then with --full the sweeps
    around the first one."""
    bases = [args.shape] if args.shape else list(bases)
    cells = args.cells or list(CELLS)
    tasks = []
    for shape in bases:
        for cell in cells:
            configs = args.configs or list(full_configs if args.full else quick_configs[cell])
            tasks += [runner.Task(cell, CONFIGS[c], shape) for c in configs]
    if args.full:
        base = bases[0]
        for dim in ("T", "B", "H"):
            values = sorted({max(1, round(getattr(base, dim) * f)) for f in SWEEP_FACTORS})
            for cell in cells:
                for v in values:
                    size = {"T": dict(T=v), "B": dict(B=v), "H": dict(I=v, H=v)}[dim]
                    shape = Shape(**{**vars(base), **size})
                    tasks.append(runner.Task(cell, CONFIGS[SWEEP_CONFIG], shape, sweep=dim))
    return tasks


def memory_plan(tasks, every_table=False):
    """The tasks whose memory is measured: the first configuration of the first table (of
    every table with every_table, as --full does), all_trainable unless --configs says
    otherwise. A fresh process per contender costs seconds; --quick stays quick."""
    firsts = {}
    for task in tasks:
        if task.sweep is None:
            firsts.setdefault((task.cell, task.shape), task)
    return list(firsts.values())[:None if every_table else 1]


def _measure_memory(tasks, records_of, args, progress):
    """Adds each timed contender's RSS peak (memory.py) to its record."""
    pairs = [(task, rec) for task in tasks for rec in records_of[task]
             if rec["status"] in report.TIMED]
    if not pairs:
        return
    progress.start(f"memory: {len(pairs)} contenders, a fresh process each")
    jobs = [(task, rec["impl"], args.dtype, args.device, args.threads) for task, rec in pairs]
    for (_, rec), fields in zip(pairs, memory.measure_all(jobs)):
        rec.update(fields)
    progress.advance()


class _Progress:
    """tqdm when installed, else one updating line on stderr."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="task", leave=False)
            except ImportError:
                pass

    def start(self, text):
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.enabled:
            print(f"\r[{self.done + 1}/{self.total}] {text:<60}", end="", file=sys.stderr,
                  flush=True)

    def advance(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    warnings = machine.set_threads(args.threads) if args.threads else []
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    suite, tf32 = "cpu", None
    if args.device == "gpu":
        suite, reason = gpu.which_suite()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        # Explicitly, for every library: TensorFlow and cuDNN default to TF32 on.
        tf32 = gpu.set_tf32(args.tf32, tensorflow=suite == "tf")
    if args.fit:
        if suite == "cuda_module":
            print("--fit --device gpu needs a TensorFlow that sees the GPU", file=sys.stderr)
            return 2
        return _main_fit(args, argv, start, warnings)

    registry = gpu.REGISTRY if suite == "cuda_module" else contenders.REGISTRY
    impls = args.impls or list(registry)
    configs = gpu.CONFIGS if suite == "cuda_module" else tuple(CONFIGS)
    wrong = [i for i in impls if i not in registry] + \
        [c for c in args.configs or () if c not in configs]
    if wrong:
        print(f"{', '.join(wrong)}: not part of the {suite} suite, which runs "
              f"{', '.join(registry)} on {', '.join(configs)}", file=sys.stderr)
        return 2
    if suite == "cuda_module":
        tasks = plan(args, gpu.SHAPES, dict.fromkeys(CELLS, gpu.CONFIGS), gpu.CONFIGS)
    else:
        tasks = plan(args, gpu.SHAPES) if suite == "tf" else plan(args)
    reps = args.reps or REPS[args.device][args.full]
    warmup = WARMUP[args.device] if args.warmup is None else args.warmup
    budget = args.budget if args.budget is not None else (None if args.full else 3.0)
    meta = {"machine": machine.info(),
            "settings": {"reps": reps, "warmup": warmup, "budget_s": budget or None,
                         "threads": args.threads, "suite": suite, "tf32": tf32,
                         "device": args.device, "dtype": args.dtype, "impls": impls,
                         "argv": list(sys.argv[1:] if argv is None else argv)},
            "warnings": warnings}
    if suite == "cuda_module":
        meta["gpu"] = gpu.device_facts(args.dtype, args.tf32)
    tolerance = check.TF32_TOLERANCE if args.tf32 and args.dtype == "float32" else None
    meta["settings"]["tolerance"] = tolerance or check.TOLERANCE[args.dtype]
    # RSS says nothing about GPU memory: the memory runs are for the CPU suite.
    memory_tasks = [] if args.no_memory or suite != "cpu" else memory_plan(tasks, args.full)
    meta["settings"]["memory"] = {
        "method": memory.METHOD if memory_tasks else None,
        "configs": sorted({t.config.name for t in memory_tasks})}
    progress = _Progress(len(tasks) + bool(memory_tasks), not args.no_progress)
    records, records_of = [], {}
    try:
        for task in tasks:
            progress.start(f"{task.cell} {task.config.name} {task.shape}")
            records_of[task] = runner.run_task(task, impls, args.dtype, args.device, reps,
                                               warmup, budget or None, registry=registry,
                                               tolerance=tolerance)
            records += records_of[task]
            progress.advance()
        # After all timing, so that the children never share the cores with a timed block.
        _measure_memory(memory_tasks, records_of, args, progress)
    finally:
        progress.close()
    report.annotate(records)
    markdown = functools.partial(report.markdown, wide=args.wide)
    if suite == "cuda_module":
        gpu.annotate(records, meta["gpu"]["peak_tflops"], args.tf32)
        markdown = report.gpu_markdown
    return _finish(args, records, meta, start, markdown,
                   failing=("mismatch", "error", "unverified"), plot=True)


def _finish(args, records, meta, start, markdown, failing, plot=False):
    """Prints the table, writes the JSON (and plot), and turns findings into the exit status."""
    meta["wall_s"] = time.perf_counter() - start
    meta["machine"]["load_average_end"] = machine.load_average()
    print(markdown(records, meta))
    written = []
    if args.json:
        report.write_json(args.json, records, meta)
        written.append(("JSON", args.json))
    if plot and args.plot:
        if report.plot(args.plot, records, meta):
            written.append(("plot", args.plot))
        else:
            print(f"nothing was timed: no plot written to {args.plot}", file=sys.stderr)
    for what, path in written:  # on stderr: stdout is the report
        print(f"wrote {what}: {os.path.abspath(path)}", file=sys.stderr)
    # A contender that computes other numbers than the reference, or fails, is a finding:
    # say so in the exit status too (results are written all the same).
    return 1 if any(r["status"] in failing for r in records) else 0


def _main_fit(args, argv, start, warnings):
    """--fit: the model.fit comparison (fit.py), its own table, the same JSON layout."""
    base = fit.FULL_SIZE if args.full else fit.QUICK_SIZE
    size = fit.FitSize(samples=args.fit_samples or base.samples,
                       seq_len=args.fit_len or base.seq_len,
                       epochs=args.fit_epochs or base.epochs, batch=base.batch)
    scenarios = args.fit_scenarios or list(fit.SCENARIOS)
    meta = {"machine": machine.info(),
            "settings": {"threads": args.threads, "device": args.device, "dtype": "float32",
                         "tf32": args.tf32 if args.device == "gpu" else None,
                         "impls": list(fit.IMPLS),
                         "fit": {**vars(size), "vocab": fit.VOCAB, "embed": fit.EMBED,
                                 "units": fit.UNITS, "scenarios": scenarios,
                                 "loss_rtol": fit.LOSS_RTOL},
                         "argv": list(sys.argv[1:] if argv is None else argv)},
            "warnings": warnings}
    progress = _Progress(len(scenarios), not args.no_progress)
    try:
        records = fit.run(size, scenarios, args.device, progress)
    finally:
        progress.close()
    return _finish(args, records, meta, start, report.fit_markdown,
                   failing=("mismatch", "error"))


def entry_point():
    """The `tfcells-bench` console script."""
    sys.exit(main())
