#!/usr/bin/env python
"""A small forward and backward of every cell through tfcells' CUDA kernels, for
`compute-sanitizer --tool memcheck` (tools/gpu_session.sh runs it so):

    compute-sanitizer --tool memcheck --error-exitcode 9 python tools/memcheck_driver.py

Per cell: a plain call, one with a step mask, go_backwards and time-major layout, and one with
dropout masks on both sides and a mask; every gradient requested. Device memory comes from the
CUDA runtime through ctypes (no PyTorch or CuPy: under the sanitizer only tfcells' and cuBLAS'
kernels run, and start-up stays short); unwritten outputs start as NaN. The results are also
checked against the CPU kernels, so the run means something without the sanitizer too.
Exit status: 0 all agree, 1 a mismatch or error (each printed), 2 nothing to run on.

The modules come from the installed tfcells or $TFCELLS_CUDA_MODULE_DIR (as for the tests).
"""

import ctypes
import ctypes.util
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_cuda as t  # noqa: E402  (its helpers: problems, CPU and CUDA calls, tolerances)


def _load_cudart():
    """The CUDA runtime library: the one this process has, else the toolkit's, else a pip
    wheel's (nvidia-cuda-runtime)."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    found = ctypes.util.find_library("cudart")
    names += [found] if found else []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    names += sorted(glob.glob(os.path.join(home, "lib*", "libcudart.so*")))
    for path in sys.path:
        names += sorted(glob.glob(os.path.join(path, "nvidia", "*", "lib", "libcudart.so*")))
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e))
    raise RuntimeError("no CUDA runtime library loads: " + "; ".join(errors[-4:]))


class _Runtime:
    H2D, D2H = 1, 2  # cudaMemcpyKind

    def __init__(self):
        self.lib = _load_cudart()
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.lib.cudaFree.argtypes = [ctypes.c_void_p]
        self.lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                        ctypes.c_int]

    def check(self, status, what):
        if status != 0:
            text = self.lib.cudaGetErrorString(status).decode()
            raise RuntimeError(f"{what} failed: CUDA error {status}: {text}")


class _DeviceArray:
    """Device memory with __cuda_array_interface__ (version 3, no stream: the legacy stream)."""

    def __init__(self, rt, shape, dtype):
        self.rt, self.shape, self.dtype = rt, tuple(int(s) for s in shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = ctypes.c_void_p(0)
        if self.nbytes:
            rt.check(rt.lib.cudaMalloc(ctypes.byref(self.ptr), self.nbytes), "cudaMalloc")
        self.__cuda_array_interface__ = dict(shape=self.shape, typestr=self.dtype.str,
                                             data=(self.ptr.value or 0, False), strides=None,
                                             version=3, stream=None)

    def __del__(self):
        if self.ptr.value:
            self.rt.lib.cudaFree(self.ptr)


class RawDevice:
    """test_cuda.Device's interface over the bare CUDA runtime."""

    def __init__(self):
        self.rt = _Runtime()

    def put(self, a):
        a = np.ascontiguousarray(a)
        out = _DeviceArray(self.rt, a.shape, a.dtype)
        if out.nbytes:
            self.rt.check(self.rt.lib.cudaMemcpy(out.ptr, a.ctypes.data, out.nbytes, _Runtime.H2D),
                          "cudaMemcpy to the device")
        return out

    def empty(self, shape, dtype, fill=np.nan):
        host = np.full(tuple(int(s) for s in shape), fill if np.dtype(dtype).kind == "f" else 0,
                       dtype=dtype)
        return self.put(host)  # NaN: an output the kernels never write shows up in the check

    def get(self, d):
        out = np.empty(d.shape, d.dtype)
        if d.nbytes:
            self.rt.check(self.rt.lib.cudaMemcpy(out.ctypes.data, d.ptr, d.nbytes, _Runtime.D2H),
                          "cudaMemcpy to the host")
        return out

    stream = 0

    def sync(self):
        self.rt.check(self.rt.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


# (name, time_major, go_backwards, with_mask, dropout)
CASES = [("plain", False, False, False, None),
         ("mask_backwards_time_major", True, True, True, None),
         ("dropout_mask", False, False, True, "both"),
         ("dropout_backwards", False, True, False, "recurrent")]


def run_case(dev, cell, name, time_major, go_backwards, with_mask, dropout, seed):
    rng = np.random.default_rng(seed)
    T, B, I, H = 4, 3, 5, 7
    inputs, grads = t.make_problem(rng, cell, T, B, I, H, np.float32, time_major,
                                   with_bias=True, with_mask=with_mask)
    if dropout:
        inputs.update(t.make_dropout(rng, cell, B, I, H, np.float32, dropout))
    tol = t.tolerance(np.float32)
    ref = t.cpu_forward(cell, inputs, time_major, go_backwards)
    got = t.cuda_forward(dev, cell, inputs, time_major, go_backwards)
    for k in ("y", "h_last", "c_last"):
        if k in got:
            np.testing.assert_allclose(got[k], ref[k], **tol, err_msg=f"forward {k}")
    cache = {k: ref[k] for k in ("gates", "aux", "h_prev", "y")}
    grad_all = t.cuda_module.GRAD_ALL
    want = t.cpu_backward(cell, inputs, cache, grads, grad_all, time_major, go_backwards)
    have = t.cuda_backward(dev, cell, inputs, cache, grads, grad_all, time_major, go_backwards)
    for k, v in want.items():
        if k in have and v is not None:
            np.testing.assert_allclose(have[k], v, **tol, err_msg=f"backward {k}")
    # Inference too (no cache, a workspace of its own size).
    t.cuda_forward(dev, cell, inputs, time_major, go_backwards, training=False)


def main():
    if t.cuda_module is None or t.core_module is None:
        print(f"cannot run: {t.CUDA_MODULE_MISSING or t.CORE_MODULE_MISSING}")
        return 2
    count = t.cuda_module.device_count()  # raises, with CUDA's text, on a broken set-up
    if count == 0:
        print(f"cannot run: no CUDA GPU ({t.cuda_module.cuda_versions()})")
        return 2
    print(f"cuBLAS: {t.cuda_module.cublas_library()}", flush=True)
    dev = RawDevice()
    failures = 0
    for seed, cell in enumerate(t.CELLS):
        for case in CASES:
            start = time.perf_counter()
            try:
                run_case(dev, cell, *case, seed=seed)
                status = "ok"
            except Exception as e:  # report every case, then fail
                failures += 1
                status = f"FAILED: {type(e).__name__}: {e}"
            print(f"{cell:17s} {case[0]:26s} {time.perf_counter() - start:6.2f} s  {status}",
                  flush=True)
    print(f"{failures} of {len(t.CELLS) * len(CASES)} cases failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
