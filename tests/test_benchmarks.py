"""The benchmark suite on tiny shapes: its records, its FLOP model, and that its value check
catches a contender that computes something else. No timing is asserted."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tfcells.benchmarks import cli, contenders, floor
from tfcells.benchmarks.workload import CONFIGS, Shape

TINY = ["--shape", "3,2,4,5", "--reps", "1", "--warmup", "0", "--no-progress"]
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
    assert sorted(paths) == ["numpy", "tfcells"]
    for fn in paths.values():
        fn()  # shapes must line up: a wrong Gemm raises here
    labels = [g.label for g in floor.gemms("gru", CONFIGS["both_frozen_no_dx"], Shape(2, 3, 4, 5))]
    assert labels == ["x·W_x", "h·W_h", "dG·W_hᵀ"]


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    rc = cli.main([*TINY, "--cells", "simple_rnn", "--configs", "all_trainable",
                   "--impls", "tfcells", "--plot", str(png)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert "time against T" in capsys.readouterr().out


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
