"""The GPU benchmark suite's parts that run without a GPU: the Keras -> PyTorch weight mapping
its value check relies on (against tfcells' CPU op), the pybind11 calls of its tfcells_cuda
step up to the device query, the records and table of the whole suite with CPU stand-ins for
both contenders, and the derived numbers. No timing is asserted.

Collected without TensorFlow too (a GPU machine with PyTorch alone): the tests that run tfcells'
TensorFlow op import it themselves, and skip without it. With TFCELLS_REQUIRE_GPU=1 (the GPU
run), what a GPU run needs and lacks (PyTorch, the CUDA module, a GPU) fails instead of
skipping."""

import dataclasses
import json
import os

import numpy as np
import pytest

import tfcells
from tfcells.benchmarks import check, cli, contenders, gpu, timing, torchmap
from tfcells.benchmarks.workload import CONFIGS, Shape, make_workload, weight_dtype

REQUIRE_GPU = os.environ.get("TFCELLS_REQUIRE_GPU") == "1"

try:
    import torch
except ImportError:
    torch = None


def _missing(reason):
    """Skips, or fails under TFCELLS_REQUIRE_GPU=1 (the GPU run must not pass by skipping)."""
    if REQUIRE_GPU:
        pytest.fail(f"TFCELLS_REQUIRE_GPU=1, but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def needs_torch_fixture():
    if torch is None:
        _missing("PyTorch is not installed (optional)")


needs_torch = pytest.mark.usefixtures("needs_torch_fixture")


def _tf():
    """TensorFlow, for the tests that run tfcells' TensorFlow op; they skip without it."""
    return pytest.importorskip("tensorflow", reason="TensorFlow is not installed here")

TINY = Shape(T=5, B=3, I=4, H=6)
CELLS = ("lstm", "gru", "simple_rnn")


# ------------------------------------------------------------ the weight mapping


def _problem(cell, seed=1):
    """The workload's weights, x and dy, plus non-zero initial states and incoming gradients
    of the final states, so that every mapped tensor matters."""
    work = make_workload(cell, CONFIGS["all_trainable"], TINY, "float32", seed=seed)
    rng = np.random.default_rng(seed + 1)
    n_states = 2 if cell == "lstm" else 1
    states = [rng.standard_normal([TINY.B, TINY.H]).astype("float32") * 0.5
              for _ in range(n_states)]
    d_states = [rng.standard_normal([TINY.B, TINY.H]).astype("float32")
                for _ in range(n_states)]
    return work, states, d_states


def _tfcells_cpu(cell, work, states, d_states):
    """y, final states and every gradient of sum(y·dy) + sum(final states · d_states)."""
    tf = _tf()
    w = work.weights[0]
    x = tf.constant(work.x)
    s = [tf.constant(v) for v in states]
    weights = [tf.Variable(w[n]) for n in ("kernel", "recurrent_kernel", "bias")]
    with tf.GradientTape() as tape:
        tape.watch([x, *s])
        y, *finals = getattr(tfcells.ops, cell)(x, *s, *weights)
        loss = tf.reduce_sum(y * work.dy) + sum(
            tf.reduce_sum(f * d) for f, d in zip(finals, d_states))
    grads = tape.gradient(loss, [x, *s, *weights])
    names = ["x", "h0", "c0"][:1 + len(s)] + ["kernel", "recurrent_kernel", "bias"]
    out = {n: g.numpy() for n, g in zip(names, grads)}
    out.update(y=y.numpy(), h_last=finals[0].numpy())
    if cell == "lstm":
        out["c_last"] = finals[1].numpy()
    return out


def _torch_cpu(cell, work, states, d_states):
    """The same through torchmap: torch.nn.LSTM/GRU/RNN on the CPU, gradients mapped back."""
    trainable = ("kernel", "recurrent_kernel", "bias")
    module = torchmap.make_module(torch, cell, work.weights[0], trainable, torch.float32, "cpu")
    x = torch.from_numpy(work.x).requires_grad_(True)
    s = [torch.from_numpy(v[None]).requires_grad_(True) for v in states]  # [1, B, H]
    y, finals = module(x, tuple(s) if cell == "lstm" else s[0])
    finals = list(finals) if cell == "lstm" else [finals]
    loss = (y * torch.from_numpy(work.dy)).sum() + sum(
        (f[0] * torch.from_numpy(d)).sum() for f, d in zip(finals, d_states))
    params = {n: [getattr(module, p) for p in torchmap.params_of(cell, n)] for n in trainable}
    sources = [x, *s] + [p for n in trainable for p in params[n]]
    grads = [g.numpy() for g in torch.autograd.grad(loss, sources)]
    out = {"x": grads.pop(0), "h0": grads.pop(0)[0]}
    if cell == "lstm":
        out["c0"] = grads.pop(0)[0]
    for n in trainable:
        out[n] = torchmap.to_keras(cell, [grads.pop(0) for _ in params[n]])
    out.update(y=y.detach().numpy(), h_last=finals[0][0].detach().numpy())
    if cell == "lstm":
        out["c_last"] = finals[1][0].detach().numpy()
    return out


def _errors(got, want):
    assert set(got) == set(want)
    return {n: check.relative_error(got[n], want[n].astype(np.float64)) for n in want}


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_torch_mapping_matches_tfcells_cpu(cell):
    """Keras-layout weights mapped into PyTorch compute tfcells' outputs, final states and
    gradients (x, initial states, and each weight mapped back to Keras' layout)."""
    problem = _problem(cell)
    errors = _errors(_torch_cpu(cell, *problem), _tfcells_cpu(cell, *problem))
    assert max(errors.values()) < 1e-5, errors


@needs_torch
def test_mapping_check_catches_an_unswapped_gru(monkeypatch):
    """The comparison above can fail: GRU weights loaded without swapping z and r."""
    problem = _problem("gru")
    want = _tfcells_cpu("gru", *problem)
    monkeypatch.setattr(torchmap, "_blocks", lambda cell, a: a)
    errors = _errors(_torch_cpu("gru", *problem), want)
    assert errors["y"] > 1e-2 and errors["kernel"] > 1e-2, errors


@needs_torch
@pytest.mark.parametrize("cell", CELLS)
def test_cudnn_contender_computes_tfcells_numbers_per_config(cell):
    """The PyTorch code the cuDNN contender runs (here on the CPU) against tfcells' step in
    every configuration of the GPU suite: the gradients it returns are exactly the configuration's,
    and they agree."""
    _tf()
    for config in gpu.CONFIGS:
        work = make_workload(cell, CONFIGS[config], TINY, "float32")
        ours = contenders.TfcellsContender().build(work)
        theirs = contenders.TorchContender().build(work)
        want = ours.fetch(ours.run())
        got = theirs.fetch(theirs.run())
        assert set(got) - {"h_last", "c_last"} == {"y", *work.grads}, config
        ok, errors, message = check.compare(got, want, "float32")
        assert ok, (config, message)
        assert max(errors.values()) < 1e-5, (config, errors)


# ------------------------------------------- the tfcells_cuda step's pybind11 calls


class _FakeDeviceArray:
    """Passes the module's array checks; fails at its device query (no GPU here)."""

    def __init__(self, shape, typestr):
        self.shape = tuple(int(s) for s in shape)
        self.__cuda_array_interface__ = dict(shape=self.shape, typestr=typestr,
                                             data=(1 << 20, False), strides=None, version=3)


class _FakeArrays:
    """gpu._TorchArrays' interface: storage arrays in the storage type (bfloat16 as the int16
    bits the module takes), compute arrays in float32 for a 16-bit dtype."""

    _STORAGE = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<i2"}

    def __init__(self, dtype):
        self.storage = self._STORAGE[dtype]
        self.compute = self._STORAGE[weight_dtype(dtype)]

    def put(self, a):
        return _FakeDeviceArray(a.shape, np.asarray(a).dtype.str)

    def put_storage(self, a):
        return _FakeDeviceArray(a.shape, self.storage)

    def empty(self, *shape):
        return _FakeDeviceArray(shape, self.compute)

    def empty_storage(self, *shape):
        return _FakeDeviceArray(shape, self.storage)

    def arg(self, t):
        return t

    def blas_workspace(self, module):
        return _FakeDeviceArray((32 << 20,), "|u1")

    def get(self, a):
        return np.zeros(a.shape)

    stream = 0


def _cuda_module_or_skip():
    try:  # the installed package's, else $TFCELLS_CUDA_MODULE_DIR's (a CMake build)
        module = gpu._import_cuda_module()
    except ImportError as e:
        _missing(f"this tfcells build has no CUDA module ({e})")
    if module.device_count() > 0:
        pytest.skip("a GPU is present: fake pointers would be queried for real")
    return module


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("cell", CELLS)
def test_tfcells_cuda_step_calls_pass_the_argument_checks(cell, dtype):
    """Every forward and backward call the step makes has the module's argument names, and
    arrays of the shapes and sizes it requires: the calls fail only where the device is
    queried. (A wrong keyword is a TypeError, a wrong shape or size a ValueError.)"""
    module = _cuda_module_or_skip()
    bits = {"x": module.GRAD_X, "kernel": module.GRAD_KERNEL,
            "recurrent_kernel": module.GRAD_RECURRENT_KERNEL, "bias": module.GRAD_BIAS}
    for config in gpu.CONFIGS:
        work = make_workload(cell, CONFIGS[config], TINY, dtype)
        step = gpu.TfcellsCudaStep(module, _FakeArrays(dtype), work, allow_tf32=False)
        assert step.grad_mask == sum(bits[n] for n in work.grads)
        for call in (step.forward, step.backward):
            with pytest.raises(RuntimeError, match="cannot query its memory"):
                call()
        states = {"h_last", "c_last"} if cell == "lstm" else {"h_last"}
        assert set(step.fetch(None)) == {"y", *states, *work.grads}


# ------------------------------------------ the suite end to end, CPU stand-ins


class _CpuTfcells(contenders.TfcellsContender):
    """tfcells' CPU op in the role of tfcells_cuda."""

    name, label = "tfcells_cuda", "tfcells CUDA"

    def build(self, work):
        return super().build(dataclasses.replace(work, device="cpu"))


class _CpuTorch(gpu.CudnnContender):
    """The cuDNN contender's code on the CPU, timed by the wall clock."""

    measure = staticmethod(timing.measure)

    def unavailable(self):
        return None

    def unsupported(self, work):
        return super().unsupported(dataclasses.replace(work, device="cpu"))

    def build(self, work):
        return super().build(dataclasses.replace(work, device="cpu"))


class _CpuTorchWrongGates(_CpuTorch):
    def layer_weights(self, work, layer):
        w = dict(work.weights[layer])
        w["recurrent_kernel"] = np.concatenate(
            np.split(w["recurrent_kernel"], 4, axis=1)[::-1], axis=1)
        return w


FACTS = {"name": "NVIDIA H100 80GB HBM3", "peak_tflops": 67.0,
         "peak_source": "H100 SXM datasheet", "cublas": "libcublas.so.12", "cudnn": 91000,
         "torch": "2.x", "cuda": "12.x", "tf32": False}
ARGS = ["--device", "gpu", "--shape", "3,2,4,5", "--cells", "lstm", "--reps", "2",
        "--warmup", "0", "--no-progress"]


@pytest.fixture
def fake_gpu(monkeypatch):
    """cli's cuda_module suite with both contenders replaced by CPU stand-ins."""
    _tf()  # the tfcells stand-in is the TensorFlow op
    monkeypatch.setattr(gpu, "which_suite", lambda: ("cuda_module", None))
    monkeypatch.setattr(gpu, "device_facts", lambda dtype, tf32: dict(FACTS, tf32=tf32))
    monkeypatch.setitem(gpu.REGISTRY, "tfcells_cuda", _CpuTfcells())
    monkeypatch.setitem(gpu.REGISTRY, "cudnn", _CpuTorch())
    return monkeypatch


@needs_torch
def test_cuda_module_suite_records_and_table(fake_gpu, tmp_path, capsys):
    path, png = tmp_path / "gpu.json", tmp_path / "gpu.png"
    argv = [*ARGS, "--configs", "all_trainable,both_frozen_no_dx", "--json", str(path)]
    try:
        import matplotlib  # noqa: F401
        plot = True
    except ImportError:
        plot = False
    rc = cli.main(argv + ["--plot", str(png)] * plot)
    out = capsys.readouterr().out
    assert rc == 0, out
    with open(path) as f:
        data = json.load(f)
    assert data["meta"]["gpu"]["name"] == FACTS["name"]
    assert data["meta"]["settings"]["suite"] == "cuda_module"
    by = {(r["config"], r["impl"]): r for r in data["records"]}
    assert set(by) == {(c, i) for c in ("all_trainable", "both_frozen_no_dx")
                       for i in ("tfcells_cuda", "cudnn")}
    for (config, impl), r in by.items():
        assert (r["cell"], r["T"], r["B"], r["I"], r["H"], r["dtype"], r["device"]) == \
            ("lstm", 3, 2, 4, 5, "float32", "gpu")
        # --reps 2: two blocks of one repetition each (runner.run_task), the faster counts
        assert r["status"] == "ok" and r["reps"] == 1 and r["tf32"] is False
        assert len(r["block_medians_ms"]) == 2 and r["median_ms"] == min(r["block_medians_ms"])
        assert r["median_ms"] > 0 and r["iqr_ms"] >= 0 and r["floor_ms"] is None
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_ms"] / 1e9)
        assert r["peak_fraction"] == pytest.approx(r["tflops"] / 67.0)
        cudnn = by[config, "cudnn"]["median_ms"]
        assert r["vs_cudnn"] == pytest.approx(r["median_ms"] / cudnn)
        full = by["all_trainable", "cudnn"]["median_ms"]
        assert r["vs_cudnn_all_trainable"] == pytest.approx(r["median_ms"] / full)
        assert r["check"]["reference"] == "tfcells_cuda"
    # Checked: everything the reference returns (the CPU stand-in has no final states).
    assert set(by["both_frozen_no_dx", "cudnn"]["check"]["max_rel_err"]) == {"y", "bias"}
    # No GEMM floor columns: the floor is a CPU measurement.
    assert "| config | GEMM GFLOP | tfcells CUDA ms | cuDNN (PyTorch) ms |" in out
    assert "| both_frozen_no_dx |" in out and "H100 SXM datasheet" in out
    if plot:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_torch
def test_cuda_module_suite_mismatch_and_bad_options(fake_gpu, tmp_path, capsys):
    fake_gpu.setitem(gpu.REGISTRY, "cudnn", _CpuTorchWrongGates())
    path = tmp_path / "gpu.json"
    assert cli.main([*ARGS, "--configs", "all_trainable", "--json", str(path)]) == 1
    with open(path) as f:
        by = {r["impl"]: r for r in json.load(f)["records"]}
    assert by["cudnn"]["status"] == "mismatch" and by["cudnn"]["median_ms"] is None
    assert "y off by" in by["cudnn"]["detail"]
    assert by["tfcells_cuda"]["status"] == "unverified"
    assert "MISMATCH" in capsys.readouterr().out
    # What the suite cannot run is refused, with the reason.
    for argv in ([*ARGS, "--configs", "inference"], [*ARGS, "--impls", "keras"]):
        assert cli.main(argv) == 2, argv
        assert "not part of the cuda_module suite" in capsys.readouterr().err
    assert cli.main(["--device", "gpu", "--fit", "--no-progress"]) == 2
    assert "needs a TensorFlow that sees the GPU" in capsys.readouterr().err


@needs_torch
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_module_suite_runs_16bit(fake_gpu, tmp_path, capsys, dtype):
    """--dtype bfloat16|float16 reaches the suite's 16-bit calls, against the 16-bit tensor-core
    peak (a guard in the CLI once refused them, which only the H200 run found)."""
    fake_gpu.setattr(gpu, "device_facts", lambda dtype, tf32: dict(
        FACTS, peak_tflops=gpu.peak_for(FACTS["name"], dtype, tf32)[1], tf32=tf32))
    path = tmp_path / "gpu.json"
    rc = cli.main([*ARGS, "--configs", "all_trainable", "--dtype", dtype, "--json", str(path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out + captured.err
    with open(path) as f:
        by = {r["impl"]: r for r in json.load(f)["records"]}
    ours = by["tfcells_cuda"]
    assert ours["dtype"] == dtype and ours["median_ms"] > 0, ours
    assert ours["peak_fraction"] == pytest.approx(ours["tflops"] / 989.4)


# ----------------------------------------------------------- derived numbers


def _record(config, impl, median_ms, sweep=None, cell="lstm"):
    return {"cell": cell, "config": config, "impl": impl, "T": 100, "B": 64, "I": 1024,
            "H": 1024, "dtype": "float32", "sweep": sweep, "median_ms": median_ms,
            "flops": 2e12}


def test_annotate_ratios_and_rates():
    records = [_record("all_trainable", "tfcells_cuda", 10.0),
               _record("all_trainable", "cudnn", 8.0),
               _record("kernel_frozen", "tfcells_cuda", 6.0),
               _record("kernel_frozen", "cudnn", 12.0),
               _record("both_frozen", "tfcells_cuda", None),  # a mismatch: not timed
               _record("both_frozen", "cudnn", 4.0),
               # Same shape, but a sweep point: compared within the sweep only.
               _record("all_trainable", "tfcells_cuda", 20.0, sweep="T"),
               _record("all_trainable", "cudnn", 40.0, sweep="T")]
    gpu.annotate(records, peak_tflops=400.0, tf32=True)
    by = {(r["config"], r["impl"], r["sweep"]): r for r in records}
    ours = by["kernel_frozen", "tfcells_cuda", None]
    assert ours["tf32"] is True
    assert ours["tflops"] == pytest.approx(2e12 / 6e-3 / 1e12)
    assert ours["peak_fraction"] == pytest.approx(ours["tflops"] / 400.0)
    assert ours["vs_cudnn"] == pytest.approx(6 / 12)
    assert ours["vs_cudnn_all_trainable"] == pytest.approx(6 / 8)
    assert by["all_trainable", "cudnn", None]["vs_cudnn"] == pytest.approx(1)
    untimed = by["both_frozen", "tfcells_cuda", None]
    assert untimed["tflops"] is untimed["vs_cudnn"] is untimed["peak_fraction"] is None
    assert by["all_trainable", "tfcells_cuda", "T"]["vs_cudnn"] == pytest.approx(0.5)
    gpu.annotate(records, peak_tflops=None, tf32=False)
    assert all(r["peak_fraction"] is None for r in records)


def test_peaks():
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "float32", False) == ("H100 SXM", 67.0)
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "float32", True) == ("H100 SXM", 494.7)
    assert gpu.peak_for("NVIDIA H100 PCIe", "float32", False) == ("H100 PCIe", 51.2)
    assert gpu.peak_for("NVIDIA H200", "float32", True) == ("H200", 494.7)
    assert gpu.peak_for("NVIDIA H100 80GB HBM3", "float64", False) == (None, None)
    assert gpu.peak_for("Tesla T4", "float32", False) == (None, None)
    for half in ("bfloat16", "float16"):  # tensor cores, whatever the TF32 setting
        assert gpu.peak_for("NVIDIA H200", half, False) == ("H200", 989.4)
        assert gpu.peak_for("NVIDIA A100-SXM4-80GB", half, True) == ("A100", 312.0)


# ------------------------------------------------------------ a GPU machine without TensorFlow


def _without_tensorflow(script):
    """Runs `script` in a child process where importing tensorflow fails and no GPU is seen;
    returns (exit status, stdout, stderr)."""
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", 'import sys\nsys.modules["tensorflow"] = None\n'
                           + script], capture_output=True, text=True, timeout=180, env=env)
    return done.returncode, done.stdout, done.stderr


def test_gpu_suite_choice_without_tensorflow():
    """On a GPU machine with PyTorch but no TensorFlow, `import tfcells` still works (only its
    TensorFlow parts say why they are missing) and `--device gpu` reaches the pybind11 suite's
    checks (here they find no GPU: the child sees none)."""
    rc, out, err = _without_tensorflow("""
import tfcells
try:
    tfcells.LSTM
except ImportError as e:
    assert "needs TensorFlow" in str(e), e
else:
    raise AssertionError("tfcells.LSTM without TensorFlow")
from tfcells.benchmarks import cli, gpu
suite, why = gpu.which_suite()
assert suite is None and "TensorFlow does not import" in why, why
assert cli.main(["--device", "gpu", "--no-progress"]) == 2
print("ok")
""")
    assert rc == 0 and out.strip().endswith("ok"), (out + err)[-2000:]


def test_machine_facts_without_tensorflow():
    """The facts every benchmark run records (machine.info, with the thread counts) and
    --threads come out without TensorFlow: the GPU suite runs where it is absent."""
    rc, out, err = _without_tensorflow("""
from tfcells.benchmarks import machine
info = machine.info()
assert info["threads"]["tf_intra_op"] is None and info["threads"]["tf_inter_op"] is None
assert info["versions"]["tensorflow"] is None
warnings = machine.set_threads(1)  # TensorFlow's pools are not there to set
assert not any(w.startswith("TensorFlow thread pools") for w in warnings), warnings
print("ok")
""")
    assert rc == 0 and out.strip().endswith("ok"), (out + err)[-2000:]


def test_gpu_suite_runs_against_cudnn_on_a_gpu(tmp_path, capsys):
    """On a GPU: the suite end to end at a tiny shape, every cell and configuration, each
    contender's values checked against tfcells' CUDA kernels before it is timed (exit 0: no
    mismatch, error or unverified record). Where no GPU suite can run this skips, saying why
    (fails under TFCELLS_REQUIRE_GPU=1)."""
    suite, why = gpu.which_suite()
    if suite is None:
        _missing(why)
    path = tmp_path / "gpu.json"
    rc = cli.main(["--device", "gpu", "--shape", "5,3,4,6", "--reps", "2", "--warmup", "1",
                   "--no-progress", "--json", str(path)])
    assert rc == 0, capsys.readouterr().out[-4000:]
    with open(path) as f:
        records = json.load(f)["records"]
    assert {r["cell"] for r in records} == set(CELLS)
    assert all(r["status"] == "ok" for r in records if r["impl"].startswith("tfcells")), records
