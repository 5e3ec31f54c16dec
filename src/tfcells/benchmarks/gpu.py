"""--device gpu: which GPU suite this machine can run, and the pybind11-vs-cuDNN suite.

Two suites. Where TensorFlow sees a GPU and tfcells' GPU kernels are loaded, the ordinary
suite runs on it (cli.py; the TF contenders under tf.device('/GPU:0'), PyTorch on CUDA).
Where TensorFlow cannot use the GPU (tensorflow-cpu, as requirements.txt installs) but PyTorch
can and tfcells was built with CUDA, this module's suite runs instead: tfcells' CUDA kernels
through the pybind11 module `tfcells._tfcells_cuda`, on PyTorch CUDA tensors, against
torch.nn.LSTM / GRU / RNN (cuDNN) with the same weights, inputs and dy, one training step per
freeze configuration, checked for equal values before it is timed with CUDA events.
"""

import importlib
import os
import sys

import numpy as np

from . import contenders, timing
from .workload import GATES, MIXED_POLICIES, Shape, weight_dtype

# Single-layer training configurations (workload.CONFIGS): what a gradient mask expresses.
CONFIGS = ("all_trainable", "kernel_frozen", "recurrent_frozen", "both_frozen",
           "both_frozen_no_dx")
# Issue 6's shapes (T, B, I, H).
SHAPES = (Shape(100, 64, 1024, 1024), Shape(100, 256, 512, 512))
# Nominal dense peaks (TFLOP/s) from NVIDIA's datasheets: (FP32 CUDA cores, TF32 tensor cores,
# BF16/FP16 tensor cores, all without sparsity), matched in order against the device name.
PEAKS = [(("H100", "PCIe"), "H100 PCIe", (51.2, 378.0, 756.0)),
         (("H100", "NVL"), "H100 NVL", (60.0, 417.5, 835.5)),
         (("H100",), "H100 SXM", (67.0, 494.7, 989.4)),
         (("H200",), "H200", (67.0, 494.7, 989.4)),
         (("A100",), "A100", (19.5, 156.0, 312.0)),
         (("L40S",), "L40S", (91.6, 183.0, 362.1))]


def peak_for(device_name, dtype, tf32):
    """(datasheet entry, TFLOP/s) of the matching PEAKS row, or (None, None): unknown GPU, or
    float64, which has no entry here. 16-bit storage is held to the 16-bit tensor-core peak:
    cuDNN under autocast multiplies in float16, and tfcells' GEMMs let cuBLAS round to the
    16-bit type (it may pick TF32 kernels instead: csrc/cuda/gemm_mapping.h)."""
    for parts, key, (fp32, tf32_peak, half) in PEAKS:
        if all(p.lower() in device_name.lower() for p in parts):
            if dtype == "float32":
                return key, tf32_peak if tf32 else fp32
            if dtype in MIXED_POLICIES:  # the 16-bit dtypes
                return key, half
    return None, None


def _import_cuda_module():
    """tfcells._tfcells_cuda from the installed package, else `_tfcells_cuda` from the build
    directory $TFCELLS_CUDA_MODULE_DIR (a GPU machine without TensorFlow builds only the
    pybind11 modules with CMake; tests/test_cuda.py finds them the same way)."""
    try:
        from tfcells import _tfcells_cuda as module
        return module
    except ImportError:
        directory = os.environ.get("TFCELLS_CUDA_MODULE_DIR")
        if not directory:
            raise
        sys.path.insert(0, directory)
        try:  # once imported, the module stays in sys.modules; the path need not
            return importlib.import_module("_tfcells_cuda")
        finally:
            sys.path.remove(directory)


def _cuda_module():
    """(the _tfcells_cuda module, None), or (None, why it is not usable)."""
    try:
        module = _import_cuda_module()
    except ImportError as e:
        return None, (f"tfcells._tfcells_cuda does not import ({e}): this tfcells build has "
                      "no CUDA code; rebuild it where nvcc is available, or point "
                      "$TFCELLS_CUDA_MODULE_DIR at a CMake build directory holding it")
    try:
        count = module.device_count()
    except RuntimeError as e:  # a broken set-up (e.g. an old driver), not an absent GPU
        return None, f"CUDA fails: {e}"
    if count == 0:
        return None, "the CUDA runtime finds no GPU"
    try:
        module.cublas_library()
    except RuntimeError as e:
        return None, f"no cuBLAS loads ({e})"
    return module, None


def _torch_cuda():
    """(torch, None) when PyTorch can use a CUDA GPU, else (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed (it supplies the device memory and cuDNN)"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA GPU"
    return torch, None


def which_suite():
    """("tf" or "cuda_module", None): the GPU suite this machine can run; (None, why none)."""
    try:
        import tensorflow as tf
        from tfcells import _loader
    except ImportError as e:  # a GPU machine with PyTorch and no TensorFlow
        tf, tf_gpus, why_tf = None, [], f"TensorFlow does not import ({e})"
    else:
        tf_gpus = tf.config.list_physical_devices("GPU")
        why_tf = ("TensorFlow sees no GPU (tensorflow-cpu, or no NVIDIA GPU)" if not tf_gpus
                  else "TensorFlow sees a GPU, but tfcells' GPU kernels are not loaded: "
                  f"{_loader.gpu_kernels_unavailable}")
    if tf_gpus and _loader.gpu_c_library is not None:
        # PyTorch, a contender, needs GPU memory too: TF must not take it all up front.
        for device in tf_gpus:
            try:
                tf.config.experimental.set_memory_growth(device, True)
            except RuntimeError:  # the GPU is already initialised (main() run twice)
                pass
        return "tf", None
    torch, why_not = _torch_cuda()
    if torch is not None:
        module, why_not = _cuda_module()
        if module is not None:
            return "cuda_module", None
    return None, (f"--device gpu: no GPU suite can run here. The TensorFlow suite: {why_tf}. "
                  f"The pybind11-vs-cuDNN suite: {why_not}. Run it on a machine with an "
                  "NVIDIA GPU where tfcells was built with CUDA (see README, GPU).")


def set_tf32(on, tensorflow=False):
    """TF32 tensor cores on or off for every contender: PyTorch's GEMMs and cuDNN (the
    tfcells_cuda contender follows PyTorch's flag), and with tensorflow=True TensorFlow's own
    GEMMs and tfcells' TF GPU kernels. Returns what took effect."""
    out = {}
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on
        out["torch"] = (torch.backends.cuda.matmul.allow_tf32
                        and torch.backends.cudnn.allow_tf32)
    except ImportError:
        pass
    if tensorflow:
        import tensorflow as tf
        from tfcells import _loader

        tf.config.experimental.enable_tensor_float_32_execution(on)  # on by default in TF
        out["tensorflow"] = tf.config.experimental.tensor_float_32_execution_enabled()
        if _loader.gpu_c_library is not None:
            _loader.gpu_c_library.tfcells_gpu_set_allow_tf32(int(on))
            out["tfcells"] = bool(_loader.gpu_c_library.tfcells_gpu_allow_tf32())
    return out


def device_facts(dtype, tf32):
    """What the cuda_module suite's numbers depend on, for the report's header and JSON."""
    import torch

    module, _ = _cuda_module()
    name = torch.cuda.get_device_name()
    key, peak = peak_for(name, dtype, tf32)
    return {"name": name, "peak_tflops": peak, "peak_source": key and f"{key} datasheet",
            "cublas": module.cublas_library() if module else None,
            "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "tf32": tf32}


class _TorchArrays:
    """Device memory for the pybind11 module: PyTorch CUDA tensors. `dtype` is the storage
    type (x, states, outputs and their gradients); a 16-bit one computes in float32 (weights,
    cache, workspace, weight gradients), and bfloat16 reaches the module as its bits in int16
    (PyTorch exports no bfloat16 __cuda_array_interface__)."""

    def __init__(self, torch, dtype):
        self.torch, self.storage = torch, getattr(torch, dtype)
        self.compute = getattr(torch, weight_dtype(dtype))

    def put(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to("cuda")

    def put_storage(self, a):
        wide = np.ascontiguousarray(a, np.float32 if self.storage != self.compute else None)
        return self.torch.from_numpy(wide).to("cuda").to(self.storage)

    def empty(self, *shape):
        return self.torch.empty(shape, dtype=self.compute, device="cuda")

    def empty_storage(self, *shape):
        return self.torch.empty(shape, dtype=self.storage, device="cuda")

    def arg(self, t):
        return t.view(self.torch.int16) if t.dtype == self.torch.bfloat16 else t

    def blas_workspace(self, module):
        """Bytes for the calls' blas_workspace on the current GPU."""
        size = module.blas_workspace_allocation_bytes(self.torch.cuda.current_device())
        return self.torch.empty(size, dtype=self.torch.uint8, device="cuda")

    def get(self, t):
        return (t.float() if t.dtype != self.compute else t).cpu().numpy()

    @property
    def stream(self):
        return self.torch.cuda.current_stream().cuda_stream


class TfcellsCudaStep:
    """tfcells' CUDA kernels for one workload: every buffer allocated once, then each call
    enqueues the forward (keeping the training cache) and the backward with the
    configuration's gradient mask. Initial states are zeros, dy the workload's, as for every
    contender of the CPU suite."""

    def __init__(self, module, arrays, work, allow_tf32):
        s, cell, w = work.shape, work.cell, work.weights[0]
        T, B, I, H = s.T, s.B, s.I, s.H
        self.module, self.arrays, self.cell, self.allow_tf32 = module, arrays, cell, allow_tf32
        # 16-bit storage: its name for the module (float16 it reads from x's dtype too)
        self.storage = {} if weight_dtype(work.dtype) == work.dtype else {"storage": work.dtype}
        lstm = cell == "lstm"
        zeros = arrays.put_storage(np.zeros([B, H], np.float32))
        self.inputs = [arrays.put_storage(work.x), zeros, zeros if lstm else None,
                       arrays.put(w["kernel"]), arrays.put(w["recurrent_kernel"]),
                       arrays.put(w["bias"]), None]  # x, h0, c0, kernels, bias, mask
        sizes = module.forward_sizes(cell, T, B, I, H, True, **self.storage)
        self.cache = [arrays.empty(sizes[k]) for k in ("gates", "aux", "h_prev")]
        self.outputs = {"y": arrays.empty_storage(B, T, H), "h_last": arrays.empty_storage(B, H),
                        "c_last": arrays.empty_storage(B, H) if lstm else None}
        self.forward_workspace = arrays.empty(sizes["workspace"])
        self.dy = arrays.put_storage(work.dy)
        # Keras name of each requested gradient -> (mask bit, backward() argument, shape)
        wanted = {"x": ("GRAD_X", "dx", (B, T, I)),
                  "kernel": ("GRAD_KERNEL", "dkernel", w["kernel"].shape),
                  "recurrent_kernel": ("GRAD_RECURRENT_KERNEL", "drecurrent_kernel",
                                       w["recurrent_kernel"].shape),
                  "bias": ("GRAD_BIAS", "dbias", w["bias"].shape)}
        self.grad_mask = sum(getattr(module, wanted[n][0]) for n in work.grads)
        self.grads = {n: (wanted[n][1], (arrays.empty_storage if n == "x" else arrays.empty)(
            *wanted[n][2])) for n in work.grads}
        self.backward_workspace = arrays.empty(
            module.backward_workspace_size(cell, T, B, I, H, self.grad_mask, True, **self.storage))
        # cuBLAS' workspace, as the TensorFlow op's allocator hands it over; with it the calls
        # replay their CUDA graphs (csrc/cuda/cuda_graphs.h).
        self.blas_workspace = arrays.blas_workspace(module)

    def forward(self):
        gates, aux, h_prev = self.cache
        a = self.arrays.arg
        self.module.forward(self.cell, *[None if t is None else a(t) for t in self.inputs],
                            **{k: None if t is None else a(t) for k, t in self.outputs.items()},
                            gates=gates, aux=aux, h_prev=h_prev, workspace=self.forward_workspace,
                            stream=self.arrays.stream, allow_tf32=self.allow_tf32,
                            blas_workspace=self.blas_workspace, **self.storage)

    def backward(self):
        # No incoming gradient for the final states: the loss is sum(y * dy).
        a = self.arrays.arg
        self.module.backward(self.cell, *[None if t is None else a(t) for t in self.inputs],
                             *self.cache, a(self.dy), None, None,
                             **{k: a(t) for k, t in self.grads.values()},
                             workspace=self.backward_workspace, grad_mask=self.grad_mask,
                             stream=self.arrays.stream, allow_tf32=self.allow_tf32,
                             y=a(self.outputs["y"]), blas_workspace=self.blas_workspace,
                             **self.storage)

    def run(self):
        self.forward()
        self.backward()

    def fetch(self, _):
        out = {k: self.arrays.get(v) for k, v in self.outputs.items() if v is not None}
        out.update({n: self.arrays.get(t) for n, (_, t) in self.grads.items()})
        return out


def _unsupported_config(work):
    if work.config.name not in CONFIGS:
        return f"the GPU suite runs the single-layer training configurations {', '.join(CONFIGS)}"
    return None


class TfcellsCudaContender(contenders.Contender):
    name = "tfcells_cuda"
    label = "tfcells CUDA"
    measure = staticmethod(timing.measure_cuda_events)

    def unavailable(self):
        return _torch_cuda()[1] or _cuda_module()[1]

    def unsupported(self, work):
        return _unsupported_config(work) or super().unsupported(work)

    def build(self, work):
        import torch

        # TF32 exactly when PyTorch's GEMMs and cuDNN use it (set_tf32 sets both).
        step = TfcellsCudaStep(_cuda_module()[0], _TorchArrays(torch, work.dtype), work,
                               torch.backends.cuda.matmul.allow_tf32)
        return contenders.Step(step.run, step.fetch, "cuda", self.measure)


class CudnnContender(contenders.TorchContender):
    """The PyTorch contender on CUDA (cuDNN's fused RNN), timed like tfcells_cuda."""

    name = "cudnn"
    label = "cuDNN (PyTorch)"
    measure = staticmethod(timing.measure_cuda_events)

    def unavailable(self):
        return _torch_cuda()[1]

    def unsupported(self, work):
        return _unsupported_config(work) or super().unsupported(work)


REGISTRY = {c.name: c for c in (TfcellsCudaContender(), CudnnContender())}
REFERENCE, BASELINE = "tfcells_cuda", "cudnn"


def _ratio(a, b):
    return a / b if a is not None and b else None


def annotate(records, peak_tflops, tf32):
    """Adds what the GPU table reports to each record: tf32; tflops (GEMM FLOP model ÷
    median) and peak_fraction; vs_cudnn (÷ cuDNN's median, same cell, shape and config) and
    vs_cudnn_all_trainable (÷ cuDNN's all-trainable step of the same cell and shape)."""
    median = {(r["cell"], r["T"], r["B"], r["I"], r["H"], r["dtype"], r["sweep"], r["config"],
               r["impl"]): r["median_ms"] for r in records}
    for r in records:
        key = (r["cell"], r["T"], r["B"], r["I"], r["H"], r["dtype"], r["sweep"])
        ms = r["median_ms"]
        r["tf32"] = tf32
        r["tflops"] = _ratio(r["flops"] / 1e9, ms)
        r["peak_fraction"] = _ratio(r["tflops"], peak_tflops)
        r["vs_cudnn"] = _ratio(ms, median.get((*key, r["config"], BASELINE)))
        r["vs_cudnn_all_trainable"] = _ratio(ms, median.get((*key, "all_trainable", BASELINE)))
    return records
