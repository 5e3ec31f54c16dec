"""The CUDA kernels: CUDA vs the CPU core, LSTM/GRU vs cuDNN (PyTorch), and bad input.

Most of this file needs a GPU, the `_tfcells_cuda` module and PyTorch or CuPy; without them
those tests are skipped with the reason. It runs without TensorFlow: the compiled modules are
taken from tfcells when it imports, else from $TFCELLS_CUDA_MODULE_DIR (a build directory,
e.g. one configured with -DTFCELLS_BUILD_TF_OPS=OFF on a GPU machine that has no TensorFlow).

What runs everywhere: the build check (with nvcc present, the CUDA code was compiled and the
GPU kernel library registers its kernels), and the module's checks of bad arrays that need no
device (fake __cuda_array_interface__ objects).
"""

import functools
import importlib
import inspect
import itertools
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

# ------------------------------------------------------------------------------ loading


def _import_compiled(name):
    """tfcells.<name>, else <name> from $TFCELLS_CUDA_MODULE_DIR; (module, why not)."""
    errors = []
    try:
        return importlib.import_module(f"tfcells.{name}"), None
    except Exception as e:  # tfcells absent, TensorFlow absent, module not built
        errors.append(f"tfcells.{name}: {type(e).__name__}: {e}")
    directory = os.environ.get("TFCELLS_CUDA_MODULE_DIR")
    if directory:
        sys.path.insert(0, directory)
        try:
            return importlib.import_module(name), None
        except Exception as e:
            errors.append(f"{name} from {directory}: {type(e).__name__}: {e}")
        finally:
            sys.path.remove(directory)
    else:
        errors.append("TFCELLS_CUDA_MODULE_DIR is not set")
    return None, "; ".join(errors)


cuda_module, CUDA_MODULE_MISSING = _import_compiled("_tfcells_cuda")
core_module, CORE_MODULE_MISSING = _import_compiled("_tfcells_core")

torch = cupy = None
try:
    import torch  # noqa: F811
    if not torch.cuda.is_available():
        torch = None
except Exception:
    torch = None
if torch is None:
    try:
        import cupy  # noqa: F811
        if cupy.cuda.runtime.getDeviceCount() == 0:
            cupy = None
    except Exception:
        cupy = None


# On the GPU run (tools/gpu_session.sh), a test that cannot run must fail it, not pass it by
# skipping: with TFCELLS_REQUIRE_GPU=1 every "no module / no GPU / no PyTorch" skip below is a
# failure with the same reason.
REQUIRE_GPU = os.environ.get("TFCELLS_REQUIRE_GPU") == "1"


def _gpu_state():
    """(skip, error): why the GPU tests cannot run on a machine without a GPU set-up, or the
    error of a GPU set-up that is broken (a CUDA error, cuBLAS not loading): that one fails the
    GPU tests everywhere. (None, None) when they can run."""
    if cuda_module is None:
        return f"the _tfcells_cuda module is not available ({CUDA_MODULE_MISSING})", None
    try:
        count = cuda_module.device_count()
    except RuntimeError as e:  # e.g. cudaErrorInsufficientDriver: an old driver
        return None, f"CUDA fails on this machine: {e}"
    if count == 0:
        v = cuda_module.cuda_versions()
        driver = (f"driver for CUDA {v['driver'] // 1000}.{v['driver'] % 1000 // 10}"
                  if v["driver"] else "no NVIDIA driver")
        return f"no CUDA GPU on this machine ({driver})", None
    if torch is None and cupy is None:
        return "neither PyTorch with CUDA nor CuPy is installed to hand device arrays over", None
    try:
        cuda_module.cublas_library()
    except RuntimeError as e:
        return None, f"a GPU is present but cuBLAS does not load: {e}"
    return None, None


GPU_SKIP, GPU_ERROR = _gpu_state()


def requires(reason, error=None):
    """A test that needs what `reason` (None: it is there) says is missing: skipped, or under
    TFCELLS_REQUIRE_GPU=1 failed with that reason; `error` fails it in any case."""
    def decorate(test):
        why = error or (reason if REQUIRE_GPU else None)
        if why is not None:
            @functools.wraps(test)  # keeps the parameters and marks, for pytest
            def fail(*args, **kwargs):
                pytest.fail(why if error else f"TFCELLS_REQUIRE_GPU=1, but {why}",
                            pytrace=False)
            return fail
        return pytest.mark.skip(reason=reason)(test) if reason else test
    return decorate


needs_gpu = requires(GPU_SKIP, GPU_ERROR)
needs_module = requires(
    None if cuda_module else f"the _tfcells_cuda module is not available ({CUDA_MODULE_MISSING})")
needs_core = requires(
    None if core_module else f"the CPU core module is not available ({CORE_MODULE_MISSING})")
needs_torch = requires(None if torch is not None
                       else "PyTorch with CUDA (cuDNN) is not installed")

CELLS = ["lstm", "gru", "gru_reset_before", "simple_rnn"]
GATES = {"lstm": 4, "gru": 3, "gru_reset_before": 3, "simple_rnn": 1}
GRAD_BITS = ["GRAD_X", "GRAD_H0", "GRAD_C0", "GRAD_KERNEL", "GRAD_RECURRENT_KERNEL", "GRAD_BIAS"]
GRAD_NAMES = {"GRAD_X": "dx", "GRAD_H0": "dh0", "GRAD_C0": "dc0", "GRAD_KERNEL": "dkernel",
              "GRAD_RECURRENT_KERNEL": "drecurrent_kernel", "GRAD_BIAS": "dbias"}
DROPOUT = ("input_dropout", "recurrent_dropout")  # optional keys of `inputs`, keyword arguments

# --------------------------------------------------------------------- device arrays


class Device:
    """Host <-> device copies and allocation through PyTorch or CuPy, on the current stream."""

    def __init__(self):
        self.lib = "torch" if torch is not None else "cupy"

    def put(self, a):
        a = np.ascontiguousarray(a)
        if self.lib == "torch":
            return torch.from_numpy(a.copy()).cuda()
        return cupy.asarray(a)

    def empty(self, shape, dtype, fill=np.nan):
        shape = tuple(int(s) for s in shape)
        if self.lib == "torch":
            t = torch.empty(shape, dtype=getattr(torch, np.dtype(dtype).name), device="cuda")
        else:
            t = cupy.empty(shape, dtype=dtype)
        if np.dtype(dtype).kind == "f":
            t.fill_(fill) if self.lib == "torch" else t.fill(fill)
        return t

    def get(self, t):
        return t.cpu().numpy() if self.lib == "torch" else cupy.asnumpy(t)

    @property
    def stream(self):
        if self.lib == "torch":
            return torch.cuda.current_stream().cuda_stream
        return cupy.cuda.get_current_stream().ptr

    def sync(self):
        torch.cuda.synchronize() if self.lib == "torch" else cupy.cuda.runtime.deviceSynchronize()


def dropout_args(inputs):
    """The dropout masks among `inputs` (host or device arrays), as keyword arguments."""
    return {k: inputs[k] for k in DROPOUT if inputs.get(k) is not None}


def dropout_flags(inputs):
    """Which masks `inputs` has, as the size helpers take them."""
    return {k: True for k in dropout_args(inputs)}


def cuda_forward(dev, cell, inputs, time_major=False, go_backwards=False, training=True,
                 allow_tf32=False):
    """Runs the CUDA forward pass on host inputs (dropout masks included, if any); returns
    host outputs like the CPU module."""
    x = inputs["x"]
    T, B = (x.shape[0], x.shape[1]) if time_major else (x.shape[1], x.shape[0])
    I, H = x.shape[2], inputs["recurrent_kernel"].shape[0]
    dt = x.dtype
    sizes = cuda_module.forward_sizes(cell, T, B, I, H, training, **dropout_flags(inputs),
                                      go_backwards=go_backwards,
                                      has_bias=inputs.get("bias") is not None)
    d = {k: (None if v is None else dev.put(v)) for k, v in inputs.items()}
    out = {"y": dev.empty((T, B, H) if time_major else (B, T, H), dt),
           "h_last": dev.empty((B, H), dt)}
    if cell == "lstm":
        out["c_last"] = dev.empty((B, H), dt)
    if training:
        for k in ("gates", "aux", "h_prev"):
            out[k] = dev.empty((sizes[k],), dt)
    ws = dev.empty((sizes["workspace"],), dt)
    cuda_module.forward(cell, d["x"], d["h0"], d.get("c0"), d["kernel"], d["recurrent_kernel"],
                        d.get("bias"), d.get("mask"), workspace=ws, time_major=time_major,
                        go_backwards=go_backwards, stream=dev.stream, allow_tf32=allow_tf32,
                        **dropout_args(d), **out)
    dev.sync()
    return {k: dev.get(v) for k, v in out.items()}


def cuda_backward(dev, cell, inputs, cache, grads, grad_mask, time_major=False,
                  go_backwards=False, allow_tf32=False, sentinel=np.nan):
    """Runs the CUDA backward pass; returns every gradient buffer (unrequested ones too, so
    that tests can see they were never written: they keep `sentinel`)."""
    x = inputs["x"]
    T, B = (x.shape[0], x.shape[1]) if time_major else (x.shape[1], x.shape[0])
    I, H = x.shape[2], inputs["recurrent_kernel"].shape[0]
    dt = x.dtype
    has_bias = inputs.get("bias") is not None
    d = {k: (None if v is None else dev.put(v)) for k, v in {**inputs, **cache, **grads}.items()}
    shapes = {"dx": x.shape, "dh0": (B, H), "dc0": (B, H), "dkernel": inputs["kernel"].shape,
              "drecurrent_kernel": inputs["recurrent_kernel"].shape}
    if has_bias:
        shapes["dbias"] = inputs["bias"].shape
    out = {k: dev.empty(s, dt, fill=sentinel) for k, s in shapes.items()}
    ws = dev.empty((cuda_module.backward_workspace_size(
        cell, T, B, I, H, grad_mask, has_bias, **dropout_flags(inputs),
        go_backwards=go_backwards),), dt)
    cuda_module.backward(cell, d["x"], d["h0"], d.get("c0"), d["kernel"],
                         d["recurrent_kernel"], d.get("bias"), d.get("mask"), d["gates"],
                         d.get("aux"), d["h_prev"], d.get("dy"), d.get("dh_last"),
                         d.get("dc_last"), workspace=ws, grad_mask=grad_mask,
                         time_major=time_major, go_backwards=go_backwards, stream=dev.stream,
                         allow_tf32=allow_tf32, y=d.get("y"), **dropout_args(d), **out)
    dev.sync()
    return {k: dev.get(v) for k, v in out.items()}


def cpu_forward(cell, inputs, time_major=False, go_backwards=False, training=True):
    i = inputs
    return core_module.forward(cell, i["x"], i["h0"], i.get("c0"), i["kernel"],
                               i["recurrent_kernel"], i.get("bias"), i.get("mask"),
                               time_major=time_major, go_backwards=go_backwards,
                               training=training, **dropout_args(i))


def cpu_backward(cell, inputs, cache, grads, grad_mask, time_major=False, go_backwards=False):
    i = inputs
    return core_module.backward(cell, i["x"], i["h0"], i.get("c0"), i["kernel"],
                                i["recurrent_kernel"], i.get("bias"), i.get("mask"),
                                time_major, go_backwards, cache["gates"], cache["aux"],
                                cache["h_prev"], grads.get("dy"), grads.get("dh_last"),
                                grads.get("dc_last"), grad_mask, y=cache.get("y"),
                                **dropout_args(i))


def make_problem(rng, cell, T, B, I, H, dtype, time_major=False, with_bias=True,
                 with_mask=False):
    G = GATES[cell]
    seq = (T, B) if time_major else (B, T)
    inputs = {
        "x": rng.standard_normal(seq + (I,)).astype(dtype),
        "h0": (0.5 * rng.standard_normal((B, H))).astype(dtype),
        "kernel": (rng.standard_normal((I, G * H)) / np.sqrt(max(I, 1))).astype(dtype),
        "recurrent_kernel": (rng.standard_normal((H, G * H)) / np.sqrt(max(H, 1))).astype(dtype),
    }
    if cell == "lstm":
        inputs["c0"] = (0.5 * rng.standard_normal((B, H))).astype(dtype)
    if with_bias:
        shape = (2, G * H) if cell == "gru" else (G * H,)
        inputs["bias"] = (0.3 * rng.standard_normal(shape)).astype(dtype)
    if with_mask:
        mask = rng.random(seq) > 0.3
        if mask.size:  # a fully masked step and a fully masked sequence
            if time_major:
                mask[0, :] = False
            else:
                mask[:, 0] = False
                mask[0, :] = False
        inputs["mask"] = mask
    grads = {"dy": rng.standard_normal(seq + (H,)).astype(dtype),
             "dh_last": rng.standard_normal((B, H)).astype(dtype)}
    if cell == "lstm":
        grads["dc_last"] = rng.standard_normal((B, H)).astype(dtype)
    return inputs, grads


def make_dropout(rng, cell, B, I, H, dtype, kind="both", rate=0.3):
    """Keras-like dropout masks (0 or 1/(1-rate)), one per gate, for `inputs`: kind is "input",
    "recurrent" or "both"."""
    widths = {"input_dropout": I, "recurrent_dropout": H}
    names = DROPOUT if kind == "both" else (kind + "_dropout",)
    return {k: ((rng.random((GATES[cell], B, widths[k])) >= rate) / (1 - rate)).astype(dtype)
            for k in names}


def all_grad_masks(cell):
    bits = [b for b in GRAD_BITS if cell == "lstm" or b != "GRAD_C0"]
    for n in range(len(bits) + 1):
        for combo in itertools.combinations(bits, n):
            yield combo, sum(getattr(cuda_module, b) for b in combo)


def tolerance(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------- runs everywhere


def _nvcc():
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _gpu_ops_library():
    """The path of the built TensorFlow GPU kernel library; skips where nvcc or tfcells' ops
    are missing, fails where nvcc is present but the CUDA code was not built."""
    if _nvcc() is None:
        pytest.skip("no nvcc on this machine: the CUDA code is not built here")
    try:
        import tensorflow  # noqa: F401  (tfcells imports without it, but has no ops then)
        import tfcells
    except Exception as e:
        pytest.skip(f"tfcells' TensorFlow ops do not import here ({type(e).__name__}: {e})")
    info = tfcells.build_info()
    assert info["cuda"] is True, f"nvcc is at {_nvcc()} but tfcells was built without CUDA"
    assert cuda_module is not None, CUDA_MODULE_MISSING
    from tfcells import _build_info
    gpu_lib = os.path.join(os.path.dirname(os.path.abspath(_build_info.__file__)),
                           "_tfcells_gpu_ops.so")
    assert os.path.exists(gpu_lib), f"{gpu_lib} was not built"
    return gpu_lib


def test_cuda_sources_compiled_where_nvcc_exists():
    """With nvcc on the machine, the build must have compiled the CUDA code (so CI keeps it
    compiling); the GPU kernel library must load into the installed TensorFlow (a CPU build
    too) and register a GPU kernel, float and double, for each of the six ops."""
    gpu_lib = _gpu_ops_library()
    # In a child process, so that this process' TensorFlow never sees the GPU kernels.
    code = f"""
import tensorflow as tf, tfcells
from tensorflow.python.framework import kernels
tf.load_op_library({gpu_lib!r})
for op in ["TfcellsLstm", "TfcellsGru", "TfcellsSimpleRnn"]:
    for name in (op, op + "Grad"):
        got = {{(k.device_type, k.constraint[0].allowed_values.list.type[0])
               for k in kernels.get_registered_kernels_for_op(name).kernel}}
        assert {{("GPU", 1), ("GPU", 2)}} <= got, (name, got)
print("ok")
"""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


@pytest.mark.parametrize("env", [None, "0", "1"])
def test_tf_gpu_kernels_follow_tensorflows_tf32_setting(env):
    """The TensorFlow GPU kernels multiply float32 on TF32 tensor cores exactly when TensorFlow's
    own GEMMs and Keras' cuDNN layers do (tf.config.experimental.
    enable_tensor_float_32_execution, on by default), unless TFCELLS_CUDA_TF32 or
    tfcells_gpu_set_allow_tf32 decides for them alone. Asked of the library in a child process
    (loaded into this TensorFlow, a CPU build too): the flag it reads is TensorFlow's."""
    gpu_lib = _gpu_ops_library()
    code = f"""
import ctypes, tensorflow as tf
tf.load_op_library({gpu_lib!r})
lib = ctypes.CDLL({gpu_lib!r})
lib.tfcells_gpu_set_allow_tf32.argtypes = [ctypes.c_int]
got = [lib.tfcells_gpu_allow_tf32()]
tf.config.experimental.enable_tensor_float_32_execution(False)
got.append(lib.tfcells_gpu_allow_tf32())
lib.tfcells_gpu_set_allow_tf32(1)
got.append(lib.tfcells_gpu_allow_tf32())
lib.tfcells_gpu_set_allow_tf32(-1)
got.append(lib.tfcells_gpu_allow_tf32())
tf.config.experimental.enable_tensor_float_32_execution(True)
got.append(lib.tfcells_gpu_allow_tf32())
print("got", got)
"""
    env_vars = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env_vars.pop("TFCELLS_CUDA_TF32", None)
    if env is not None:
        env_vars["TFCELLS_CUDA_TF32"] = env
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env_vars, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # TF's default, TF off, our override on, following TF again (off), TF on.
    follow = {None: [1, 0], "0": [0, 0], "1": [1, 1]}[env]
    assert f"got {[follow[0], follow[1], 1, 0, 1]}" in run.stdout, run.stdout


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(**extra):
    """The environment for a child pytest run in another directory: the same modules found
    (relative PYTHONPATH entries and module directory made absolute)."""
    env = dict(os.environ, **extra)
    paths = [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if cuda_module is not None:
        env["TFCELLS_CUDA_MODULE_DIR"] = os.path.dirname(os.path.abspath(cuda_module.__file__))
    return env


def test_requires_skips_fails_or_passes_through(monkeypatch):
    """The markers: a missing thing skips (fails under TFCELLS_REQUIRE_GPU=1), an error of a
    broken GPU set-up always fails, nothing missing leaves the test alone."""
    def test(a, b=2):
        return a + b

    module = sys.modules[__name__]
    monkeypatch.setattr(module, "REQUIRE_GPU", False)  # read when a test is decorated
    assert requires(None)(test) is test
    skipped = requires("no GPU")(test)
    assert [m.kwargs["reason"] for m in skipped.pytestmark] == ["no GPU"]
    for require in (False, True):
        monkeypatch.setattr(module, "REQUIRE_GPU", require)
        with pytest.raises(pytest.fail.Exception, match="cudaErrorInsufficientDriver"):
            requires(None, "cudaErrorInsufficientDriver")(test)(1)
    failing = requires("no GPU")(test)  # REQUIRE_GPU is True here
    with pytest.raises(pytest.fail.Exception, match="TFCELLS_REQUIRE_GPU=1, but no GPU"):
        failing(1, b=3)
    assert list(inspect.signature(failing).parameters) == ["a", "b"]  # what pytest reads


@needs_module
def test_a_broken_driver_fails_the_gpu_tests_with_cuda_text(tmp_path):
    """An NVIDIA driver too old for the CUDA runtime (here a stand-in libcuda.so.1 that reports
    CUDA 11.8 and fails cuInit) is not "no GPU": device_count() raises with CUDA's error, and
    the GPU tests fail with it, even without TFCELLS_REQUIRE_GPU."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler for the stand-in driver")
    source = tmp_path / "libcuda.c"
    source.write_text("int cuDriverGetVersion(int* v) { *v = 11080; return 0; }\n"
                      "int cuInit(unsigned flags) { (void)flags; return 35; }\n")
    build = subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"),
                            str(source)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    env = _child_env(LD_LIBRARY_PATH=str(tmp_path))
    env.pop("TFCELLS_REQUIRE_GPU", None)
    directory = os.path.dirname(os.path.abspath(cuda_module.__file__))
    code = (f"import sys; sys.path.insert(0, {directory!r}); import _tfcells_cuda as m\n"
            "print(m.cuda_versions())\n"
            "try:\n    m.device_count()\nexcept RuntimeError as e:\n    print('raised:', e)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "'driver': 11080" in run.stdout, run.stdout
    assert "raised: CUDA cannot count the GPUs: cudaErrorInsufficientDriver" in run.stdout
    assert "driver supports CUDA 11.8" in run.stdout, run.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
         f"{os.path.abspath(__file__)}::test_tf32_flag_runs_and_stays_close"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = tests.stdout + tests.stderr
    assert tests.returncode == 1 and "1 failed" in out, out[-3000:]
    assert "CUDA fails on this machine: CUDA cannot count the GPUs" in out, out[-3000:]


def test_require_gpu_turns_the_no_gpu_skip_into_a_failure(tmp_path):
    """TFCELLS_REQUIRE_GPU=1 on a machine where no GPU is seen (CUDA_VISIBLE_DEVICES hides any):
    the GPU tests fail, saying why, instead of passing the run by skipping."""
    env = _child_env(TFCELLS_REQUIRE_GPU="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf",
         f"{os.path.abspath(__file__)}::test_tf32_flag_runs_and_stays_close",
         f"{os.path.abspath(__file__)}::test_matches_cudnn"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-3000:]
    assert "TFCELLS_REQUIRE_GPU=1, but " in out and " skipped" not in out, out[-3000:]
    assert "5 failed" in out, out[-3000:]  # 1 + 2 cells x 2 dtypes


def test_gemm_operand_mapping_runs_the_driver_like_row_major(tmp_path):
    """The CUDA backend's row-major to column-major cuBLAS mapping (csrc/cuda/gemm_mapping.h),
    checked on the host: csrc/cuda/host_check.cc runs every cell, layout, mask and gradient
    mask through the driver with the mapped GEMMs (and BLAS' leading-dimension rules) and
    with plain row-major ones."""
    source = os.path.join(REPO, "csrc", "cuda", "host_check.cc")
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if not os.path.exists(source) or cxx is None:
        pytest.skip("needs the source tree and a C++ compiler")
    exe = str(tmp_path / "host_check")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-I", os.path.join(REPO, "csrc"), source,
                            os.path.join(REPO, "csrc", "core", "plan.cc"), "-o", exe],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("cases ok"), run.stdout


class FakeDeviceArray:
    """An object exposing a hand-written __cuda_array_interface__."""

    def __init__(self, shape, typestr="<f4", ptr=1 << 20, strides=None, readonly=False,
                 version=3, **extra):
        self.__cuda_array_interface__ = dict(shape=tuple(shape), typestr=typestr,
                                             data=(ptr, readonly), strides=strides,
                                             version=version, **extra)


def _fake_lstm(T=3, B=2, I=4, H=5, **override):
    args = dict(x=FakeDeviceArray((B, T, I)), h0=FakeDeviceArray((B, H)),
                c0=FakeDeviceArray((B, H)), kernel=FakeDeviceArray((I, 4 * H)),
                recurrent_kernel=FakeDeviceArray((H, 4 * H)), bias=FakeDeviceArray((4 * H,)),
                mask=None, y=FakeDeviceArray((B, T, H)), h_last=FakeDeviceArray((B, H)),
                c_last=FakeDeviceArray((B, H)), workspace=FakeDeviceArray((1000,)))
    args.update(override)
    return args


def _call_forward(args):
    a = dict(args)
    positional = [a.pop(k) for k in ("x", "h0", "c0", "kernel", "recurrent_kernel", "bias",
                                      "mask")]
    return cuda_module.forward("lstm", *positional, **a)


@needs_module
@pytest.mark.parametrize("override, error, match", [
    (dict(x=np.zeros((2, 3, 4), np.float32)), TypeError, "__cuda_array_interface__"),
    (dict(x=FakeDeviceArray((2, 3, 4), strides=(4, 8, 24))), ValueError, "C-contiguous"),
    (dict(h0=FakeDeviceArray((2, 5), ptr=(1 << 20) + 2)), ValueError, "aligned"),
    (dict(h0=FakeDeviceArray((2, 5), typestr="<f8")), TypeError, "float64.*float32"),
    (dict(x=FakeDeviceArray((2, 3, 4), typestr="<i4")), TypeError,
     "x has dtype int32, expected float32, float64 or float16"),
    (dict(kernel=FakeDeviceArray((4, 19))), ValueError, "kernel must have shape"),
    (dict(mask=FakeDeviceArray((2, 3), typestr="<f4")), TypeError, "mask.*bool"),
    (dict(mask=FakeDeviceArray((3, 2), typestr="|b1")), ValueError, "mask must have shape"),
    (dict(y=FakeDeviceArray((2, 3, 6))), ValueError, "y must have shape"),
    (dict(y=FakeDeviceArray((2, 3, 5), readonly=True)), ValueError, "read-only"),
    (dict(workspace=FakeDeviceArray((3,))), ValueError, "workspace must hold at least"),
    (dict(c0=None), ValueError, "c0 is required"),
    (dict(blas_workspace=FakeDeviceArray((64,), typestr="|u1", readonly=True)), ValueError,
     "blas_workspace is read-only"),
    (dict(h0=FakeDeviceArray((2, 5), mask=FakeDeviceArray((2, 5)))), ValueError, "masked"),
    # Dropout masks: [G, B, I] and [G, B, H], x's dtype, contiguous, counted in the workspace.
    (dict(input_dropout=FakeDeviceArray((4, 2, 5))), ValueError,
     r"input_dropout must have shape \[4, 2, 4\]"),
    (dict(recurrent_dropout=FakeDeviceArray((1, 2, 5))), ValueError,
     r"recurrent_dropout must have shape \[4, 2, 5\]"),
    (dict(input_dropout=FakeDeviceArray((4, 2, 4), typestr="<f8")), TypeError,
     "input_dropout has dtype float64"),
    (dict(recurrent_dropout=FakeDeviceArray((4, 2, 5), strides=(4, 80, 16))), ValueError,
     "recurrent_dropout must be C-contiguous"),
])
def test_bad_arrays_rejected_before_any_launch(override, error, match):
    with pytest.raises(error, match=match):
        _call_forward(_fake_lstm(**override))


@needs_module
def test_workspace_must_fit_the_dropout_masks():
    """A workspace that fits the call without masks is refused once a mask comes along."""
    # _fake_lstm passes no cache: an inference call.
    plain = cuda_module.forward_sizes("lstm", 3, 2, 4, 5, False)["workspace"]
    need = cuda_module.forward_sizes("lstm", 3, 2, 4, 5, False, input_dropout=True)["workspace"]
    assert need > plain
    with pytest.raises(ValueError, match=f"workspace must hold at least {need}"):
        _call_forward(_fake_lstm(input_dropout=FakeDeviceArray((4, 2, 4)),
                                 workspace=FakeDeviceArray((plain,))))


@needs_module
@pytest.mark.parametrize("y", [None, "short"])
def test_missing_y_rejected_by_backward_before_any_launch(y):
    """A float32 call keeps no h_prev cache: its backward reads h_prev from the forward's y,
    and refuses a missing or misshapen one with the call plan's message (CheckBackwardY)."""
    a = _fake_lstm()
    B, T, H = 2, 3, 5
    y_arg = None if y is None else FakeDeviceArray((B, T - 1, H))
    with pytest.raises(ValueError, match=r"y must be the forward op's output sequence, "
                                         r"of shape \[2, 3, 5\]"):
        cuda_module.backward("lstm", a["x"], a["h0"], a["c0"], a["kernel"],
                             a["recurrent_kernel"], a["bias"], None,
                             FakeDeviceArray((B * T * 4 * H,)), FakeDeviceArray((B * T * H,)),
                             FakeDeviceArray((0,)), None, None, None,
                             workspace=a["workspace"], y=y_arg)


@needs_module
def test_bad_dropout_rejected_by_backward_before_any_launch():
    a = _fake_lstm()
    B, T, H = 2, 3, 5
    with pytest.raises(ValueError, match=r"recurrent_dropout must have shape \[4, 2, 5\]"):
        cuda_module.backward("lstm", a["x"], a["h0"], a["c0"], a["kernel"],
                             a["recurrent_kernel"], a["bias"], None,
                             FakeDeviceArray((B * T * 4 * H,)), FakeDeviceArray((B * T * H,)),
                             FakeDeviceArray((B * T * H,)), None, None, None,
                             workspace=a["workspace"], grad_mask=0,
                             recurrent_dropout=FakeDeviceArray((4, 2, 4)))


@needs_module
def test_packed_strides_and_extent_one_axes_accepted_up_to_the_device_check():
    """Explicit C-contiguous strides (and any stride on an extent-1 axis) pass the layout
    checks; the call then fails only at the device query (no GPU) or not at all."""
    args = _fake_lstm(B=1, x=FakeDeviceArray((1, 3, 4), strides=(999, 16, 4)))
    if GPU_SKIP is None:
        pytest.skip("a GPU is present: fake pointers would be queried for real")
    with pytest.raises((RuntimeError, ValueError), match="memory|device|GPU"):
        _call_forward(args)


@needs_module
def test_sizes_helpers_follow_the_call_plan():
    """The size helpers answer from the core's call plan (csrc/core/plan.h), which owns the
    layout the driver carves (the core self-test runs every pass in exactly-sized, NaN-filled
    buffers under ASan). What the sizes must show: the cache does not depend on dropout, dropout
    needs scratch of its own, and a gradient that is not asked for costs no T-long buffer."""
    B, I, H, m = 3, 5, 4, cuda_module

    def forward(T=7, training=True, **dropout):
        return m.forward_sizes("lstm", T, B, I, H, training, **dropout)

    def backward(T=7, cell="lstm", grad_mask=m.GRAD_ALL, **dropout):
        return m.backward_workspace_size(cell, T, B, I, H, grad_mask, True, **dropout)

    plain = forward()
    assert {k: v for k, v in plain.items() if k != "workspace"} == {
        "gates": 7 * B * 4 * H, "aux": 7 * B * H, "h_prev": 0}  # laid out like x; h_prev: y's
    assert m.forward_sizes("simple_rnn", 7, B, I, H, False)["aux"] == 0
    with pytest.raises(ValueError, match="cell must be"):
        m.forward_sizes("lstmx", 1, 1, 1, 1)
    both = forward(input_dropout=True, recurrent_dropout=True)
    assert both["workspace"] > plain["workspace"]
    assert {k: v for k, v in both.items() if k != "workspace"} == {
        k: v for k, v in plain.items() if k != "workspace"}  # the cache does not change
    assert forward(training=False)["gates"] == 0
    # Backwards, the pass cannot read h_prev from y: the cache keeps it. Without a bias, the
    # workspace holds a zero one.
    assert forward(go_backwards=True) == {**plain, "h_prev": 7 * B * H}
    assert forward(has_bias=False)["workspace"] > plain["workspace"]
    assert backward(input_dropout=True) > backward()
    # Only the initial state's gradient: no buffer grows with the sequence.
    frozen = m.GRAD_H0 | m.GRAD_C0
    assert backward(T=7, grad_mask=frozen) == backward(T=70, grad_mask=frozen)
    assert backward(T=7, grad_mask=frozen, recurrent_dropout=True) == backward(
        T=70, grad_mask=frozen, recurrent_dropout=True)
    # The weight gradients keep every step's gate gradients; on a GPU so does dx (one GEMM
    # over all rows after the loop).
    for bits in (m.GRAD_KERNEL, m.GRAD_RECURRENT_KERNEL, m.GRAD_X):
        assert backward(T=70, grad_mask=bits) > backward(T=7, grad_mask=bits)


class FakeDevice:
    """Device's allocation over FakeDeviceArray: the helpers' calls pass every check of the
    module up to the query of the (fake) pointers."""

    def __init__(self):
        self.next_ptr = 1 << 20

    def empty(self, shape, dtype, fill=None):
        self.next_ptr += 1 << 20
        return FakeDeviceArray(shape, typestr=np.dtype(dtype).str, ptr=self.next_ptr)

    def put(self, a):
        return self.empty(np.shape(a), np.asarray(a).dtype)

    stream = 0


@needs_module
@pytest.mark.parametrize("cell", CELLS)
def test_gpu_helpers_pass_the_checks_up_to_the_device_query(cell):
    """What runs here of the GPU tests' calls: the cache and workspace the size helpers ask for
    with the call's options, and the arrays as the helpers pass them, satisfy the module in
    every layout, direction, with and without bias and dropout masks, forward and backward."""
    if GPU_SKIP is None:
        pytest.skip("a GPU is present: fake pointers would be queried for real")
    rng = np.random.default_rng(3)
    T, B, I, H = 3, 2, 4, 5

    def device_query():
        return pytest.raises((RuntimeError, ValueError),
                             match="cannot query its memory|not in GPU memory")

    # Every option the sizes depend on: go_backwards keeps the h_prev cache, a call without
    # bias needs a zero bias in its workspace, each dropout mask scratch of its own.
    for time_major, go_backwards, with_bias in itertools.product((False, True), repeat=3):
        inputs, grads = make_problem(rng, cell, T, B, I, H, np.float32, time_major, with_bias,
                                     with_mask=True)
        sizes = cuda_module.forward_sizes(cell, T, B, I, H, go_backwards=go_backwards,
                                          has_bias=with_bias)
        cache = {k: np.zeros(sizes[k], np.float32) for k in ("gates", "aux", "h_prev")}
        cache["y"] = np.zeros((T, B, H) if time_major else (B, T, H), np.float32)
        for kind in (None, "input", "recurrent", "both"):
            masked = {**inputs, **(make_dropout(rng, cell, B, I, H, np.float32, kind)
                                   if kind else {})}
            for training in (True, False):
                with device_query():
                    cuda_forward(FakeDevice(), cell, masked, time_major, go_backwards,
                                 training=training)
            for grad_mask in (cuda_module.GRAD_ALL, cuda_module.GRAD_H0):
                with device_query():
                    cuda_backward(FakeDevice(), cell, masked, cache, grads, grad_mask,
                                  time_major, go_backwards)


# 16-bit storage: x, the states, the outputs and their gradients in float16 (typestr "<f2") or
# bfloat16 (its bits as 2-byte integers, storage="bfloat16"); everything else float32.
STORAGE_TYPESTR = {"float16": "<f2", "bfloat16": "<i2"}
STORAGE_ARRAYS = ("x", "h0", "c0", "y", "h_last", "c_last")


def _fake_16bit_lstm(storage, T=3, B=2, I=4, H=5, **override):
    ws = cuda_module.forward_sizes("lstm", T, B, I, H, False, storage=storage)["workspace"]
    args = _fake_lstm(T, B, I, H, workspace=FakeDeviceArray((ws,)))
    for k in STORAGE_ARRAYS:
        args[k] = FakeDeviceArray(args[k].__cuda_array_interface__["shape"],
                                  typestr=STORAGE_TYPESTR[storage])
    args.update(override)
    return args


@needs_module
@pytest.mark.parametrize("storage", sorted(STORAGE_TYPESTR))
def test_16bit_calls_pass_the_checks_up_to_the_device_query(storage):
    if GPU_SKIP is None:
        pytest.skip("a GPU is present: fake pointers would be queried for real")
    extra = {"storage": "bfloat16"} if storage == "bfloat16" else {}
    with pytest.raises((RuntimeError, ValueError), match="cannot query its memory|not in GPU"):
        _call_forward({**_fake_16bit_lstm(storage), **extra})


@needs_module
def test_16bit_dtype_errors_name_the_array_and_the_type_expected():
    bf16 = {"storage": "bfloat16"}
    cases = [  # (arguments, error, match)
        (_fake_16bit_lstm("float16", kernel=FakeDeviceArray((4, 20), typestr="<f2")),
         TypeError, r"kernel has dtype float16, expected float32 \(the compute type"),
        (_fake_16bit_lstm("float16", y=FakeDeviceArray((2, 3, 5))), TypeError,
         "y has dtype float32, expected float16 like x"),
        ({**_fake_16bit_lstm("bfloat16"), **bf16, "h0": FakeDeviceArray((2, 5))}, TypeError,
         "h0 has dtype float32, expected bfloat16"),
        ({**_fake_lstm(), **bf16}, TypeError, "x has dtype float32, expected bfloat16"),
        (_fake_16bit_lstm("bfloat16"), TypeError, "storage='bfloat16'"),  # bits, not named
        ({**_fake_lstm(), "storage": "int8"}, ValueError, "storage must be"),
        (_fake_16bit_lstm("float16", workspace=FakeDeviceArray(
            (cuda_module.forward_sizes("lstm", 3, 2, 4, 5, False)["workspace"],))),
         ValueError, "workspace must hold at least"),  # a float32 call's: no staging room
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            _call_forward(args)


@needs_module
def test_16bit_sizes_add_staging_but_keep_the_cache():
    """A 16-bit call widens its inputs into float32 staging inside the workspace; the training
    cache is float32 either way, and keeps h_prev (the backward cannot read it from a rounded
    y), which a float32 call reads from y."""
    m = cuda_module
    T, B, I, H = 7, 3, 5, 4
    plain = m.forward_sizes("gru", T, B, I, H, True)
    assert plain["h_prev"] == 0
    for storage in ("bfloat16", "float16"):
        sized = m.forward_sizes("gru", T, B, I, H, True, storage=storage)
        assert sized["workspace"] > plain["workspace"]
        assert {k: v for k, v in sized.items() if k != "workspace"} == {
            **{k: v for k, v in plain.items() if k != "workspace"}, "h_prev": T * B * H}
        assert (m.backward_workspace_size("gru", 7, 3, 5, 4, storage=storage)
                > m.backward_workspace_size("gru", 7, 3, 5, 4))
    with pytest.raises(ValueError, match="storage must be"):
        m.forward_sizes("gru", 7, 3, 5, 4, storage="float32")


# --------------------------------------------------------------- CUDA vs CPU (GPU only)


def _compare_cell(dev, rng, cell, dtype, T, B, I, H, time_major, go_backwards, with_bias,
                  with_mask, dropout=None):
    """dropout: None, or which masks to add ("input", "recurrent" or "both")."""
    inputs, grads = make_problem(rng, cell, T, B, I, H, dtype, time_major, with_bias, with_mask)
    what = cell
    if dropout:
        inputs.update(make_dropout(rng, cell, B, I, H, dtype, dropout))
        what = f"{cell} ({dropout} dropout)"
    tol = tolerance(dtype)
    ref = cpu_forward(cell, inputs, time_major, go_backwards)
    got = cuda_forward(dev, cell, inputs, time_major, go_backwards)
    for k in ("y", "h_last", "c_last", "gates", "aux", "h_prev"):
        if k in got:
            np.testing.assert_allclose(got[k].reshape(ref[k].shape), ref[k], **tol,
                                       err_msg=f"{what} forward {k}")
    inference = cuda_forward(dev, cell, inputs, time_major, go_backwards, training=False)
    for k in ("y", "h_last", "c_last"):
        if k in inference:
            np.testing.assert_allclose(inference[k], ref[k], **tol, err_msg=f"{what} inference {k}")
    cache = {k: ref[k] for k in ("gates", "aux", "h_prev", "y")}
    for combo, grad_mask in all_grad_masks(cell):
        want = cpu_backward(cell, inputs, cache, grads, grad_mask, time_major, go_backwards)
        have = cuda_backward(dev, cell, inputs, cache, grads, grad_mask, time_major, go_backwards)
        for bit in GRAD_BITS:
            name = GRAD_NAMES[bit]
            if name not in have:
                continue
            if bit in combo and name in want:
                np.testing.assert_allclose(have[name], want[name], **tol,
                                           err_msg=f"{what} {name} with {combo}")
            else:  # not requested: never written
                assert np.isnan(have[name]).all(), f"{what}: {name} written though not requested"


def _cuda_16bit_pass(cell, inputs, grads, storage):
    """Forward (training) and backward with every gradient, with 16-bit storage through
    PyTorch tensors; returns the outputs and gradients widened to float32."""
    t16 = getattr(torch, storage)
    x = inputs["x"]
    B, T, I = x.shape
    H = inputs["recurrent_kernel"].shape[0]

    def arg(t):  # bfloat16 has no __cuda_array_interface__: its bits as int16
        return t.view(torch.int16) if storage == "bfloat16" else t

    def put16(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)).cuda().to(t16)

    def empty16(*shape):
        return torch.full(shape, float("nan"), dtype=t16, device="cuda")

    def put32(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()

    named = {"storage": storage}
    sizes = cuda_module.forward_sizes(cell, T, B, I, H, True, storage=storage)
    d = {k: put16(inputs[k]) for k in ("x", "h0", "c0") if k in inputs}
    w = {k: put32(inputs.get(k)) for k in ("kernel", "recurrent_kernel", "bias")}
    out = {"y": empty16(B, T, H), "h_last": empty16(B, H)}
    if cell == "lstm":
        out["c_last"] = empty16(B, H)
    cache = {k: torch.empty(sizes[k], dtype=torch.float32, device="cuda")
             for k in ("gates", "aux", "h_prev")}
    ws = torch.empty(sizes["workspace"], dtype=torch.float32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    cuda_module.forward(cell, arg(d["x"]), arg(d["h0"]), arg(d["c0"]) if "c0" in d else None,
                        w["kernel"], w["recurrent_kernel"], w["bias"], None,
                        **{k: arg(v) for k, v in out.items()}, **cache, workspace=ws,
                        stream=stream, **named)
    g = {k: put16(v) for k, v in grads.items()}
    shapes16 = {"dx": (B, T, I), "dh0": (B, H)}
    if cell == "lstm":
        shapes16["dc0"] = (B, H)
    grad_out = {k: empty16(*s) for k, s in shapes16.items()}
    for k in ("kernel", "recurrent_kernel", "bias"):
        if w[k] is not None:
            grad_out["d" + k] = torch.full_like(w[k], float("nan"))
    bws = torch.empty(cuda_module.backward_workspace_size(cell, T, B, I, H, storage=storage),
                      dtype=torch.float32, device="cuda")
    cuda_module.backward(cell, arg(d["x"]), arg(d["h0"]), arg(d["c0"]) if "c0" in d else None,
                         w["kernel"], w["recurrent_kernel"], w["bias"], None, cache["gates"],
                         cache["aux"], cache["h_prev"], arg(g["dy"]), arg(g["dh_last"]),
                         arg(g["dc_last"]) if "dc_last" in g else None,
                         **{k: arg(v) if v.dtype == t16 else v for k, v in grad_out.items()},
                         workspace=bws, stream=stream, **named)
    torch.cuda.synchronize()
    return {k: v.float().cpu().numpy() for k, v in {**out, **grad_out}.items()}


@needs_gpu
@needs_torch
@pytest.mark.parametrize("storage, tol", [("bfloat16", 3e-2), ("float16", 4e-3)])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_16bit_within_16bit_accuracy_of_float32(cell, storage, tol):
    """A 16-bit call (its GEMMs multiplying 16-bit operands on the tensor cores) against the
    float32 call fed the same rounded inputs, at T=20: every output and gradient within `tol`
    of its tensor's scale (csrc/cuda/host_check.cc measured 1e-2 / 2e-3 on the host)."""
    rng = np.random.default_rng(16)
    inputs, grads = make_problem(rng, cell, 20, 16, 24, 32, np.float32)
    t16 = getattr(torch, storage)
    for d in (inputs, grads):  # the float32 reference sees what the 16-bit call sees
        for k in ("x", "h0", "c0", "dy", "dh_last", "dc_last"):
            if k in d:
                d[k] = torch.from_numpy(d[k]).to(t16).float().numpy()
    got = _cuda_16bit_pass(cell, inputs, grads, storage)
    dev = Device()
    ref = cuda_forward(dev, cell, inputs)
    want = cuda_backward(dev, cell, inputs, {k: ref[k] for k in ("gates", "aux", "h_prev", "y")},
                         grads, cuda_module.GRAD_ALL)
    want.update({k: ref[k] for k in ("y", "h_last", "c_last") if k in ref})
    for k, v in got.items():
        if k not in want:
            continue
        scale = 1 + np.abs(want[k]).max(initial=0)
        err = np.abs(v - want[k]).max(initial=0)
        assert err <= tol * scale, f"{cell} {storage} {k}: error {err:.3g} > {tol} * {scale:.3g}"


@needs_gpu
@needs_core
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_matches_cpu_random_shapes_every_grad_mask(cell, dtype):
    dev = Device()
    rng = np.random.default_rng(sum(map(ord, cell)) + np.dtype(dtype).itemsize)
    for trial in range(6):
        T, B, I, H = (int(v) for v in rng.integers(1, [9, 6, 10, 9]))
        time_major, go_backwards, with_bias, with_mask = (bool(v) for v in rng.integers(0, 2, 4))
        if trial == 0:  # always one plain case
            time_major = go_backwards = with_mask = False
            with_bias = True
        _compare_cell(dev, rng, cell, dtype, T, B, I, H, time_major, go_backwards, with_bias,
                      with_mask)


@needs_gpu
@needs_core
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T, B, I, H", [(0, 3, 4, 5), (4, 0, 3, 5), (3, 2, 0, 4), (2, 3, 4, 0)])
def test_cuda_matches_cpu_empty_dimensions(cell, T, B, I, H):
    dev = Device()
    _compare_cell(dev, np.random.default_rng(5), cell, np.float64, T, B, I, H, False, False,
                  True, False)


@needs_gpu
@needs_core
@pytest.mark.parametrize("dropout", [None, "both"], ids=["plain", "dropout"])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_matches_cpu_larger(cell, dropout):
    """Shapes past one block of the pointwise and reduction kernels, with dropout masks too."""
    dev = Device()
    rng = np.random.default_rng(11 if dropout is None else 12)
    _compare_cell(dev, rng, cell, np.float64, 17, 33, 70, 129, False, False, True, True,
                  dropout=dropout)
    _compare_cell(dev, rng, cell, np.float32, 9, 65, 40, 300, True, True, True, False,
                  dropout=dropout)


LAYOUTS = {"batch_major": (False, False), "time_major": (True, False), "backwards": (False, True),
           "time_major_backwards": (True, True)}  # time_major, go_backwards


@needs_gpu
@needs_core
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["input", "recurrent", "both"])
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_matches_cpu_with_dropout_every_grad_mask(cell, kind, layout, dtype):
    """Fused dropout (a mask per gate): the masked copies, the gate-by-gate products and the
    masked gradients of the CUDA path against the CPU kernels, with a step mask and without."""
    dev = Device()
    rng = np.random.default_rng(sum(map(ord, cell + kind + layout)) + np.dtype(dtype).itemsize)
    time_major, go_backwards = LAYOUTS[layout]
    _compare_cell(dev, rng, cell, dtype, 5, 4, 7, 6, time_major, go_backwards, True, True,
                  dropout=kind)
    _compare_cell(dev, rng, cell, dtype, 3, 2, 1, 9, time_major, go_backwards, False, False,
                  dropout=kind)




@needs_gpu
@needs_torch
@needs_core
@pytest.mark.parametrize("graphs", [False, True], ids=["direct", "graphs"])
def test_two_streams_driven_from_one_thread(graphs):
    """One thread enqueues forward and backward passes on two streams in turn without waiting:
    each (thread, device, stream) has its own cuBLAS handle and so its own workspace, and both
    streams' results equal the CPU kernels'. (With one handle per thread, the two streams'
    GEMMs could use one workspace at the same time.) Shapes large enough for cuBLAS to split
    the T·B-row weight-gradient products. With a cuBLAS workspace per stream, the calls are
    captured once and then replay their CUDA graphs, the two streams' graphs running at once."""
    rng = np.random.default_rng(21)
    cell, T, B, I, H = "lstm", 16, 64, 256, 256
    inputs, grads = make_problem(rng, cell, T, B, I, H, np.float32)
    ref = cpu_forward(cell, inputs)
    cache = {k: ref[k] for k in ("gates", "aux", "h_prev", "y")}
    want = cpu_backward(cell, inputs, cache, grads, cuda_module.GRAD_ALL)
    dev = Device()
    d = {k: dev.put(v) for k, v in {**inputs, **cache, **grads}.items()}
    sizes = cuda_module.forward_sizes(cell, T, B, I, H, True)
    ws_size = cuda_module.backward_workspace_size(cell, T, B, I, H)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    torch.cuda.synchronize()  # the inputs are in place before either stream reads them
    outs = []
    for stream in streams:
        with torch.cuda.stream(stream):  # allocated and handed over on their own stream
            outs.append({
                "y": dev.empty((B, T, H), np.float32), "h_last": dev.empty((B, H), np.float32),
                "c_last": dev.empty((B, H), np.float32),
                "cache": [dev.empty((sizes[k],), np.float32) for k in ("gates", "aux", "h_prev")],
                "fws": dev.empty((sizes["workspace"],), np.float32),
                "bws": dev.empty((ws_size,), np.float32),
                "blas": {"blas_workspace": blas_workspace(dev)} if graphs else {},
                "grads": {n: dev.empty(np.shape(inputs[k]), np.float32) for n, k in (
                    ("dx", "x"), ("dh0", "h0"), ("dc0", "c0"), ("dkernel", "kernel"),
                    ("drecurrent_kernel", "recurrent_kernel"), ("dbias", "bias"))}})
    args = [d["x"], d["h0"], d["c0"], d["kernel"], d["recurrent_kernel"], d["bias"], None]
    for _ in range(3):  # interleaved, never waiting in between
        for stream, o in zip(streams, outs):
            with torch.cuda.stream(stream):
                gates, aux, h_prev = o["cache"]
                cuda_module.forward(cell, *args, y=o["y"], h_last=o["h_last"],
                                    c_last=o["c_last"], gates=gates, aux=aux, h_prev=h_prev,
                                    workspace=o["fws"], stream=stream.cuda_stream, **o["blas"])
                cuda_module.backward(cell, *args, d["gates"], d["aux"], d["h_prev"], d["dy"],
                                     d["dh_last"], d["dc_last"], workspace=o["bws"],
                                     stream=stream.cuda_stream, y=d["y"], **o["grads"],
                                     **o["blas"])
    torch.cuda.synchronize()
    tol = tolerance(np.float32)
    for i, o in enumerate(outs):
        for k in ("y", "h_last", "c_last"):
            np.testing.assert_allclose(dev.get(o[k]), ref[k], **tol, err_msg=f"stream {i} {k}")
        for name, buffer in o["grads"].items():
            np.testing.assert_allclose(dev.get(buffer), want[name], **tol,
                                       err_msg=f"stream {i} {name}")


def blas_workspace(dev):
    """Device bytes for cuBLAS' workspace (the calls' blas_workspace), as TensorFlow gives."""
    return dev.empty((cuda_module.blas_workspace_allocation_bytes(),), np.uint8)


class GraphBuffers:
    """One set of device buffers for a forward and backward call of a problem's shape, with
    its own cuBLAS workspace (so the calls are captured into CUDA graphs): load() copies new
    values into the same input buffers, run() enqueues both passes, results() reads back the
    outputs and every gradient."""

    def __init__(self, dev, cell, inputs, grads, grad_mask):
        self.dev, self.cell, self.grad_mask = dev, cell, grad_mask
        B, T, I = inputs["x"].shape
        H = inputs["recurrent_kernel"].shape[0]
        dt = inputs["x"].dtype
        self.d = {k: dev.put(v) for k, v in {**inputs, **grads}.items()}
        sizes = cuda_module.forward_sizes(cell, T, B, I, H, True, **dropout_flags(inputs))
        self.out = {"y": dev.empty((B, T, H), dt), "h_last": dev.empty((B, H), dt)}
        if cell == "lstm":
            self.out["c_last"] = dev.empty((B, H), dt)
        self.cache = {k: dev.empty((sizes[k],), dt) for k in ("gates", "aux", "h_prev")}
        self.fws = dev.empty((sizes["workspace"],), dt)
        self.bws = dev.empty((cuda_module.backward_workspace_size(
            cell, T, B, I, H, grad_mask, **dropout_flags(inputs)),), dt)
        self.grads = {n: dev.empty(inputs[k].shape, dt) for n, k in (
            ("dx", "x"), ("dh0", "h0"), ("dc0", "c0"), ("dkernel", "kernel"),
            ("drecurrent_kernel", "recurrent_kernel"), ("dbias", "bias")) if k in inputs}
        self.blas = blas_workspace(dev)

    def load(self, inputs, grads):
        for k, v in {**inputs, **grads}.items():
            self.d[k].copy_(torch.from_numpy(np.ascontiguousarray(v)))

    def run(self):
        d, c, dev = self.d, self.cache, self.dev
        args = [d["x"], d["h0"], d.get("c0"), d["kernel"], d["recurrent_kernel"], d.get("bias"),
                d.get("mask")]
        drop = dropout_args(d)
        cuda_module.forward(self.cell, *args, **self.out, **c, workspace=self.fws,
                            stream=dev.stream, blas_workspace=self.blas, **drop)
        cuda_module.backward(self.cell, *args, c["gates"], c["aux"], c["h_prev"], d["dy"],
                             d["dh_last"], d.get("dc_last"), workspace=self.bws,
                             grad_mask=self.grad_mask, stream=dev.stream, y=self.out["y"],
                             blas_workspace=self.blas, **self.grads, **drop)

    def results(self):
        self.dev.sync()
        return {k: self.dev.get(v) for k, v in {**self.out, **self.grads}.items()}


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("cell", CELLS)
def test_graph_replays_match_direct_launches(cell, dropout, monkeypatch):
    """Calls given a cuBLAS workspace are captured once into CUDA graphs and replayed while
    shapes and buffers repeat. Against direct launches (TFCELLS_CUDA_GRAPHS=0) of the same
    calls: the first run (a capture), new values in the same buffers (a replay), another set
    of buffers while the first holds other values (a new capture: a graph that kept any
    address of the first set would read or write it), then the first set again (a replay).
    The work counters count each replay's work."""
    rng = np.random.default_rng(31)
    T, B, I, H = 6, 5, 7, 8
    problems = []
    for _ in range(2):
        inputs, grads = make_problem(rng, cell, T, B, I, H, np.float32, with_mask=True)
        if dropout:
            inputs.update(make_dropout(rng, cell, B, I, H, np.float32))
        problems.append((inputs, grads))
    dev = Device()
    first, second = (GraphBuffers(dev, cell, *problems[0], cuda_module.GRAD_ALL)
                     for _ in range(2))
    monkeypatch.setenv("TFCELLS_CUDA_GRAPHS", "0")
    want = []
    for p in problems:
        first.load(*p)
        first.run()
        want.append(first.results())
    assert want[0]["y"].tolist() != want[1]["y"].tolist()
    monkeypatch.delenv("TFCELLS_CUDA_GRAPHS")
    before = cuda_module.graph_stats()
    counts_before = cuda_module.work_counts()
    steps = [(first, 0), (first, 1), (second, 0), (first, 1)]
    for i, (buffers, p) in enumerate(steps):
        if buffers is second:
            first.load(*problems[1 - p])  # the other values in the first set meanwhile
            first.run()
        buffers.load(*problems[p])
        buffers.run()
        got = buffers.results()
        for k, v in want[p].items():
            which = "second" if buffers is second else "first"
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6,
                                       err_msg=f"run {i} ({which} buffers): {k}")
    after = cuda_module.graph_stats()
    captured = (after["instantiations"] - before["instantiations"]
                + after["updates"] - before["updates"])
    assert after["failed_captures"] == before["failed_captures"], after["last_failure"]
    assert captured == 4, (before, after)  # each buffer set's forward and backward, once
    assert after["replays"] - before["replays"] == 2 * (len(steps) + 1 - 2), (before, after)
    counts = cuda_module.work_counts()
    runs = len(steps) + 1  # every forward and backward, replayed or captured, counted once
    assert counts["forward_calls"] - counts_before["forward_calls"] == runs
    assert counts["backward_calls"] - counts_before["backward_calls"] == runs
    assert counts["grad_kernel"] - counts_before["grad_kernel"] == runs


@needs_gpu
@needs_torch
def test_graph_updates_keep_every_buffer_set_right(monkeypatch):
    """More buffer sets of one shape than graphs are kept for it (8): past the eighth, each new
    set's capture updates the least recently used graph in place, so sets take graphs from one
    another in turn. Twelve sets with their own values, run round after round, each against
    direct launches of its values."""
    rng = np.random.default_rng(41)
    cell, T, B, I, H = "lstm", 4, 3, 5, 6
    problems = [make_problem(rng, cell, T, B, I, H, np.float32) for _ in range(12)]
    dev = Device()
    sets = [GraphBuffers(dev, cell, *p, cuda_module.GRAD_ALL) for p in problems]
    monkeypatch.setenv("TFCELLS_CUDA_GRAPHS", "0")
    want = []
    for buffers in sets:
        buffers.run()
        want.append(buffers.results())
        buffers.load(*problems[0])  # other values, until the round below loads its own
    monkeypatch.delenv("TFCELLS_CUDA_GRAPHS")
    before = cuda_module.graph_stats()
    for _ in range(2):
        for buffers, p, w in zip(sets, problems, want):
            buffers.load(*p)
            buffers.run()
            got = buffers.results()
            for k, v in w.items():
                np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-6, err_msg=k)
    after = cuda_module.graph_stats()
    assert after["failed_captures"] == before["failed_captures"], after["last_failure"]
    assert after["updates"] - before["updates"] >= 2 * 4  # sets 9-12 of the first round
    assert after["cached"] <= 64


@needs_module
def test_graph_stats_and_work_counts_are_exported():
    stats = cuda_module.graph_stats()
    assert set(stats) == {"replays", "instantiations", "updates", "direct", "failed_captures",
                          "cached", "last_failure"}
    assert all(v >= 0 for k, v in stats.items() if k != "last_failure")
    assert tuple(cuda_module.work_counts()) == tuple(cuda_module.WORK_COUNTERS)


@needs_gpu
@needs_torch
def test_blas_workspace_size():
    # Device allocations start on a 256-byte boundary, so a view from byte 1 on lies as far as
    # can be from the next one: blas_workspace_allocation_bytes() must still hold the workspace
    # from there, and one byte less must not; nor may less than cublas_workspace_bytes() from a
    # boundary.
    dev = Device()
    inputs, grads = make_problem(np.random.default_rng(5), "gru", 3, 2, 4, 5, np.float32)
    buffers = GraphBuffers(dev, "gru", inputs, grads, cuda_module.GRAD_ALL)
    need, n = cuda_module.cublas_workspace_bytes(), cuda_module.blas_workspace_allocation_bytes()
    assert n >= need
    memory = dev.empty((n + 1,), np.uint8)
    buffers.blas = memory[1:]
    buffers.run()
    torch.cuda.synchronize()
    for too_small in (memory[1:n], memory[:need - 1]):
        buffers.blas = too_small
        with pytest.raises(ValueError, match="blas_workspace: the cuBLAS workspace must hold"):
            buffers.run()


@needs_gpu
def test_tf32_flag_runs_and_stays_close():
    dev = Device()
    inputs, _ = make_problem(np.random.default_rng(2), "lstm", 5, 8, 64, 64, np.float32)
    exact = cuda_forward(dev, "lstm", inputs)
    tf32 = cuda_forward(dev, "lstm", inputs, allow_tf32=True)
    np.testing.assert_allclose(tf32["y"], exact["y"], rtol=0, atol=2e-2)


# ------------------------------------------------------------------ bad input on a GPU


@needs_gpu
def test_host_memory_rejected_on_a_gpu_machine():
    dev = Device()
    inputs, _ = make_problem(np.random.default_rng(0), "simple_rnn", 2, 2, 3, 4, np.float32)
    d = {k: dev.put(v) for k, v in inputs.items()}
    host = np.zeros((2, 2, 3), np.float32)
    fake = FakeDeviceArray(host.shape, ptr=host.ctypes.data)
    sizes = cuda_module.forward_sizes("simple_rnn", 2, 2, 3, 4, False)
    with pytest.raises(ValueError, match="not in GPU memory"):
        cuda_module.forward("simple_rnn", fake, d["h0"], None, d["kernel"],
                            d["recurrent_kernel"], d["bias"], None,
                            y=dev.empty((2, 2, 4), np.float32),
                            h_last=dev.empty((2, 4), np.float32),
                            workspace=dev.empty((sizes["workspace"],), np.float32))


@needs_gpu
@needs_torch
def test_non_contiguous_tensor_rejected():
    x = torch.zeros((3, 2, 4), device="cuda").transpose(0, 1)
    h0 = torch.zeros((2, 5), device="cuda")
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_module.forward("simple_rnn", x, h0, None, torch.zeros((4, 5), device="cuda"),
                            torch.zeros((5, 5), device="cuda"), None, None,
                            y=torch.zeros((2, 3, 5), device="cuda"), h_last=h0,
                            workspace=torch.zeros((1000,), device="cuda"))


@needs_gpu
@needs_torch
def test_cpu_tensor_rejected():
    with pytest.raises(TypeError, match="__cuda_array_interface__"):
        cuda_module.forward("simple_rnn", torch.zeros((2, 3, 4)), None, None, None, None, None,
                            None, y=None, h_last=None, workspace=None)


# --------------------------------------------------------------- vs cuDNN (PyTorch)


def _torch_reference(cell, inputs, grads, dtype):
    """One forward and backward of torch.nn.LSTM/GRU (cuDNN) with the Keras weights mapped."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tdt = getattr(torch, np.dtype(dtype).name)
    x = inputs["x"]
    I, H = x.shape[2], inputs["recurrent_kernel"].shape[0]
    t = lambda a: torch.tensor(a, dtype=tdt, device="cuda", requires_grad=True)  # noqa: E731
    K, R, b = inputs["kernel"], inputs["recurrent_kernel"], inputs["bias"]
    if cell == "lstm":
        net = torch.nn.LSTM(I, H, batch_first=True).to(device="cuda", dtype=tdt)
        order = [0, 1, 2, 3]  # i, f, g, o = Keras' i, f, c, o
        b_ih, b_hh = b, np.zeros_like(b)
    else:
        net = torch.nn.GRU(I, H, batch_first=True).to(device="cuda", dtype=tdt)
        order = [1, 0, 2]  # torch r, z, n from Keras z, r, h
        b_ih, b_hh = b[0], b[1]

    def blocks(m):  # Keras [.., G*H] -> torch [G*H, ..] in torch's gate order
        return np.concatenate([m[..., k * H:(k + 1) * H] for k in order], axis=-1).T

    with torch.no_grad():
        net.weight_ih_l0.copy_(torch.tensor(blocks(K)))
        net.weight_hh_l0.copy_(torch.tensor(blocks(R)))
        net.bias_ih_l0.copy_(torch.tensor(blocks(b_ih[None])[:, 0]))
        net.bias_hh_l0.copy_(torch.tensor(blocks(b_hh[None])[:, 0]))
    xt, h0 = t(x), t(inputs["h0"][None])
    if cell == "lstm":
        c0 = t(inputs["c0"][None])
        y, (hn, cn) = net(xt, (h0, c0))
    else:
        y, hn = net(xt, h0)
    loss = (y * torch.tensor(grads["dy"], device="cuda", dtype=tdt)).sum() + (
        hn[0] * torch.tensor(grads["dh_last"], device="cuda", dtype=tdt)).sum()
    if cell == "lstm":
        loss = loss + (cn[0] * torch.tensor(grads["dc_last"], device="cuda", dtype=tdt)).sum()
    loss.backward()

    def unblocks(g):  # torch [G*H, ..] -> Keras [.., G*H]
        g = g.detach().cpu().numpy().T
        out = np.empty_like(g)
        for dst, src in enumerate(order):
            out[..., dst * H:(dst + 1) * H] = g[..., src * H:(src + 1) * H]
        # order is its own inverse for both cells
        return out

    out = {"y": y.detach().cpu().numpy(), "h_last": hn[0].detach().cpu().numpy(),
           "dx": xt.grad.cpu().numpy(), "dh0": h0.grad[0].cpu().numpy(),
           "dkernel": unblocks(net.weight_ih_l0.grad),
           "drecurrent_kernel": unblocks(net.weight_hh_l0.grad)}
    dbias_ih = unblocks(net.bias_ih_l0.grad[:, None])[0]
    dbias_hh = unblocks(net.bias_hh_l0.grad[:, None])[0]
    out["dbias"] = dbias_ih if cell == "lstm" else np.stack([dbias_ih, dbias_hh])
    if cell == "lstm":
        out["c_last"] = cn[0].detach().cpu().numpy()
        out["dc0"] = c0.grad[0].cpu().numpy()
    return out


FREEZE_CONFIGS = {
    "all_trainable": ["GRAD_X", "GRAD_H0", "GRAD_C0", "GRAD_KERNEL", "GRAD_RECURRENT_KERNEL",
                      "GRAD_BIAS"],
    "kernel_frozen": ["GRAD_X", "GRAD_H0", "GRAD_C0", "GRAD_RECURRENT_KERNEL", "GRAD_BIAS"],
    "both_frozen": ["GRAD_X", "GRAD_H0", "GRAD_C0", "GRAD_BIAS"],
    "both_frozen_no_dx": ["GRAD_H0", "GRAD_C0", "GRAD_BIAS"],
}


@needs_gpu
@needs_torch
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_matches_cudnn(cell, dtype):
    dev = Device()
    rng = np.random.default_rng(7 + len(cell))
    tol = dict(rtol=1e-7, atol=1e-7) if dtype == np.float64 else dict(rtol=1e-3, atol=1e-3)
    for T, B, I, H in [(5, 3, 4, 6), (13, 8, 33, 17), (7, 16, 64, 128)]:
        inputs, grads = make_problem(rng, cell, T, B, I, H, dtype)
        ref = _torch_reference(cell, inputs, grads, dtype)
        fwd = cuda_forward(dev, cell, inputs)
        for k in ("y", "h_last", "c_last"):
            if k in ref:
                np.testing.assert_allclose(fwd[k], ref[k], **tol, err_msg=f"{cell} {k}")
        cache = {k: fwd[k] for k in ("gates", "aux", "h_prev", "y")}
        for config, bits in FREEZE_CONFIGS.items():
            grad_mask = sum(getattr(cuda_module, b) for b in bits)
            got = cuda_backward(dev, cell, inputs, cache, grads, grad_mask)
            for bit in bits:
                name = GRAD_NAMES[bit]
                if name in ref:
                    np.testing.assert_allclose(got[name], ref[name], **tol,
                                               err_msg=f"{cell} {config} {name} vs cuDNN")
            for bit in set(GRAD_BITS) - set(bits):
                name = GRAD_NAMES[bit]
                if name in got:
                    assert np.isnan(got[name]).all(), f"{cell} {config}: {name} was computed"
