"""The fused recurrent ops as differentiable TensorFlow functions.

Each function runs a whole sequence in one op. Its gradient computes only what is needed:
an input is skipped when the tape knows it needs no gradient (a constant, a non-trainable
variable, a `tf.stop_gradient` output; `op.skip_input_indices`) or when the caller names it in
`frozen`. When nothing needs a gradient, the op is not recorded on the tape at all.
"""

import tensorflow as tf
from tensorflow.python.eager import record
from tensorflow.python.framework import func_graph, ops as tf_ops

from tensorflow.python.framework import op_def_registry

from . import _tfcells_core
from ._loader import ops_module

# Gradient bits, the input each belongs to and the gradient op's output that carries it: one
# table in C++ (csrc/core/common.h, kGradients), read here by name.
GRAD_X = _tfcells_core.GRAD_X
GRAD_H0 = _tfcells_core.GRAD_H0
GRAD_C0 = _tfcells_core.GRAD_C0
GRAD_KERNEL = _tfcells_core.GRAD_KERNEL
GRAD_RECURRENT_KERNEL = _tfcells_core.GRAD_RECURRENT_KERNEL
GRAD_BIAS = _tfcells_core.GRAD_BIAS
GRAD_BITS = dict(_tfcells_core.GRAD_BITS)  # input name -> bit
_GRAD_OUTPUTS = dict(_tfcells_core.GRAD_OUTPUTS)  # input name -> gradient op output name

# The forward op's outputs from here on are its training cache.
_CACHE = ("gates", "aux", "h_prev")

# The dtypes x, the states and the outputs may have, and the dtype each computes in: the
# weights, the dropout masks and the training cache have that compute dtype, as do the weight
# gradients (csrc/core/storage.h: products accumulate in float32, the gate math and the LSTM
# cell state run in float32, and only what is stored in 16 bits is rounded).
COMPUTE_DTYPES = {tf.float32: tf.float32, tf.float64: tf.float64,
                  tf.bfloat16: tf.float32, tf.float16: tf.float32}
# The inputs stored in x's dtype; the others (weights, masks) are in the compute dtype.
_STATE_INPUTS = ("x", "h0", "c0")


class _Cell:
    """How one cell's forward op and gradient op line up, read from their registered op defs
    (csrc/tf/rnn_ops.cc generates them from the core's tables)."""

    def __init__(self, name, op_name, op, grad_op):
        self.name = name
        self.op = op
        self.grad_op = grad_op
        op_def = op_def_registry.get(op_name)
        self.inputs = tuple(arg.name for arg in op_def.input_arg)  # forward op inputs, in order
        outputs = [arg.name for arg in op_def.output_arg]
        self.n_outputs = outputs.index(_CACHE[0])  # outputs before the cache: y, h_last[, c_last]
        self.gates = _tfcells_core.CELLS[name]["gates"]  # gate blocks of width H


_LSTM = _Cell("lstm", "TfcellsLstm", ops_module.tfcells_lstm, ops_module.tfcells_lstm_grad)
_GRU = _Cell("gru", "TfcellsGru", ops_module.tfcells_gru, ops_module.tfcells_gru_grad)
_SIMPLE_RNN = _Cell("simple_rnn", "TfcellsSimpleRnn", ops_module.tfcells_simple_rnn,
                    ops_module.tfcells_simple_rnn_grad)
_CELLS_BY_OP = {"TfcellsLstm": _LSTM, "TfcellsGru": _GRU, "TfcellsSimpleRnn": _SIMPLE_RNN}


def _as_tensor(value, name, dtype, fn, storage=None):
    """`value` as a tensor of `dtype`. A 16-bit `storage` dtype (x's) is accepted too and
    converted (the weights of a bfloat16 call may be bfloat16 or float32)."""
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "dtype"):
        value_dtype = tf.as_dtype(value.dtype)
        if dtype is not None and value_dtype != dtype:
            if value_dtype == storage:
                return tf.cast(value, dtype)
            wanted = dtype.name if storage in (None, dtype) else f"{dtype.name} or {storage.name}"
            raise TypeError(f"tfcells.{fn}: {name} has dtype {value_dtype.name}, but must be "
                            f"{wanted} (x has dtype {(storage or dtype).name})")
        return tf.convert_to_tensor(value)
    return tf.convert_to_tensor(value, dtype=dtype, name=name)


def _static_rank_check(tensor, rank, name, fn, layout):
    if tensor.shape.rank is not None and tensor.shape.rank != rank:
        raise ValueError(f"tfcells.{fn}: {name} must have rank {rank} ({layout}), got shape "
                         f"{tensor.shape}")


def _training_cache_needed(tensors):
    """Whether a gradient may be asked of these tensors, so the forward must keep its cache.

    A recording tape says so directly. A TF1-style graph may be differentiated later by
    tf.gradients, so it keeps the cache. Inside tf.function with no tape, the gradient op
    recomputes the cache if one is asked for after all.
    """
    if record.should_record_backprop(tensors):
        return True
    if tf.executing_eagerly():
        return False
    return not isinstance(tf_ops.get_default_graph(), func_graph.FuncGraph)


def _run(cell, fn, values, time_major, go_backwards, frozen, training, extra_attrs):
    x = _as_tensor(values["x"], "x", None, fn)
    if x.dtype not in COMPUTE_DTYPES:
        raise TypeError(f"tfcells.{fn}: x has dtype {x.dtype.name}; the kernels support "
                        "float32, float64, bfloat16 and float16")
    compute = COMPUTE_DTYPES[x.dtype]
    layout = "[T, B, I]" if time_major else "[B, T, I]"
    _static_rank_check(x, 3, "x", fn, layout)
    tensors = {"x": x}
    for name in (n for n in cell.inputs if n in GRAD_BITS and n != "x"):
        if name == "bias" and values["bias"] is None:
            tensors["bias"] = tf.zeros([0], compute)
        elif name in _STATE_INPUTS:
            tensors[name] = _as_tensor(values[name], name, x.dtype, fn)
        else:
            tensors[name] = _as_tensor(values[name], name, compute, fn, storage=x.dtype)
    for name in ("h0", "c0", "kernel", "recurrent_kernel"):
        if name in tensors:
            _static_rank_check(tensors[name], 2, name, fn, "a matrix")
    mask = values["mask"]
    if mask is None:
        tensors["mask"] = tf.zeros([0], tf.bool)
    else:
        mask = tf.convert_to_tensor(mask)
        if mask.dtype != tf.bool:
            mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
        _static_rank_check(mask, 2, "mask", fn, "[T, B]" if time_major else "[B, T]")
        tensors["mask"] = mask
    for name, width in (("input_dropout", "I"), ("recurrent_dropout", "H")):
        if values[name] is None:
            tensors[name] = tf.zeros([0], compute)
        else:
            tensors[name] = _as_tensor(values[name], name + "_mask", compute, fn,
                                       storage=x.dtype)
            _static_rank_check(tensors[name], 3, name + "_mask", fn,
                               f"[{cell.gates}, B, {width}]: one mask per gate")

    frozen = set(frozen)
    freezable = set(GRAD_BITS) & set(cell.inputs)
    unknown = frozen - freezable
    if unknown:
        raise ValueError(f"tfcells.{fn}: frozen names unknown inputs {sorted(unknown)}; "
                         f"choose from {sorted(freezable)}")
    frozen_bits = 0
    for name in frozen:
        frozen_bits |= GRAD_BITS[name]
        # The tape then sees no path to this input, and records nothing if no input is left.
        tensors[name] = tf.stop_gradient(tensors[name])

    if training is None:
        training = _training_cache_needed([tensors[n] for n in cell.inputs if n in GRAD_BITS])
    outputs = cell.op(
        *[tensors[n] for n in cell.inputs],
        time_major=time_major, go_backwards=go_backwards,
        has_bias=values["bias"] is not None, has_mask=values["mask"] is not None,
        has_input_dropout=values["input_dropout"] is not None,
        has_recurrent_dropout=values["recurrent_dropout"] is not None,
        training=bool(training), frozen=frozen_bits, **extra_attrs)
    return outputs[:cell.n_outputs]


def lstm(x, h0, c0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
         go_backwards=False, frozen=(), training=None, input_dropout_mask=None,
         recurrent_dropout_mask=None):
    """Runs an LSTM (Keras layout and math) over a whole sequence.

    Args:
      x: [B, T, I] ([T, B, I] if time_major): float32, float64, bfloat16 or float16. With
        the 16-bit types the kernels compute in float32 (COMPUTE_DTYPES) and round only the
        outputs and the gradients of x and the states.
      h0, c0: [B, H] initial state, in x's dtype.
      kernel: [I, 4H]; recurrent_kernel: [H, 4H]; bias: [4H] or None. Gate order i, f, c, o.
        In the compute dtype (float32 for a 16-bit x, which may also take them in x's dtype);
        their gradients come in the dtype they were given in.
      mask: optional [B, T] ([T, B]) bool; a masked step keeps the previous state.
      go_backwards: process the steps from last to first; outputs come in processing order.
      frozen: names of inputs whose gradient is never computed (treated as constants), e.g.
        ("kernel",) for a fixed input projection.
      training: keep the cache for the gradient; None decides from the active tapes.
      input_dropout_mask, recurrent_dropout_mask: optional [G, B, I] and [G, B, H] (G = 4 for
        the LSTM, 3 for the GRU, 1 for SimpleRNN): gate g reads x ⊙ input_dropout_mask[g] and
        h_prev ⊙ recurrent_dropout_mask[g] at every step, as Keras' cells with
        implementation=1 apply their dropout masks (values 0 or 1/(1-rate)). No gradient
        flows to the masks.

    Returns:
      (outputs [B, T, H] ([T, B, H]), h_last [B, H], c_last [B, H]).
    """
    values = dict(x=x, h0=h0, c0=c0, kernel=kernel, recurrent_kernel=recurrent_kernel,
                  bias=bias, mask=mask, input_dropout=input_dropout_mask,
                  recurrent_dropout=recurrent_dropout_mask)
    return _run(_LSTM, "lstm", values, time_major, go_backwards, frozen, training, {})


def gru(x, h0, kernel, recurrent_kernel, bias=None, mask=None, reset_after=True,
        time_major=False, go_backwards=False, frozen=(), training=None,
        input_dropout_mask=None, recurrent_dropout_mask=None):
    """Runs a GRU (Keras layout and math, gate order z, r, h) over a whole sequence.

    bias is [2, 3H] (input bias, recurrent bias) when reset_after, else [3H].
    Returns (outputs, h_last); see lstm() for the other arguments.
    """
    values = dict(x=x, h0=h0, kernel=kernel, recurrent_kernel=recurrent_kernel, bias=bias,
                  mask=mask, input_dropout=input_dropout_mask,
                  recurrent_dropout=recurrent_dropout_mask)
    return _run(_GRU, "gru", values, time_major, go_backwards, frozen, training,
                {"reset_after": bool(reset_after)})


def simple_rnn(x, h0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
               go_backwards=False, frozen=(), training=None, input_dropout_mask=None,
               recurrent_dropout_mask=None):
    """Runs a tanh RNN, h' = tanh(x·kernel + h·recurrent_kernel + bias), over a sequence.

    Returns (outputs, h_last); see lstm() for the other arguments.
    """
    values = dict(x=x, h0=h0, kernel=kernel, recurrent_kernel=recurrent_kernel, bias=bias,
                  mask=mask, input_dropout=input_dropout_mask,
                  recurrent_dropout=recurrent_dropout_mask)
    return _run(_SIMPLE_RNN, "simple_rnn", values, time_major, go_backwards, frozen, training,
                {})


def gradient_mask(op):
    """The GradBits the gradient op of `op` will compute (see the module docstring)."""
    cell = _CELLS_BY_OP[op.type]
    skipped = set(getattr(op, "skip_input_indices", None) or ())
    frozen = op.get_attr("frozen")
    mask = 0
    for index, name in enumerate(cell.inputs):
        bit = GRAD_BITS.get(name, 0)
        if index not in skipped and not frozen & bit:
            mask |= bit
    if not op.get_attr("has_bias"):
        mask &= ~GRAD_BIAS
    return mask


def _rnn_grad(op, *output_grads):
    cell = _CELLS_BY_OP[op.type]
    mask = gradient_mask(op)
    n_inputs = len(cell.inputs)
    if mask == 0:
        return [None] * n_inputs
    inputs = list(op.inputs)
    attrs = {name: op.get_attr(name) for name in (
        "time_major", "go_backwards", "has_bias", "has_mask", "has_input_dropout",
        "has_recurrent_dropout")}
    if cell is _GRU:
        attrs["reset_after"] = op.get_attr("reset_after")
    outputs = op.outputs
    if not op.get_attr("training"):
        # The forward ran without a cache (no tape was recording then): rebuild it.
        outputs = cell.op(*inputs, training=True, frozen=op.get_attr("frozen"), **attrs)
    cache = list(outputs[cell.n_outputs:])
    dtype = inputs[0].dtype
    grads = [g if g is not None else tf.zeros([0], dtype)
             for g in output_grads[:cell.n_outputs]]
    # y too: the gradient op reads each step's h_prev from it where the cache keeps none, and
    # SimpleRNN's activated gate (its new state).
    results = cell.grad_op(*inputs, *cache, outputs[0], *grads, grad_mask=mask, **attrs)
    return [getattr(results, _GRAD_OUTPUTS[name]) if GRAD_BITS.get(name, 0) & mask else None
            for name in cell.inputs]


for _op_type in _CELLS_BY_OP:
    tf_ops.RegisterGradient(_op_type)(_rnn_grad)

# The gradient ops' own gradient (second order, forward mode): see _second_order.
from . import _second_order  # noqa: E402

for _op_type in _CELLS_BY_OP:
    tf_ops.RegisterGradient(_op_type + "Grad")(_second_order.gradient_of_gradient)
