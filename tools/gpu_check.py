#!/usr/bin/env python
"""Times one training step of tfcells' CUDA kernels against cuDNN (torch.nn.LSTM / GRU).

Standalone: needs a CUDA GPU, PyTorch with CUDA, and the compiled `_tfcells_cuda` module (from
an installed tfcells, or from a build directory given by --module-dir or
$TFCELLS_CUDA_MODULE_DIR); TensorFlow is not needed. For each shape, cell and freeze
configuration it reports the step time (forward + backward) of both, their ratio, tfcells'
time against cuDNN's full (all-trainable) step, and achieved TFLOP/s against the GPU's nominal
dense peak. TF32 is off unless --tf32 is given (then it is on for both).

    python tools/gpu_check.py                       # the two issue shapes, LSTM and GRU
    python tools/gpu_check.py --shapes 100,64,1024,1024 --cells lstm --json out.json

Freeze configurations (the gradient mask tfcells is given; cuDNN gets the same via
requires_grad, and computes what it computes):
    all_trainable      dx, dh0, dc0, dkernel, drecurrent_kernel, dbias
    kernel_frozen      ... without dkernel
    both_frozen        dx, dh0, dc0, dbias
    both_frozen_no_dx  dh0, dc0, dbias (the input needs no gradient either)
"""

import argparse
import importlib
import json
import os
import sys

GATES = {"lstm": 4, "gru": 3}
CONFIGS = {
    "all_trainable": ("x", "h0", "kernel", "recurrent_kernel", "bias"),
    "kernel_frozen": ("x", "h0", "recurrent_kernel", "bias"),
    "both_frozen": ("x", "h0", "bias"),
    "both_frozen_no_dx": ("h0", "bias"),
}
# Nominal dense peaks (TFLOP/s) from NVIDIA's datasheets, (FP32 CUDA cores, TF32 tensor
# cores without sparsity), matched in order against torch.cuda.get_device_name().
PEAKS = [(("H100", "PCIe"), "H100 PCIe", (51.2, 378.0)),
         (("H100", "NVL"), "H100 NVL", (60.0, 417.5)),
         (("H100",), "H100 SXM", (67.0, 494.7)),
         (("H200",), "H200", (67.0, 494.7)),
         (("A100",), "A100", (19.5, 156.0)),
         (("L40S",), "L40S", (91.6, 183.0))]


def load_module(directory):
    try:
        return importlib.import_module("tfcells._tfcells_cuda")
    except Exception as e:
        first = e
    directory = directory or os.environ.get("TFCELLS_CUDA_MODULE_DIR")
    if directory:
        sys.path.insert(0, directory)
        return importlib.import_module("_tfcells_cuda")
    sys.exit(f"cannot import tfcells._tfcells_cuda ({first}); pass --module-dir BUILD_DIR")


def peak_for(name):
    for parts, key, peak in PEAKS:
        if all(p.lower() in name.lower() for p in parts):
            return key, peak
    return None, None


def step_flops(T, B, I, H, G, grads):
    """GEMM FLOPs of one step: forward X·W_x, H·W_h; backward the dh recurrence, then dx,
    dW_x, dW_h when requested (pointwise work is not counted)."""
    unit_x, unit_h = 2 * T * B * I * G * H, 2 * T * B * H * G * H
    flops = unit_x + unit_h + unit_h
    flops += unit_x if "x" in grads else 0
    flops += unit_x if "kernel" in grads else 0
    flops += unit_h if "recurrent_kernel" in grads else 0
    return flops


class TfcellsStep:
    """Preallocated buffers and one training step (forward + masked backward)."""

    def __init__(self, m, torch, cell, T, B, I, H, grads, tf32):
        G, dev, f32 = GATES[cell], "cuda", torch.float32
        self.m, self.torch, self.cell, self.tf32 = m, torch, cell, tf32
        r = lambda *s: torch.randn(*s, device=dev, dtype=f32)  # noqa: E731
        self.x, self.h0 = r(B, T, I), r(B, H) * 0.5
        self.c0 = r(B, H) * 0.5 if cell == "lstm" else None
        self.kernel, self.rk = r(I, G * H) / I ** 0.5, r(H, G * H) / H ** 0.5
        self.bias = r(2, G * H) * 0.1 if cell == "gru" else r(G * H) * 0.1
        sizes = m.forward_sizes(cell, T, B, I, H, True)
        e = lambda *s: torch.empty(*s, device=dev, dtype=f32)  # noqa: E731
        self.y, self.h_last = e(B, T, H), e(B, H)
        self.c_last = e(B, H) if cell == "lstm" else None
        self.gates, self.aux, self.h_prev = e(sizes["gates"]), e(sizes["aux"]), e(sizes["h_prev"])
        self.fws = e(sizes["workspace"])
        self.dy, self.dh_last = r(B, T, H), r(B, H)
        self.dc_last = r(B, H) if cell == "lstm" else None
        names = {"x": "GRAD_X", "h0": "GRAD_H0", "kernel": "GRAD_KERNEL",
                 "recurrent_kernel": "GRAD_RECURRENT_KERNEL", "bias": "GRAD_BIAS"}
        self.mask = sum(getattr(m, names[g]) for g in grads)
        if cell == "lstm" and "h0" in grads:
            self.mask |= m.GRAD_C0
        self.out = {"dx": e(B, T, I) if "x" in grads else None, "dh0": e(B, H),
                    "dc0": e(B, H) if cell == "lstm" else None,
                    "dkernel": e(I, G * H) if "kernel" in grads else None,
                    "drecurrent_kernel": e(H, G * H) if "recurrent_kernel" in grads else None,
                    "dbias": torch.empty_like(self.bias)}
        self.bws = e(m.backward_workspace_size(cell, T, B, I, H, self.mask, True))

    def __call__(self):
        s = self.torch.cuda.current_stream().cuda_stream
        self.m.forward(self.cell, self.x, self.h0, self.c0, self.kernel, self.rk, self.bias, None,
                       y=self.y, h_last=self.h_last, c_last=self.c_last, gates=self.gates,
                       aux=self.aux, h_prev=self.h_prev, workspace=self.fws, stream=s,
                       allow_tf32=self.tf32)
        self.m.backward(self.cell, self.x, self.h0, self.c0, self.kernel, self.rk, self.bias,
                        None, self.gates, self.aux, self.h_prev, self.dy, self.dh_last,
                        self.dc_last, workspace=self.bws, grad_mask=self.mask, stream=s,
                        allow_tf32=self.tf32, **self.out)


class CudnnStep:
    def __init__(self, torch, cell, T, B, I, H, grads):
        dev = "cuda"
        cls = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
        self.net = cls(I, H, batch_first=True).to(dev)
        self.net.weight_ih_l0.requires_grad_("kernel" in grads)
        self.net.weight_hh_l0.requires_grad_("recurrent_kernel" in grads)
        self.x = torch.randn(B, T, I, device=dev, requires_grad="x" in grads)
        self.h0 = torch.randn(1, B, H, device=dev, requires_grad=True)
        self.c0 = torch.randn(1, B, H, device=dev, requires_grad=True) if cell == "lstm" else None
        self.dy = torch.randn(B, T, H, device=dev)
        self.cell = cell

    def __call__(self):
        state = (self.h0, self.c0) if self.cell == "lstm" else self.h0
        y, _ = self.net(self.x, state)
        y.backward(self.dy)


def time_ms(torch, fn, warmup, iters):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", default=["100,64,1024,1024", "100,256,512,512"],
                   help="T,B,I,H (default: the two shapes of issue 6)")
    p.add_argument("--cells", nargs="*", default=["lstm", "gru"], choices=sorted(GATES))
    p.add_argument("--tf32", action="store_true", help="TF32 tensor cores for both (default off)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--module-dir", help="build directory holding _tfcells_cuda")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU visible to PyTorch")
    m = load_module(args.module_dir)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name()
    peak_key, peak = peak_for(name)
    peak_value = None if peak is None else peak[1 if args.tf32 else 0]
    print(f"GPU: {name}; cuBLAS: {m.cublas_library()}; cuDNN: {torch.backends.cudnn.version()}; "
          f"torch {torch.__version__}")
    print(f"float32, TF32 {'ON' if args.tf32 else 'OFF'} for both; nominal dense peak: "
          + (f"{peak_value} TFLOP/s ({peak_key} datasheet)" if peak_value else "unknown"))
    header = (f"{'shape T,B,I,H':>18} {'cell':>5} {'config':>18} {'tfcells ms':>10} "
              f"{'cuDNN ms':>9} {'ratio':>6} {'vs cuDNN full':>13} {'tfcells TFLOP/s':>15} "
              f"{'% peak':>6}")
    print(header)
    results = []
    for shape in args.shapes:
        T, B, I, H = (int(v) for v in shape.split(","))
        for cell in args.cells:
            full_cudnn = None
            for config, grads in CONFIGS.items():
                ours = TfcellsStep(m, torch, cell, T, B, I, H, grads, args.tf32)
                theirs = CudnnStep(torch, cell, T, B, I, H, grads)
                t_ours = time_ms(torch, ours, args.warmup, args.iters)
                t_theirs = time_ms(torch, theirs, args.warmup, args.iters)
                if full_cudnn is None:
                    full_cudnn = t_theirs
                flops = step_flops(T, B, I, H, GATES[cell], grads)
                tflops = flops / (t_ours * 1e-3) / 1e12
                row = dict(T=T, B=B, I=I, H=H, cell=cell, config=config, tf32=args.tf32,
                           tfcells_ms=t_ours, cudnn_ms=t_theirs, ratio=t_ours / t_theirs,
                           vs_cudnn_full=t_ours / full_cudnn, tfcells_tflops=tflops,
                           peak_fraction=None if peak_value is None else tflops / peak_value,
                           gpu=name)
                results.append(row)
                pct = "" if peak_value is None else f"{100 * tflops / peak_value:5.1f}%"
                print(f"{shape:>18} {cell:>5} {config:>18} {t_ours:10.2f} {t_theirs:9.2f} "
                      f"{row['ratio']:6.2f} {row['vs_cudnn_full']:13.2f} {tflops:15.1f} {pct:>6}",
                      flush=True)
                del ours, theirs
                torch.cuda.empty_cache()
    print("ratio = tfcells / cuDNN in the same configuration; 'vs cuDNN full' = tfcells / "
          "cuDNN's all-trainable step. Targets (issue 6): all-trainable ratio <= 1.25; every "
          "frozen configuration's 'vs cuDNN full' < 1.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
