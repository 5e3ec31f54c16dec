"""Before anything is timed: do the contenders compute the same numbers?"""

import numpy as np

# Max error relative to the reference's largest magnitude. float32 sums over T*B rows in
# different orders land near 1e-5; a wrong gate order or a missing term is far above 1e-3.
# 16-bit (mixed precision, --dtype): tfcells rounds only its outputs to 16 bits, Keras' layers
# (and PyTorch's autocast) round gates and states at every step. Keras against tfcells at the
# --quick shape (T=100 B=64 I=H=256), every cell, five configs: float16 up to 2e-3, bfloat16
# (8-bit mantissa, 3 bits fewer) up to 2.1e-2 (y of the LSTM stack; the rest 0.6-1.4e-2).
# bfloat16's 6e-2 is about 3x that; a wrong gate order or a doubled gradient is off by ~1.
TOLERANCE = {"bfloat16": 6e-2, "float16": 3e-2, "float32": 1e-3, "float64": 1e-8}
# float32 with TF32 tensor cores (10-bit mantissa operands) in both contenders' GEMMs.
TF32_TOLERANCE = 2e-2


def relative_error(got, want):
    scale = max(float(np.max(np.abs(want))), np.finfo(np.float64).tiny) if want.size else 1.0
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got.astype(np.float64) - want), initial=0.0)) / scale


def compare(got, want, dtype, tolerance=None):
    """Returns (ok, {name: relative error}, message) for one contender against the reference.

    Every tensor the reference produced must be there and within tolerance; a gradient the
    step asked for and got as None counts as wrong. `tolerance` overrides the dtype's.
    """
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    errors, bad = {}, []
    for name, ref in want.items():
        value = got.get(name)
        if ref is None:
            continue
        if value is None:
            errors[name] = float("inf")
        else:
            errors[name] = relative_error(np.asarray(value), np.asarray(ref, np.float64))
        if not errors[name] <= tol:
            bad.append(f"{name} off by {errors[name]:.2g}")
    message = "" if not bad else f"differs from the reference (tolerance {tol:g}): " + \
        ", ".join(bad)
    return not bad, errors, message
