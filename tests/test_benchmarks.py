"""The benchmark suite on tiny shapes: its records, its FLOP model, and that its value check
catches a contender that computes something else. No timing is asserted."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfcells
from tfcells.benchmarks import cli, contenders, floor, memory, report, runner
from tfcells.benchmarks.workload import CONFIGS, Shape

# --no-memory: the memory runs (a process per contender) have their own test.
TINY = ["--shape", "3,2,4,5", "--reps", "1", "--warmup", "0", "--no-progress", "--no-memory"]
REQUIRED = {"cell", "config", "impl", "T", "B", "I", "H", "dtype", "device", "median_ms",
            "status", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms", "floor_ms",
            "floor_ratio", "flops", "gflops", "peak_mem_mb", "mode", "check", "other_cores",
            "setup_s", "times_ms", "reps"}


def _run(tmp_path, *args):
    path = tmp_path / "bench.json"
    rc = cli.main([*TINY, "--json", str(path), *args])
    with open(path) as f:
        return rc, json.load(f)


def test_quick_plan_records(tmp_path, capsys):
    rc, data = _run(tmp_path)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert {"machine", "settings", "wall_s"} <= set(data["meta"])
    assert {"tf_intra_op", "tfcells_gemm", "numpy_blas"} <= set(data["meta"]["machine"]["threads"])
    records = data["records"]
    keys = [(r["cell"], r["config"], r["T"], r["B"], r["I"], r["H"], r["impl"]) for r in records]
    assert len(keys) == len(set(keys)), "one record per (cell, config, shape, impl)"
    expected = {(cell, c) for cell, configs in cli.QUICK_CONFIGS.items() for c in configs}
    assert {(r["cell"], r["config"]) for r in records} == expected
    for r in records:
        assert (r["T"], r["B"], r["I"], r["H"], r["dtype"], r["device"]) == \
            (3, 2, 4, 5, "float32", "cpu")
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "skipped":
            assert r["median_ms"] is None and r["detail"]
            continue
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["median_ms"] > 0 and r["floor_ms"] > 0 and r["flops"] > 0
        assert r["floor_ratio"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
    timed = {(r["cell"], r["impl"]) for r in records if r["status"] == "ok"}
    assert {("lstm", "tfcells"), ("lstm", "keras"), ("lstm", "blocklstm"),
            ("gru", "keras"), ("simple_rnn", "tfcells")} <= timed
    # The Markdown table: one header per cell, the ratio columns, every LSTM config.
    assert out.count("| config |") == 3
    assert "keras ÷ tfcells" in out and "floor ratio tfcells" in out
    for config in CONFIGS:
        assert f"| {config} |" in out


class _WrongGates(contenders.KerasContender):
    """A Keras LSTM loaded with the kernel's gate blocks in the wrong order."""

    name = label = "wrong_gates"

    def layer_weights(self, work, layer):
        w = dict(work.weights[layer])
        w["kernel"] = np.concatenate(np.split(w["kernel"], 4, axis=1)[::-1], axis=1)
        return w


class _WrongGrads(contenders.TfcellsContender):
    """Right outputs, every gradient doubled."""

    name = label = "wrong_grads"

    def make_model(self, work):
        forward, variables, to_keras = super().make_model(work)

        @tf.custom_gradient
        def double_grad(y):
            return tf.identity(y), lambda dy: 2 * dy

        return (lambda x: double_grad(forward(x))), variables, to_keras


def test_check_catches_wrong_contenders(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(contenders.REGISTRY, "wrong_gates", _WrongGates())
    monkeypatch.setitem(contenders.REGISTRY, "wrong_grads", _WrongGrads())
    rc, data = _run(tmp_path, "--cells", "lstm", "--configs", "all_trainable,inference",
                    "--impls", "tfcells,keras,wrong_gates,wrong_grads")
    out = capsys.readouterr().out
    assert rc == 1  # a mismatch is a finding: the exit status says so
    by = {(r["config"], r["impl"]): r for r in data["records"]}
    for config in ("all_trainable", "inference"):
        assert by[config, "keras"]["status"] == "ok"
        assert by[config, "tfcells"]["status"] == "ok"
        bad = by[config, "wrong_gates"]
        assert bad["status"] == "mismatch" and bad["median_ms"] is None
        assert "y off by" in bad["detail"]
    grads = by["all_trainable", "wrong_grads"]
    assert grads["status"] == "mismatch" and grads["median_ms"] is None
    assert "y off by" not in grads["detail"] and "kernel off by" in grads["detail"]
    # Forward only, the doubled gradient cannot show: that one is right and timed.
    assert by["inference", "wrong_grads"]["status"] == "ok"
    assert "MISMATCH" in out


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn"])
def test_dropout_config_checks_the_masks(tmp_path, monkeypatch, cell):
    """tfcells and Keras apply the workload's masks and agree; the same Keras layer with
    other masks (here: none, Keras' cell at rate 0) is caught before it is timed."""

    class NoMasks(contenders.KerasContender):
        name = label = "no_masks"

        def make_model(self, work):
            import dataclasses
            plain = dataclasses.replace(work, config=CONFIGS["all_trainable"])
            return super().make_model(plain)

    monkeypatch.setitem(contenders.REGISTRY, "no_masks", NoMasks())
    rc, data = _run(tmp_path, "--cells", cell, "--configs", "dropout",
                    "--impls", "tfcells,keras,no_masks,torch")
    by = {r["impl"]: r for r in data["records"]}
    assert rc == 1
    assert by["tfcells"]["status"] == "ok" and by["keras"]["status"] == "ok"
    assert by["no_masks"]["status"] == "mismatch"
    # PyTorch's nn.LSTM has no recurrent dropout (where it is installed at all).
    assert by["torch"]["status"] == "skipped"
    assert any(w in by["torch"]["detail"] for w in ("recurrent dropout", "not installed"))


def test_reference_alone_against_everyone_is_unverified(tmp_path, monkeypatch):
    monkeypatch.setitem(contenders.REGISTRY, "wrong_gates", _WrongGates())
    rc, data = _run(tmp_path, "--cells", "lstm", "--configs", "inference",
                    "--impls", "wrong_gates,keras")
    by = {r["impl"]: r for r in data["records"]}
    assert rc == 1
    assert by["wrong_gates"]["status"] == "unverified"
    assert by["keras"]["status"] == "mismatch"


def test_flop_model_shares():
    """I = H: a training step is 6 equal GEMM units; frozen matrices and dx remove them."""
    s = Shape(T=7, B=3, I=16, H=16)
    for cell in ("lstm", "gru", "simple_rnn"):
        base = floor.flops(cell, CONFIGS["all_trainable"], s)
        share = {c: floor.flops(cell, CONFIGS[c], s) / base for c in CONFIGS}
        assert share["kernel_frozen"] == pytest.approx(5 / 6)
        assert share["recurrent_frozen"] == pytest.approx(5 / 6)
        assert share["both_frozen"] == pytest.approx(4 / 6)
        assert share["both_frozen_no_dx"] == pytest.approx(3 / 6)
        assert share["inference"] == pytest.approx(2 / 6)
        assert share["frozen_layer_in_stack"] == pytest.approx(7 / 6)  # 2 fwd + 5 of layer 2
        assert share["dropout"] == pytest.approx(1)  # gate by gate, the same products


def test_floor_runs_its_gemms():
    paths = floor.floor_callables("gru", CONFIGS["all_trainable"], Shape(2, 3, 4, 5), "float32")
    assert sorted(paths) == ["numpy", "tfcells", "tfcells_units"]
    for fn in paths.values():
        fn()  # shapes must line up: a wrong Gemm raises here
    labels = [g.label for g in floor.gemms("gru", CONFIGS["both_frozen_no_dx"], Shape(2, 3, 4, 5))]
    assert labels == ["x·W_x", "h·W_h", "dG·W_hᵀ"]


def test_plot(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    rc = cli.main([*TINY, "--cells", "simple_rnn", "--configs", "all_trainable",
                   "--impls", "tfcells", "--plot", "bench.png", "--json", "bench.json"])
    assert rc == 0
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each file written is named, with its full path, on stderr (stdout is the report).
    err = capsys.readouterr().err
    assert f"wrote plot: {tmp_path / 'bench.png'}" in err
    assert f"wrote JSON: {tmp_path / 'bench.json'}" in err


def test_help_says_what_runs(tmp_path, capsys):
    """--help states the default repetitions as the report states them and as they run, and
    what happens to the JSON and plot by default."""
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: no JSON is written" in text and "default: no plot is written" in text
    per_block = int(re.search(r"default: \d+ = 2 x (\d+) quick", text).group(1))
    path = tmp_path / "bench.json"
    rc = cli.main([a for a in TINY if a not in ("--reps", "1")] +
                  ["--cells", "simple_rnn", "--configs", "inference", "--impls", "tfcells",
                   "--budget", "0", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"0 warm-up and {per_block} repetitions" in out
    records = json.loads(path.read_text())["records"]
    assert [r["reps"] for r in records] == [per_block]


def _rec(impl, config="all_trainable", median=10.0, other=None, floor_ms=8.0,
         floor_other=None):
    return {"cell": "lstm", "dtype": "float32", "device": "cpu", "T": 4, "B": 2, "I": 3,
            "H": 5, "sweep": None, "config": config, "impl": impl, "status": "ok",
            "median_ms": median, "iqr_ms": 0.2, "q1_ms": median - 0.1, "q3_ms": median + 0.1,
            "flops": 1e6 if config == "all_trainable" else 5e5, "floor_ms": floor_ms,
            "floor_other_cores": floor_other, "other_cores": other,
            "floor_ratio": floor_ms / median, "detail": ""}


def test_flags_floor_above_one_and_disturbed_inputs():
    """A floor ratio above 1 is flagged though no block was seen disturbed (short blocks are
    not measured), and so is every ratio with a disturbed input, in the JSON and the table."""
    recs = report.annotate([
        _rec("tfcells", median=7.5),                    # floor 8 > 7.5: ratio 1.07
        _rec("keras", median=20.0, other=1.5),          # disturbed
        _rec("tfcells", "inference", median=3.0, floor_ms=2.0),
        _rec("keras", "inference", median=6.0, floor_ms=2.0)])
    by = {(r["config"], r["impl"]): r for r in recs}
    assert by["all_trainable", "tfcells"]["flags"] == ["floor_ratio_above_1"]
    assert by["all_trainable", "keras"]["flags"] == ["disturbed", "vs_tfcells_disturbed",
                                                      "vs_all_trainable_disturbed"]
    assert by["inference", "keras"]["flags"] == ["vs_all_trainable_disturbed"]
    assert by["inference", "tfcells"]["flags"] == []
    assert by["inference", "keras"]["vs_tfcells"] == pytest.approx(2.0)
    assert by["inference", "tfcells"]["vs_all_trainable"] == pytest.approx(0.4)
    table = report._main_table(report._groups(recs, sweep=False)[
        ("lstm", "float32", "cpu", 4, 2, 3, 5)], wide=True)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "| 1.07 ⚠ |" in rows["all_trainable"]       # floor ratio tfcells
    assert "| 2.67× ⚠ |" in rows["all_trainable"]      # keras ÷ tfcells, keras disturbed
    assert "| 0.400 ⚠ |" in rows["all_trainable"]      # floor ratio keras
    assert "| 2.00× |" in rows["inference"]
    assert "| 0.40 (0.50) |" in rows["inference"]       # tfcells ÷ all_trainable, clean
    assert "⚠" not in rows["inference"].split(" | ")[-1]


def test_compact_and_wide_tables(tmp_path, capsys):
    """The default table is compact; --wide adds GEMM GFLOP, the spread, tfcells ÷
    all_trainable and every floor ratio; the JSON has all of those either way."""
    rc, data = _run(tmp_path, "--cells", "lstm", "--configs", "all_trainable,inference",
                    "--impls", "tfcells,keras")
    compact = capsys.readouterr().out
    rc_wide = cli.main([*TINY, "--cells", "lstm", "--configs", "all_trainable,inference",
                        "--impls", "tfcells,keras", "--wide"])
    wide = capsys.readouterr().out
    assert rc == rc_wide == 0
    header = [line for line in compact.splitlines() if line.startswith("| config |")]
    assert header == ["| config | floor ms | tfcells ms | keras ms | keras ÷ tfcells | "
                      "floor ratio tfcells |"]
    assert "±" not in compact.split("## lstm")[1].split("Times are")[0]
    header = [line for line in wide.splitlines() if line.startswith("| config |")]
    assert header == ["| config | GEMM GFLOP | floor ms | tfcells ms | keras ms | "
                      "keras ÷ tfcells | tfcells ÷ all_trainable (FLOP model) | "
                      "floor ratio tfcells | floor ratio keras |"]
    for r in data["records"]:
        assert {"iqr_ms", "flops", "floor_ratio", "vs_tfcells", "vs_all_trainable",
                "flops_vs_all_trainable", "flags"} <= set(r)


def test_memory_of_every_contender(tmp_path, capsys):
    """Each contender's step of the first configuration runs again in a fresh process that
    reports its RSS peak; the report shows it, the JSON has it and how it was taken."""
    path = tmp_path / "bench.json"
    rc = cli.main([a for a in TINY if a != "--no-memory"] +
                  ["--cells", "simple_rnn", "--configs", "all_trainable,inference",
                   "--impls", "tfcells,keras", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["meta"]["settings"]["memory"]["method"] == memory.METHOD
    by = {(r["config"], r["impl"]): r for r in data["records"]}
    for impl in ("tfcells", "keras"):
        r = by["all_trainable", impl]
        assert "rss_error" not in r, r["rss_error"]
        assert r["rss_peak_mb"] > 0 and r["rss_steps"] >= 1 and r["rss_method"] == memory.METHOD
        assert "rss_peak_mb" not in by["inference", impl]  # the first configuration only
    assert re.search(r"Memory, all_trainable step \(.*\): tfcells \d+ MB, keras \d+ MB\.",
                     out)


class _Hog(contenders.Contender):
    """A step that keeps 64 MB more alive after every call, up to 192 MB."""

    name = label = "hog"

    def build(self, work):
        held = []

        def run():
            if len(held) < 3:
                held.append(np.ones(2**24, np.float32))
            return None

        return contenders.Step(run, lambda raw: {}, "numpy")


def test_memory_child_sees_what_a_step_holds(monkeypatch):
    """memory.child counts what the warm steps keep, above the baseline it reads before the
    build (here in this process: the fresh process is measure_all's business)."""
    monkeypatch.setitem(contenders.REGISTRY, "hog", _Hog())
    spec = {"cell": "simple_rnn", "config": "all_trainable", "impl": "hog",
            "shape": {"T": 2, "B": 2, "I": 3, "H": 4}, "dtype": "float32", "device": "cpu",
            "threads": None}
    out = memory.child(spec)
    assert out["rss_peak_mb"] >= 3 * 64 - 8, out
    assert out["rss_first_call_peak_mb"] < out["rss_peak_mb"] - 64, out
    # A contender the fresh process does not know is reported, not fatal.
    task = runner.Task("simple_rnn", CONFIGS["all_trainable"], Shape(2, 2, 3, 4))
    [res] = memory.measure_all([(task, "hog", "float32", "cpu", None)])
    assert "no contender 'hog'" in res["rss_error"]


def test_build_info_says_whether_gpu_kernels_run(monkeypatch):
    """A CUDA build of tfcells under tensorflow-cpu (nvcc on a CPU-only machine) has GPU
    kernels that cannot run: build_info says so, and the report repeats it."""
    info = tfcells.build_info()
    assert isinstance(info["gpu_kernels_usable"], bool)
    assert (info["gpu_kernels_reason"] is None) == info["gpu_kernels_usable"]
    if tf.test.is_built_with_cuda():
        pytest.skip("this TensorFlow is a CUDA build")
    from tfcells import _build_info

    monkeypatch.setattr(_build_info, "CUDA", True)
    info = tfcells.build_info()
    assert info["cuda"] is True and info["gpu_kernels_usable"] is False
    assert "not a CUDA build" in info["gpu_kernels_reason"]
    text = report._build_text({"tfcells_build": info})
    assert text.startswith("tfcells' CUDA kernels are built but cannot run here")


@pytest.mark.parametrize("argv,orig_argv,expected", [
    (["/venv/bin/tfcells-bench", "--quick"], None, True),
    (["-m"], ["python", "-m", "tfcells.benchmarks", "--full"], True),
    (["-m"], ["python3", "-X", "utf8", "-mbenchmarks"], True),
    (["-m"], ["python", "-m", "pytest", "tests"], False),
    (["-c"], ["python", "-c", "import tfcells"], False),
    (["train.py"], ["python", "train.py", "-m", "benchmarks"], False),
])
def test_started_as_benchmark(argv, orig_argv, expected):
    from tfcells.benchmarks import started_as_benchmark

    assert started_as_benchmark(argv, orig_argv or ["python", *argv]) is expected


def test_every_entry_point_is_quiet():
    """TensorFlow's start-up notices (printed while it imports) stay out of the console
    script's output, as out of python -m benchmarks'; a program importing tfcells keeps them
    (its own TF_CPP_MIN_LOG_LEVEL is left alone)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    script = os.path.join(os.path.dirname(sys.executable), "tfcells-bench")
    cmd = [script] if os.path.exists(script) else [sys.executable, "-m", "tfcells.benchmarks"]
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import os, tfcells; "
                           "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip() == "None"


def test_full_sweeps(tmp_path, capsys):
    rc, data = _run(tmp_path, "--full", "--shape", "4,4,4,4", "--cells", "simple_rnn",
                    "--configs", "all_trainable", "--impls", "tfcells")
    assert rc == 0
    sweeps = {}
    for r in data["records"]:
        if r["sweep"]:
            sweeps.setdefault(r["sweep"], []).append(r)
    assert {d: sorted(r[d] for r in rs) for d, rs in sweeps.items()} == \
        {"T": [1, 2, 4, 8], "B": [1, 2, 4, 8], "H": [1, 2, 4, 8]}
    assert all(r["I"] == r["H"] for r in sweeps["H"])
    out = capsys.readouterr().out
    assert "time against T" in out
    # Compact sweep tables too (--wide adds GEMM GFLOP and every floor ratio).
    assert "| T | floor ms | tfcells ms | floor ratio tfcells |" in out


def test_gpu_without_gpu_says_so(capsys):
    from tfcells.benchmarks import gpu

    suite, _ = gpu.which_suite()
    if suite is not None:
        pytest.skip(f"this machine runs the {suite} GPU suite")
    assert cli.main([*TINY, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "no GPU suite can run here" in err
    assert "The TensorFlow suite: TensorFlow sees no GPU" in err
    assert "The pybind11-vs-cuDNN suite: " in err


def test_fit_tiny(tmp_path, monkeypatch, capsys):
    """--fit on a tiny set: one record per (scenario, impl), the table, the loss check, and a
    frozen weight that trains after all is caught."""
    from tfcells.benchmarks import fit

    def _run_argv(tmp_path, argv):
        path = tmp_path / "fit.json"
        rc = cli.main([*argv, "--json", str(path)])
        with open(path) as f:
            return rc, json.load(f)

    tiny = ["--fit", "--fit-samples", "64", "--fit-len", "6", "--fit-epochs", "1",
            "--no-progress"]
    scenarios = ("frozen_embedding", "first_lstm_kernel_frozen", "dropout")
    rc, data = _run_argv(tmp_path, [*tiny, "--fit-scenarios", ",".join(scenarios)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert data["meta"]["settings"]["fit"]["samples"] == 64
    by = {(r["config"], r["impl"]): r for r in data["records"]}
    # dropout runs fused in model.fit (that the masks equal Keras' is test_layers' business:
    # on this tiny set the loss barely depends on them).
    assert set(by) == {(s, i) for s in scenarios for i in ("keras", "tfcells")}
    for r in by.values():
        assert (r["cell"], r["status"], r["T"], r["B"]) == ("model", "ok", 6, 64), r
        assert r["samples_per_s"] > 0 and r["median_ms"] > 0 and r["reps"] == 1
        assert r["frozen_bit_identical"] is True
        assert r["check"]["loss_rel_diff"] <= fit.LOSS_RTOL
        assert not r.get("fused_fallback")
    assert "| scenario | keras samples/s | tfcells samples/s |" in out
    assert "| frozen_embedding |" in out and "bit-identical" in out

    # A tfcells model whose "frozen" first LSTM trains after all: not timed, exit status 1.
    init = fit._Model.__init__

    def unfreeze(self, impl, scenario, size, weights):
        init(self, impl, scenario, size, weights)
        if impl == "tfcells":
            self.lstm_1.trainable = True  # before fit traces: its weights now train

    monkeypatch.setattr(fit._Model, "__init__", unfreeze)
    rc, data = _run_argv(tmp_path, [*tiny, "--fit-scenarios", "first_lstm_frozen"])
    out = capsys.readouterr().out
    by = {r["impl"]: r for r in data["records"]}
    assert rc == 1
    assert by["keras"]["status"] == "ok"
    bad = by["tfcells"]
    assert bad["status"] == "mismatch" and bad["samples_per_s"] is None
    assert "lstm_1/kernel changed" in bad["detail"]
    assert "MISMATCH" in out and "CHANGED" in out


def test_short_blocks_get_their_task_contention():
    """Blocks too short for OtherWork (< 0.5 s) still get a contention figure, the task's, so
    a loaded machine cannot leave tiny steps unflagged."""
    task = runner.Task("simple_rnn", CONFIGS["inference"], Shape(2, 2, 3, 4))
    recs = runner.run_task(task, ["tfcells", "keras"], "float32", "cpu", reps=2, warmup=0)
    for r in recs:
        assert r["status"] == "ok" and r["median_ms"] < 500
        assert r["other_cores"] is not None and r["other_cores_over"] == "task"
        assert r["floor_other_cores"] is not None and r["floor_other_cores_over"] == "task"


class _SeesPolicy(contenders.KerasContender):
    """Keras' layer, noting the global dtype policy its model is built under."""

    name = label = "sees_policy"
    seen = []

    def make_model(self, work):
        import keras
        self.seen.append(keras.mixed_precision.dtype_policy().name)
        return super().make_model(work)


class _FailsUnderPolicy(contenders.KerasContender):
    """Raises while its model is built, under the mixed policy."""

    name = label = "fails"

    def make_model(self, work):
        raise RuntimeError("broken on purpose")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_run(tmp_path, monkeypatch, capsys, dtype):
    """--dtype bfloat16 / float16: 16-bit records; Keras' layer (under the mixed policy) and
    tfcells' op agree within the 16-bit tolerance, a wrong contender is still caught; BlockLSTM
    says why it cannot; the floor says which dtype's GEMMs it is; and Keras' global policy is
    float32 again afterwards, also after a contender that failed under the policy."""
    import keras

    from tfcells.benchmarks import check

    assert keras.mixed_precision.dtype_policy().name == "float32"
    _SeesPolicy.seen = []
    monkeypatch.setitem(contenders.REGISTRY, "sees_policy", _SeesPolicy())
    monkeypatch.setitem(contenders.REGISTRY, "fails", _FailsUnderPolicy())
    monkeypatch.setitem(contenders.REGISTRY, "wrong_gates", _WrongGates())
    rc, data = _run(tmp_path, "--dtype", dtype, "--cells", "lstm",
                    "--configs", "all_trainable,inference",
                    "--impls", "tfcells,keras,blocklstm,torch,sees_policy,fails,wrong_gates")
    out = capsys.readouterr().out
    assert keras.mixed_precision.dtype_policy().name == "float32"
    assert rc == 1  # the failing and the wrong contender
    assert data["meta"]["settings"]["dtype"] == dtype
    assert data["meta"]["settings"]["tolerance"] == check.TOLERANCE[dtype]
    by = {(r["config"], r["impl"]): r for r in data["records"]}
    for config in ("all_trainable", "inference"):
        assert {r["dtype"] for (c, _), r in by.items() if c == config} == {dtype}
        assert by[config, "tfcells"]["status"] == "ok", by[config, "tfcells"]
        keras_rec = by[config, "keras"]
        assert keras_rec["status"] == "ok", keras_rec
        errors = keras_rec["check"]["max_rel_err"]
        assert keras_rec["check"]["reference"] == "tfcells"
        assert set(errors) == ({"y", "kernel", "recurrent_kernel", "bias", "x"}
                               if config == "all_trainable" else {"y"})
        assert max(errors.values()) <= check.TOLERANCE[dtype]
        assert by[config, "wrong_gates"]["status"] == "mismatch"
        assert by[config, "fails"]["status"] == "error"
        assert "broken on purpose" in by[config, "fails"]["detail"]
        blocklstm = by[config, "blocklstm"]
        assert blocklstm["status"] == "skipped" and "mixed precision" in blocklstm["detail"]
        assert by[config, "torch"]["status"] in ("ok", "skipped")
        if by[config, "torch"]["status"] == "skipped":
            assert by[config, "torch"]["detail"]
        # The floor: float32 GEMMs (what tfcells computes in) and 16-bit ones, the faster.
        rec = by[config, "tfcells"]
        paths = rec["floor_paths"]
        assert {p["dtype"] for p in paths.values()} == {"float32", dtype}
        assert paths["tf_" + dtype]["dtype"] == dtype
        fastest = min(paths, key=lambda k: paths[k]["median_ms"])
        assert rec["floor_path"] == fastest
        assert rec["floor_dtype"] == paths[fastest]["dtype"]
        assert rec["floor_ms"] == paths[fastest]["median_ms"]
    # The Keras-layer contender was built under the mixed policy, each time.
    assert _SeesPolicy.seen == [f"mixed_{dtype}"] * 2
    assert f"## lstm: T=3 B=2 I=4 H=5, {dtype}, cpu" in out
    assert "Floor: " in out and f"{dtype} GEMMs" in out


def test_mixed_precision_contenders():
    """A 16-bit workload: float32 weights, 16-bit data; Keras' layer computes and outputs
    in the 16-bit dtype with float32 variables, tfcells' op outputs 16-bit, and the policy is
    float32 again once the step is built and traced."""
    import keras

    from tfcells.benchmarks.workload import make_workload

    work = make_workload("gru", CONFIGS["all_trainable"], Shape(3, 2, 4, 5), "bfloat16")
    assert work.x.dtype.name == work.dy.dtype.name == "bfloat16"
    assert {w.dtype.name for w in work.weights[0].values()} == {"float32"}
    for impl in ("keras", "tfcells"):
        con = contenders.REGISTRY[impl]
        with contenders.keras_policy(con.policy(work)):
            _, variables, _ = con.make_model(work)
        assert variables and all(v.dtype == tf.float32 for v in variables.values()), impl
        step = con.build(work)
        assert keras.mixed_precision.dtype_policy().name == "float32"
        y, grads = step.run()
        assert y.dtype == tf.bfloat16, impl
        # Weight gradients in float32 (the variables'), dx in x's dtype.
        dtypes = dict(zip(work.grads, (g.dtype for g in grads)))
        assert dtypes == {"kernel": tf.float32, "recurrent_kernel": tf.float32,
                          "bias": tf.float32, "x": tf.bfloat16}, impl


def test_floor_16bit_paths():
    """A 16-bit floor times float32 GEMMs on both paths and the same products in bfloat16
    through tf.matmul, and, where tfcells' bfloat16 calls multiply bfloat16 pairs, tfcells' own
    path on pairs (else the op could beat its own floor); each path's dtype is known."""
    from tfcells import _tfcells_core

    shape = Shape(2, 3, 4, 5)
    paths = floor.floor_callables("lstm", CONFIGS["all_trainable"], shape, "bfloat16")
    pairs = ["tfcells_bf16_pairs"] if _tfcells_core.cpu_bf16_products() else []
    assert sorted(paths) == sorted(["numpy", "tf_bfloat16", "tfcells", "tfcells_units"] + pairs)
    for fn in paths.values():
        fn()
    assert {p: floor.path_dtype(p, "bfloat16") for p in paths} == {
        "numpy": "float32", "tf_bfloat16": "bfloat16", "tfcells": "float32",
        "tfcells_units": "float32", **{p: "bfloat16" for p in pairs}}
    assert sorted(floor.floor_callables("lstm", CONFIGS["all_trainable"], shape, "float16")) == \
        ["numpy", "tf_float16", "tfcells", "tfcells_units"]
    assert sorted(floor.floor_callables("lstm", CONFIGS["inference"], shape, "float32")) == \
        ["numpy", "tfcells", "tfcells_units"]


def test_fit_refuses_16bit(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--fit", "--dtype", "bfloat16"])
    assert "--fit does not use --dtype" in capsys.readouterr().err
