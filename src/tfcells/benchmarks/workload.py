"""What is measured: cells, freeze configurations, shapes, and the shared input data."""

import dataclasses

import numpy as np

# Gate blocks per cell: the weight matrices are [I, G*H] and [H, G*H].
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}
CELLS = tuple(GATES)
DROPOUT_RATE = 0.2
# --dtype bfloat16 / float16: mixed precision. The data (x, dy, states, outputs, dropout masks)
# is stored in the 16-bit dtype; the weights are float32 variables, as Keras' mixed policies
# keep them (tfcells computes in float32 inside: tfcells.ops.COMPUTE_DTYPES).
MIXED_POLICIES = {"bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def weight_dtype(dtype):
    """The dtype of the weights (variables) in a run of `dtype`."""
    return "float32" if dtype in MIXED_POLICIES else dtype


def numpy_dtype(dtype):
    """A NumPy dtype for a dtype name; bfloat16 from ml_dtypes (a TensorFlow dependency)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class Config:
    """One freeze configuration of a training step (or forward-only inference)."""

    name: str
    train: bool = True  # False: forward only, no tape
    kernel: bool = True  # kernel (input projection) trainable
    recurrent: bool = True  # recurrent kernel trainable
    dx: bool = True  # the input needs a gradient
    stack: bool = False  # 2 layers; the first entirely frozen, the second all trainable
    # All trainable with dropout and recurrent_dropout at DROPOUT_RATE, as Keras applies them
    # (implementation=1: one input and one recurrent mask per gate, fixed for the sequence).
    dropout: bool = False

    @property
    def layers(self):
        return 2 if self.stack else 1

    @property
    def mode(self):
        return "train" if self.train else "infer"


CONFIGS = {c.name: c for c in (
    Config("all_trainable"),
    Config("kernel_frozen", kernel=False),
    Config("recurrent_frozen", recurrent=False),
    Config("both_frozen", kernel=False, recurrent=False),
    Config("both_frozen_no_dx", kernel=False, recurrent=False, dx=False),
    # The second layer's input comes from a frozen layer, so it needs no dx either.
    Config("frozen_layer_in_stack", dx=False, stack=True),
    Config("dropout", dropout=True),
    Config("inference", train=False, dx=False),
)}


@dataclasses.dataclass(frozen=True)
class Shape:
    T: int
    B: int
    I: int
    H: int

    @classmethod
    def parse(cls, text):
        values = [int(v) for v in text.split(",")]
        if len(values) != 4 or min(values) < 1:
            raise ValueError(f"shape must be four positive integers T,B,I,H, got {text!r}")
        return cls(*values)

    def __str__(self):
        return f"T={self.T} B={self.B} I={self.I} H={self.H}"


def trainable_names(config, layer):
    """Names of the tensors whose gradient the step asks for, in the given layer."""
    if not config.train or (config.stack and layer == 0):
        return []
    if config.stack:  # the trainable top layer of the stack
        return ["kernel", "recurrent_kernel", "bias"]
    names = [n for n, on in (("kernel", config.kernel), ("recurrent_kernel", config.recurrent))
             if on]
    names.append("bias")  # the bias stays trainable in every training configuration
    if config.dx:
        names.append("x")
    return names


@dataclasses.dataclass
class Workload:
    """The data every contender of one (cell, config, shape, dtype) receives: NumPy arrays in
    Keras layout, converted once per framework so that all contenders see the same values."""

    cell: str
    config: Config
    shape: Shape
    dtype: str  # of x, dy, states, outputs and masks (16-bit: MIXED_POLICIES)
    device: str  # "cpu" or "gpu"
    x: np.ndarray  # [B, T, I]
    dy: np.ndarray  # [B, T, H]: the loss is sum(outputs * dy), so every output matters
    weights: list  # per layer: {"kernel", "recurrent_kernel", "bias"}, weight_dtype(dtype)
    # config.dropout: {"input": [G, B, I], "recurrent": [G, B, H]}, Keras-scaled (0 or
    # 1/(1-rate)); every contender applies these same masks, so values can be checked.
    dropout_masks: dict = None
    # Framework tensors made from x and dy, shared by that framework's contenders.
    cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def mixed_policy(self):
        """The Keras mixed-precision policy name of a 16-bit run, else None."""
        return MIXED_POLICIES.get(self.dtype)

    @property
    def grads(self):
        """Names of the gradients of the trainable layer (the last one)."""
        return trainable_names(self.config, self.config.layers - 1)


def make_workload(cell, config, shape, dtype, device="cpu", seed=0):
    """The same random values whatever the dtype (drawn in float64, then rounded), with the
    weights in weight_dtype(dtype) and the data in `dtype`."""
    rng = np.random.default_rng(seed)
    wdtype, dtype = numpy_dtype(weight_dtype(dtype)), numpy_dtype(dtype)
    g = GATES[cell]
    weights = []
    for layer in range(config.layers):
        fan_in = shape.I if layer == 0 else shape.H
        # Small uniform weights keep the gates out of saturation, so gradients are not ~0.
        scale = 1.0 / np.sqrt(shape.H)
        bias_shape = [2, g * shape.H] if cell == "gru" else [g * shape.H]  # GRU reset_after
        weights.append({
            "kernel": rng.uniform(-scale, scale, [fan_in, g * shape.H]).astype(wdtype),
            "recurrent_kernel": rng.uniform(-scale, scale, [shape.H, g * shape.H]).astype(wdtype),
            "bias": rng.uniform(-0.1, 0.1, bias_shape).astype(wdtype),
        })
    x = rng.standard_normal([shape.B, shape.T, shape.I]).astype(dtype)
    dy = rng.standard_normal([shape.B, shape.T, shape.H]).astype(dtype)
    masks = None
    if config.dropout:
        keep = 1.0 - DROPOUT_RATE
        masks = {name: ((rng.random([g, shape.B, width]) < keep) / keep).astype(dtype)
                 for name, width in (("input", shape.I), ("recurrent", shape.H))}
    return Workload(cell, config, shape, dtype.name, device, x, dy, weights, masks)
