"""tfcells' benchmark suite: `python -m benchmarks --help` from the repository root,
`python -m tfcells.benchmarks` or the `tfcells-bench` console script anywhere.
`python -m benchmarks --fit`: end-to-end `model.fit` throughput of Embedding + 2-layer LSTM +
Dense on a synthetic text set, Keras' layers vs tfcells', per freeze scenario (fit.py).

Modules: workload (cells, freeze configs, shapes, data), contenders (the implementations, in
one registry), check (values compared before timing), floor (GEMM floor and FLOP model),
timing, runner (one task), memory (each contender's step memory, in a fresh process), fit
(the --fit model.fit comparison), gpu (--device gpu: which suite runs, and tfcells' CUDA
kernels through the pybind11 module against cuDNN), torchmap (Keras weights in PyTorch's
layout), machine (threads, machine facts), report (Markdown, JSON, PNG), cli (the plan and the
entry point).

This file imports no TensorFlow at its top: tfcells' own __init__ imports it first, and in a
benchmark run quiet_tensorflow imports TensorFlow itself.
"""
import os
import re
import sys
import tempfile

# The suite's ways in: the console script, and `python -m` of this package or of the
# repository's shim (benchmarks/__main__.py).
SCRIPT = "tfcells-bench"
MODULES = ("tfcells.benchmarks", "tfcells.benchmarks.memory", "benchmarks")


def started_as_benchmark(argv=None, orig_argv=None):
    """Whether this process runs the benchmark suite (read from the command line, because it
    has to be known before TensorFlow is imported, i.e. before the suite's own code runs)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", argv) if orig_argv is None else orig_argv
    script = os.path.basename(argv[0]) if argv else ""
    if os.path.splitext(script)[0] == SCRIPT:
        return True
    args = list(orig_argv[1:])
    while args:
        arg = args.pop(0)
        if arg == "-m":
            return bool(args) and args[0] in MODULES
        if arg.startswith("-m"):  # -mtfcells.benchmarks
            return arg[2:] in MODULES
        if arg in ("-X", "-W"):  # options with a separate value
            args = args[1:]
        elif not arg.startswith("-") or arg in ("-c", "-"):  # a script, code or stdin
            return False
    return False


# What TensorFlow's C++ side prints on stderr while it is imported, before absl's logging is
# set up, whatever TF_CPP_MIN_LOG_LEVEL says: absl's notice of that, and INFO lines such as
# oneDNN's "custom operations are on" (on CPUs where TensorFlow turns oneDNN on, e.g. Intel
# Xeons with AVX-512).
_STARTUP_NOTICE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} ")


def quiet_tensorflow():
    """TensorFlow's start-up notices (absl, cpu_feature_guard, oneDNN) would bury the report;
    errors still show. They are printed while TensorFlow is imported, so this has to run first:
    it imports TensorFlow with its stderr captured and passes on every other line. The user's
    own TF_CPP_MIN_LOG_LEVEL wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" or "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401  (the import prints the notices)
        except ImportError:
            pass  # a GPU machine without TensorFlow: the suite runs tfcells' CUDA module
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not _STARTUP_NOTICE.match(line):
                    print(line, file=sys.stderr)


def quiet_if_benchmark():
    if started_as_benchmark():
        quiet_tensorflow()
