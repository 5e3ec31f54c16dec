"""Keras 3 layers and cells that run a whole sequence through one fused tfcells op.

`tfcells.LSTM`, `tfcells.GRU` and `tfcells.SimpleRNN` subclass `keras.layers.LSTM`, `GRU` and
`SimpleRNN`: constructor arguments, weights, `build`, `get_config`, dropout, statefulness,
masking and wrappers such as `Bidirectional` are Keras' own. Only `inner_loop` (the hook Keras'
cuDNN path uses) is replaced: when the configuration is one the kernels implement, the whole
sequence runs through `tfcells.ops.lstm/gru/simple_rnn`; otherwise Keras' own per-step loop
runs (see `fused_unsupported_reason`). Either way the numbers are Keras'.

The cells `tfcells.LSTMCell`, `GRUCell` and `SimpleRNNCell` subclass Keras' cells.
`tfcells.RNN` (a `keras.layers.RNN`) runs them, alone, as a list or as a `StackedRNNCells`,
through the fused ops, one op per cell for the whole sequence. Keras' RNN layer offers no hook
that sees the whole sequence, so once tfcells is imported, `keras.layers.RNN(cell)` whose cells
are all tfcells cells builds a `tfcells.RNN` (the only change tfcells makes to Keras).

Freezing: `kernel_trainable`, `recurrent_kernel_trainable` and `bias_trainable` (constructor
arguments of the layers and cells), `layer.cell.kernel.trainable = False` after build and
`layer.trainable = False` all remove the weight from `trainable_weights` (so `fit` leaves it
bit-identical) and, because the flags are read each time the layer is traced, make the
backward op skip that weight's gradient GEMM from the next `compile()`/trace on. A layer with
every weight frozen on an input that needs no gradient is not recorded on the tape at all.

`input_gradient=False` declares that nothing below the layer needs a gradient through its
input, so dx is never computed. The tape finds that out by itself for data inputs and
non-trainable TensorFlow variables, but not for a frozen Keras layer below (e.g.
`Embedding(trainable=False)`): Keras freezing leaves the TensorFlow variable trainable, so the
tape still asks for dx. Gradients that would flow into the input are dropped when it is False.
"""

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.common.variables import AutocastScope
from keras.src.layers.input_spec import InputSpec
from tensorflow.python.eager import record
from tensorflow.python.framework import func_graph
from tensorflow.python.ops import control_flow_util

from . import _loader
from . import ops as _ops

__all__ = ["LSTM", "GRU", "SimpleRNN", "LSTMCell", "GRUCell", "SimpleRNNCell", "RNN"]

_register = keras.saving.register_keras_serializable(package="tfcells")

_TANH = {keras.activations.tanh, keras.ops.tanh, tf.tanh, tf.math.tanh, tf.nn.tanh}
_SIGMOID = {keras.activations.sigmoid, keras.ops.sigmoid, tf.sigmoid, tf.math.sigmoid,
            tf.nn.sigmoid}
_FUSED_CHOICES = ("auto", True, False)
_FLOAT_INPUTS = tuple(_ops.COMPUTE_DTYPES)  # the dtypes the fused op stores sequences in


# ----------------------------------------------------------------------------------------------
# Cells


class _FreezableCell:
    """Per-weight `trainable` flags for a Keras RNN cell, applied when the cell is built."""

    _WEIGHT_FLAGS = (("kernel", "kernel_trainable"),
                     ("recurrent_kernel", "recurrent_kernel_trainable"),
                     ("bias", "bias_trainable"))

    def _init_flags(self, kernel_trainable, recurrent_kernel_trainable, bias_trainable):
        self._initial_flags = {"kernel_trainable": bool(kernel_trainable),
                               "recurrent_kernel_trainable": bool(recurrent_kernel_trainable),
                               "bias_trainable": bool(bias_trainable)}

    def build(self, input_shape):
        super().build(input_shape)
        for weight, flag in self._WEIGHT_FLAGS:
            variable = getattr(self, weight, None)
            if variable is not None:
                variable.trainable = self._initial_flags[flag]

    def _flag_config(self):
        """The flags as they are now: a weight's own `trainable` once built."""
        config = {}
        for weight, flag in self._WEIGHT_FLAGS:
            variable = getattr(self, weight, None) if self.built else None
            config[flag] = (variable.trainable if variable is not None
                            else self._initial_flags[flag])
        return config

    def get_config(self):
        return {**super().get_config(), **self._flag_config()}


@_register
class LSTMCell(_FreezableCell, keras.layers.LSTMCell):
    """`keras.layers.LSTMCell` with per-weight freezing flags.

    Takes every argument of `keras.layers.LSTMCell`, plus `kernel_trainable`,
    `recurrent_kernel_trainable` and `bias_trainable` (default True): a False flag makes that
    weight non-trainable when the cell is built. Runs fused inside `tfcells.RNN`.
    """

    def __init__(self, *args, kernel_trainable=True, recurrent_kernel_trainable=True,
                 bias_trainable=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_flags(kernel_trainable, recurrent_kernel_trainable, bias_trainable)


@_register
class GRUCell(_FreezableCell, keras.layers.GRUCell):
    """`keras.layers.GRUCell` with per-weight freezing flags (see `LSTMCell`)."""

    def __init__(self, *args, kernel_trainable=True, recurrent_kernel_trainable=True,
                 bias_trainable=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_flags(kernel_trainable, recurrent_kernel_trainable, bias_trainable)


@_register
class SimpleRNNCell(_FreezableCell, keras.layers.SimpleRNNCell):
    """`keras.layers.SimpleRNNCell` with per-weight freezing flags (see `LSTMCell`)."""

    def __init__(self, *args, kernel_trainable=True, recurrent_kernel_trainable=True,
                 bias_trainable=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_flags(kernel_trainable, recurrent_kernel_trainable, bias_trainable)


# The Keras class whose per-step `call` each tfcells cell must still use for the fused op to
# compute the same thing; a subclass overriding `call` runs Keras' loop.
_KERAS_CELL_OF = {LSTMCell: keras.layers.LSTMCell, GRUCell: keras.layers.GRUCell,
                  SimpleRNNCell: keras.layers.SimpleRNNCell}


def _cell_kind(cell):
    for ours, theirs in _KERAS_CELL_OF.items():
        if isinstance(cell, ours):
            return ours, theirs
    return None, None


def _state_count(cell):
    return 2 if isinstance(cell, keras.layers.LSTMCell) else 1


def _cell_unsupported_reason(cell):
    """Why the fused op cannot run this cell as Keras would (None when it can)."""
    ours, theirs = _cell_kind(cell)
    if ours is None:
        return (f"cell {type(cell).__name__} is not a tfcells cell (tfcells.LSTMCell, "
                "GRUCell or SimpleRNNCell)")
    if type(cell).call is not theirs.call:
        return f"{type(cell).__name__} overrides call()"
    if cell.activation not in _TANH:
        return f"activation {_name(cell.activation)} is not tanh"
    if ours is not SimpleRNNCell and cell.recurrent_activation not in _SIGMOID:
        return f"recurrent_activation {_name(cell.recurrent_activation)} is not sigmoid"
    return None


def _name(function):
    """An activation as users name it ("relu"), not as Python prints it."""
    return getattr(function, "__name__", None) or repr(function)


def _dropout_applies(cell):
    """Which of the cell's dropouts Keras applies in training: (input, recurrent)."""
    if isinstance(cell, keras.layers.SimpleRNNCell):  # applies any mask it has
        return cell.dropout > 0, cell.recurrent_dropout > 0
    # LSTMCell and GRUCell skip a rate of 1.
    return 0.0 < cell.dropout < 1.0, 0.0 < cell.recurrent_dropout < 1.0


def _dropout_masks(cell, x, h0, training, dtype):
    """The dropout Keras' cell applies at every step, as the fused op takes it.

    Returns (x, masks): x with a single input mask already applied (implementation=2), and
    the op's per-gate masks (input and recurrent, [G, B, width]). The masks are the ones
    RNN.call cached on the cell before inner_loop, so the numbers equal Keras' loop.
    """
    masks = {}
    if not training:
        return x, masks
    per_gate = not isinstance(cell, keras.layers.SimpleRNNCell) and cell.implementation == 1
    input_applies, recurrent_applies = _dropout_applies(cell)

    def stacked(mask):
        return tf.stack([tf.cast(m, dtype) for m in (mask if per_gate else [mask])])

    if input_applies:
        mask = cell.get_dropout_mask(x[:, 0, :])
        if per_gate:
            masks["input_dropout_mask"] = stacked(mask)
        else:
            x = x * tf.cast(mask, x.dtype)[:, None, :]
    if recurrent_applies:
        masks["recurrent_dropout_mask"] = stacked(cell.get_recurrent_dropout_mask(h0))
    return x, masks


def _read(variable, dtype):
    """A weight's stored value (no mixed-precision autocast), as `dtype`."""
    with AutocastScope(None):
        value = variable.value
    if tf.as_dtype(value.dtype) != dtype:
        value = tf.cast(value, dtype)
    return value


def _static_training(value):
    """`training` as a Python bool, or None for a tensor whose value is known only when the
    graph runs (a symbolic `training` inside tf.function)."""
    if value is None or isinstance(value, (bool, int)):
        return bool(value)
    static = tf.get_static_value(value)
    return None if static is None else bool(static)


def _cache_wanted():
    """Whether the ops should keep their training cache, decided outside a tf.cond: inside
    its branches the ops cannot see which tapes are recording."""
    return record.could_possibly_record() or not isinstance(
        tf.compat.v1.get_default_graph(), func_graph.FuncGraph)


def _in_xla_context():
    try:
        return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    except Exception:  # pragma: no cover - private TF API moved
        return False


# ----------------------------------------------------------------------------------------------
# The fused inner loop, shared by the layers and tfcells.RNN


class _FusedRNN:
    """Mixin for a `keras.layers.RNN` subclass: runs `inner_loop` through the fused ops.

    Keras' `RNN.call` draws the dropout masks, then calls `inner_loop`, which reads top to
    bottom: which path (`fused_unsupported_reason`), the step mask and states, the fused ops
    one cell after the other (`_run_cells`, `_run_cell`: dropout masks, weights, frozen
    inputs, the op), then the outputs as Keras' loop returns them (`_keras_results`).
    """

    def _init_fused(self, input_gradient, use_fused):
        if use_fused not in _FUSED_CHOICES:
            raise ValueError("Invalid value for argument `use_fused`: expected one of "
                             f"{{'auto', True, False}}. Received: use_fused={use_fused!r}")
        self.input_gradient = bool(input_gradient)
        self.use_fused = use_fused
        if self._config_unsupported_reason() is None:
            # The fused ops have no XLA kernels; like Keras' cuDNN path, opt out of
            # jit_compile (Keras then warns and compiles without XLA).
            self.supports_jit = False

    def _rnn_cells(self):
        cell = self.cell
        if isinstance(cell, keras.layers.StackedRNNCells):
            return list(cell.cells)
        return [cell]

    # -- which path -----------------------------------------------------------------------

    def fused_unsupported_reason(self, training=False, inputs=None):
        """None when a call made here runs through the fused op, else why Keras' loop runs.

        Covers every fallback: the layer's configuration; with `inputs` (the call's input,
        or anything with a `dtype`), nested inputs and a dtype other than floating point;
        and, called inside `tf.function(jit_compile=True)`, the XLA context (the fused op
        has no XLA kernel). `training` is accepted for compatibility: no configuration
        depends on it (dropout runs fused, with Keras' masks; a symbolic `training` tensor
        selects between two fused calls).
        """
        return self._config_unsupported_reason() or _call_unsupported_reason(inputs)

    def _config_unsupported_reason(self):
        if self.use_fused is False:
            return "use_fused=False"
        if self.unroll:
            return "unroll=True"
        for cell in self._rnn_cells():
            reason = _cell_unsupported_reason(cell)
            if reason is not None:
                return reason
        return _loader.gpu_fallback_reason()  # GPU kernels opt-in until they passed on a GPU

    # -- frozen inputs --------------------------------------------------------------------

    def _layer_frozen(self):
        return not self.trainable

    def _frozen_inputs(self, cell, first):
        frozen = []
        layer_frozen = self._layer_frozen() or not cell.trainable
        for name in ("kernel", "recurrent_kernel", "bias"):
            variable = getattr(cell, name, None)
            if variable is not None and (layer_frozen or not variable.trainable):
                frozen.append(name)
        if first and not self.input_gradient:
            frozen.append("x")
        return tuple(frozen)

    # -- input checks ---------------------------------------------------------------------

    def _check_call_arguments(self, sequences, initial_state, mask):
        name = self.name
        if tree.is_nested(sequences):
            return
        shape = tf.TensorShape(sequences.shape)
        if shape.rank is not None and shape.rank != 3:
            raise ValueError(
                f'Input 0 of layer "{name}" is incompatible with the layer: expected ndim=3 '
                f"([batch, timesteps, features]), found ndim={shape.rank}. Full shape "
                f"received: {tuple(shape)}")
        first = self._rnn_cells()[0]
        kernel = getattr(first, "kernel", None) if getattr(first, "built", False) else None
        if kernel is not None and shape.rank == 3 and shape[-1] is not None \
                and shape[-1] != kernel.shape[0]:
            raise ValueError(
                f'Input 0 of layer "{name}" is incompatible with the layer: expected axis -1 '
                f"of input shape to have value {kernel.shape[0]} (the feature size the layer "
                f"was built with), but received input with shape {tuple(shape)}")
        dims = list(shape) if shape.rank == 3 else [None, None, None]
        batch = dims[0]
        if initial_state is not None:
            flat = tree.flatten(initial_state)
            expected = []
            for cell in self._rnn_cells():
                size = cell.state_size
                expected += list(size) if isinstance(size, (list, tuple)) else [size]
            if len(flat) != len(expected):
                raise ValueError(
                    f'Layer "{name}" expects {len(expected)} initial state tensor(s) of shapes '
                    f"{[(batch, s) for s in expected]}, but received {len(flat)}: "
                    f"initial_state={[tuple(getattr(s, 'shape', ())) for s in flat]}")
            for i, (state, size) in enumerate(zip(flat, expected)):
                state_shape = tuple(getattr(state, "shape", ()))
                bad = len(state_shape) != 2 or state_shape[1] not in (None, size) or (
                    batch is not None and state_shape[0] not in (None, batch))
                if bad:
                    raise ValueError(
                        f'Layer "{name}": initial_state[{i}] must have shape {(batch, size)} '
                        f"([batch, units]), but received shape {state_shape}")
        if mask is not None:
            if tree.is_nested(mask):
                mask = tree.flatten(mask)[0]
            mask_shape = tuple(getattr(mask, "shape", ()))
            ok_rank = len(mask_shape) == 2 or (len(mask_shape) == 3 and mask_shape[2] in (1,
                                                                                        None))
            ok = ok_rank and all(m is None or s is None or m == s
                                 for m, s in zip(mask_shape[:2], dims[:2]))
            if not ok:
                raise ValueError(
                    f'Layer "{name}": mask must have shape {tuple(dims[:2])} ([batch, '
                    f"timesteps], like the input), but received shape {mask_shape}")

    # -- the loop --------------------------------------------------------------------------

    def inner_loop(self, sequences, initial_state, mask, training=False):
        reason = self.fused_unsupported_reason(inputs=sequences)
        if reason is not None:
            return self._keras_inner_loop(reason, sequences, initial_state, mask, training)
        step_mask = _step_mask(mask)
        if not tree.is_nested(initial_state):
            initial_state = [initial_state]
        states = tree.flatten(initial_state)
        static_training = _static_training(training)
        if static_training is None and any(any(_dropout_applies(cell))
                                           for cell in self._rnn_cells()):
            # A symbolic `training` (a tf.bool tensor inside tf.function) decides at run time
            # whether dropout applies: one fused call for each value, the tensor picks.
            keep_cache = _cache_wanted()
            outputs, new_states = tf.cond(
                training,
                lambda: self._run_cells(sequences, states, step_mask, True, keep_cache),
                lambda: self._run_cells(sequences, states, step_mask, False, keep_cache))
        else:
            outputs, new_states = self._run_cells(sequences, states, step_mask,
                                                  bool(static_training), None)
        return self._keras_results(outputs, new_states, mask, initial_state, sequences.dtype)

    def _keras_inner_loop(self, reason, sequences, initial_state, mask, training):
        if self.use_fused is True:
            raise ValueError(
                f'Layer "{self.name}" was created with use_fused=True, but the fused op '
                f"cannot run this configuration: {reason}. Pass use_fused='auto' to fall "
                "back to Keras' own loop.")
        return super().inner_loop(sequences, initial_state, mask=mask, training=training)

    def _run_cells(self, x, states, step_mask, training, keep_cache):
        """Each cell's fused op over the whole sequence, the next reading its outputs.

        Returns (outputs of the last cell [B, T, H] in processing order, final states).
        The sequences and states stay in the input's dtype (a mixed policy's 16-bit compute
        dtype), the weights are read as stored (float32) and the kernels compute in
        float32."""
        dtype = tf.as_dtype(x.dtype)
        go_backwards = self.go_backwards
        new_states = []
        for index, cell in enumerate(self._rnn_cells()):
            n = _state_count(cell)
            cell_states, states = states[:n], states[n:]
            x, cell_states = self._run_cell(cell, index, x, cell_states, step_mask,
                                            go_backwards, training, dtype, keep_cache)
            new_states += cell_states
            # Outputs come in processing order; the next cell reads them as they are.
            if go_backwards and step_mask is not None:
                step_mask = tf.reverse(step_mask, [1])
            go_backwards = False
        return x, new_states

    def _run_cell(self, cell, index, x, states, step_mask, go_backwards, training, dtype,
                  keep_cache):
        """One cell's fused op: Keras' dropout masks, the weights as stored, the inputs
        that are frozen. Returns (outputs, final states) in x's dtype."""
        compute = _ops.COMPUTE_DTYPES[dtype]
        x, dropout = _dropout_masks(cell, x, states[0], training, compute)
        states = [tf.cast(s, dtype) for s in states]
        kernel = _read(cell.kernel, compute)
        recurrent_kernel = _read(cell.recurrent_kernel, compute)
        bias = _read(cell.bias, compute) if cell.bias is not None else None
        common = dict(mask=step_mask, go_backwards=go_backwards, training=keep_cache,
                      frozen=self._frozen_inputs(cell, index == 0), **dropout)
        ours, _ = _cell_kind(cell)
        if ours is LSTMCell:
            y, h, c = _ops.lstm(x, states[0], states[1], kernel, recurrent_kernel, bias,
                                **common)
            return y, [h, c]
        if ours is GRUCell:
            y, h = _ops.gru(x, states[0], kernel, recurrent_kernel, bias,
                            reset_after=cell.reset_after, **common)
            return y, [h]
        y, h = _ops.simple_rnn(x, states[0], kernel, recurrent_kernel, bias, **common)
        return y, [h]

    def _keras_results(self, outputs, new_states, mask, initial_state, out_dtype):
        """(last_output, outputs, states) as Keras' loop returns them: masked steps repeat
        the previous output (or are zero with zero_output_for_mask), in the input's dtype."""
        step_mask = _step_mask(mask)
        if step_mask is not None:
            processed = tf.reverse(step_mask, [1]) if self.go_backwards else step_mask
            if self.zero_output_for_mask:
                keep = processed
            else:
                # Keras repeats the previous *output* at a masked step, and that starts at
                # zero, not at the initial state: steps before the first unmasked one are 0.
                keep = tf.math.cumsum(tf.cast(processed, tf.int32), axis=1) > 0
            outputs = tf.where(keep[:, :, None], outputs, tf.zeros_like(outputs))
        last_output = tf.cast(outputs[:, -1], out_dtype)
        outputs = tf.cast(outputs, out_dtype)
        new_states = [tf.cast(s, out_dtype) for s in new_states]
        packed = tree.pack_sequence_as(initial_state, new_states)
        return last_output, outputs, list(packed)

    def _maybe_config_dropout_masks(self, cell, input_sequence, input_state):
        """Keras' RNN.call draws each cell's dropout masks here, before inner_loop. For a
        stack it runs each cell once to get the next cell's input shape, in the call's
        training mode, which fails on a symbolic `training`; the masks do not depend on the
        mode, so this runs those cells with training=False."""
        if not isinstance(cell, keras.layers.StackedRNNCells):
            return super()._maybe_config_dropout_masks(cell, input_sequence, input_state)
        for c, s in zip(cell.cells, input_state):
            super()._maybe_config_dropout_masks(c, input_sequence, s)
            s = list(s) if tree.is_nested(s) else [s]
            input_sequence, _ = c(input_sequence, s, training=False)

    def call(self, sequences, initial_state=None, mask=None, training=False):
        self._check_call_arguments(sequences, initial_state, mask)
        return super().call(sequences, initial_state=initial_state, mask=mask,
                            training=training)

    def _fused_config(self):
        return {"input_gradient": self.input_gradient, "use_fused": self.use_fused}


def _call_unsupported_reason(inputs):
    """Why a call with these inputs, made here, cannot run the fused op (None when it can)."""
    if inputs is not None:
        if tree.is_nested(inputs):
            return "nested inputs"
        dtype = tf.as_dtype(inputs.dtype)
        if dtype not in _FLOAT_INPUTS:
            return (f"input dtype {dtype.name} (the fused op takes floating-point inputs; "
                    "Keras' loop promotes the input)")
    if _in_xla_context():
        return "inside an XLA (jit_compile) function: the fused op has no XLA kernel"
    return None


def _step_mask(mask):
    """Keras' mask (maybe nested, maybe [B, T, 1], maybe not bool) as a [B, T] bool tensor."""
    if tree.is_nested(mask):
        mask = tree.flatten(mask)[0]
    if mask is None:
        return None
    mask = tf.convert_to_tensor(mask)
    if mask.shape.rank == 3:
        mask = tf.squeeze(mask, axis=2)
    if mask.dtype != tf.bool:
        mask = tf.cast(mask, tf.bool)
    return mask


_FUSED_DOC = """
    Freezing and fusion arguments (beyond Keras'):
        kernel_trainable, recurrent_kernel_trainable, bias_trainable: False makes that weight
            non-trainable (as `layer.cell.kernel.trainable = False` after build would): it is
            left out of `trainable_weights` and its gradient is never computed.
        input_gradient: False declares that nothing upstream needs the gradient w.r.t. this
            layer's input (e.g. the input comes from a frozen `Embedding`), so dx is never
            computed; gradients that would reach the input are dropped. Default True (the tape
            still skips dx by itself for data inputs).
        use_fused: "auto" (default) runs the fused op when the configuration allows it and
            Keras' own loop otherwise; True raises instead of falling back; False always runs
            Keras' loop. `fused_unsupported_reason(training)` says which path a call takes.
"""


# ----------------------------------------------------------------------------------------------
# Layers


class _FusedKerasLayer(_FusedRNN):
    """What tfcells.LSTM, GRU and SimpleRNN share on top of their Keras base class."""

    def _init_keras_layer(self, cell, input_spec, input_gradient, use_fused, use_cudnn=None,
                          **rnn_kwargs):
        # Keras' own constructor, after the cell it would have built (ours, with the flags).
        keras.layers.RNN.__init__(self, cell, **rnn_kwargs)
        self.input_spec = input_spec
        if use_cudnn is not None:
            if use_cudnn not in ("auto", True, False):
                raise ValueError("Invalid valid received for argument `use_cudnn`. Expected "
                                 "one of {'auto', True, False}. Received: "
                                 f"use_cudnn={use_cudnn}")
            self.use_cudnn = use_cudnn
        self._init_fused(input_gradient, use_fused)

    def get_config(self):
        return {**super().get_config(), **self.cell._flag_config(), **self._fused_config()}


@_register
class LSTM(_FusedKerasLayer, keras.layers.LSTM):
    __doc__ = ("`keras.layers.LSTM` running the whole sequence through `tfcells.ops.lstm`.\n\n"
               "Same arguments, weights and results as `keras.layers.LSTM`; the fused op runs "
               "when activation is tanh, recurrent_activation sigmoid and unroll False (with "
               "any dropout and recurrent_dropout), else Keras' loop runs.\n"
               + _FUSED_DOC)

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid",
                 use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 unit_forget_bias=True, kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0,
                 recurrent_dropout=0.0, seed=None, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, use_cudnn="auto",
                 kernel_trainable=True, recurrent_kernel_trainable=True, bias_trainable=True,
                 input_gradient=True, use_fused="auto", **kwargs):
        cell = LSTMCell(
            units, activation=activation, recurrent_activation=recurrent_activation,
            use_bias=use_bias, kernel_initializer=kernel_initializer,
            unit_forget_bias=unit_forget_bias, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer, bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint, recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint, dropout=dropout,
            recurrent_dropout=recurrent_dropout, dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True), name="lstm_cell", seed=seed,
            implementation=kwargs.pop("implementation", 2),
            kernel_trainable=kernel_trainable,
            recurrent_kernel_trainable=recurrent_kernel_trainable,
            bias_trainable=bias_trainable)
        self._init_keras_layer(
            cell, InputSpec(ndim=3), input_gradient, use_fused, use_cudnn=use_cudnn,
            return_sequences=return_sequences, return_state=return_state,
            go_backwards=go_backwards, stateful=stateful, unroll=unroll,
            activity_regularizer=activity_regularizer, **kwargs)


@_register
class GRU(_FusedKerasLayer, keras.layers.GRU):
    __doc__ = ("`keras.layers.GRU` running the whole sequence through `tfcells.ops.gru`.\n\n"
               "Same arguments, weights and results as `keras.layers.GRU` (reset_after True "
               "or False); the fused op runs when activation is tanh, recurrent_activation "
               "sigmoid and unroll False (with any dropout and recurrent_dropout), else Keras' "
               "loop runs.\n" + _FUSED_DOC)

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid",
                 use_bias=True, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros",
                 kernel_regularizer=None, recurrent_regularizer=None, bias_regularizer=None,
                 activity_regularizer=None, kernel_constraint=None, recurrent_constraint=None,
                 bias_constraint=None, dropout=0.0, recurrent_dropout=0.0, seed=None,
                 return_sequences=False, return_state=False, go_backwards=False,
                 stateful=False, unroll=False, reset_after=True, use_cudnn="auto",
                 kernel_trainable=True, recurrent_kernel_trainable=True, bias_trainable=True,
                 input_gradient=True, use_fused="auto", **kwargs):
        cell = GRUCell(
            units, activation=activation, recurrent_activation=recurrent_activation,
            use_bias=use_bias, kernel_initializer=kernel_initializer,
            recurrent_initializer=recurrent_initializer, bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer, recurrent_regularizer=recurrent_regularizer,
            bias_regularizer=bias_regularizer, kernel_constraint=kernel_constraint,
            recurrent_constraint=recurrent_constraint, bias_constraint=bias_constraint,
            dropout=dropout, recurrent_dropout=recurrent_dropout, reset_after=reset_after,
            dtype=kwargs.get("dtype", None), trainable=kwargs.get("trainable", True),
            name="gru_cell", seed=seed, implementation=kwargs.pop("implementation", 2),
            kernel_trainable=kernel_trainable,
            recurrent_kernel_trainable=recurrent_kernel_trainable,
            bias_trainable=bias_trainable)
        self._init_keras_layer(
            cell, InputSpec(ndim=3), input_gradient, use_fused, use_cudnn=use_cudnn,
            return_sequences=return_sequences, return_state=return_state,
            go_backwards=go_backwards, stateful=stateful, unroll=unroll,
            activity_regularizer=activity_regularizer, **kwargs)


@_register
class SimpleRNN(_FusedKerasLayer, keras.layers.SimpleRNN):
    __doc__ = ("`keras.layers.SimpleRNN` running the whole sequence through "
               "`tfcells.ops.simple_rnn`.\n\nSame arguments, weights and results as "
               "`keras.layers.SimpleRNN`; the fused op runs when activation is tanh and unroll "
               "False (with any dropout and recurrent_dropout), else Keras' loop runs.\n"
               + _FUSED_DOC)

    def __init__(self, units, activation="tanh", use_bias=True,
                 kernel_initializer="glorot_uniform", recurrent_initializer="orthogonal",
                 bias_initializer="zeros", kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None, kernel_constraint=None,
                 recurrent_constraint=None, bias_constraint=None, dropout=0.0,
                 recurrent_dropout=0.0, return_sequences=False, return_state=False,
                 go_backwards=False, stateful=False, unroll=False, seed=None,
                 kernel_trainable=True, recurrent_kernel_trainable=True, bias_trainable=True,
                 input_gradient=True, use_fused="auto", **kwargs):
        cell = SimpleRNNCell(
            units, activation=activation, use_bias=use_bias,
            kernel_initializer=kernel_initializer, recurrent_initializer=recurrent_initializer,
            bias_initializer=bias_initializer, kernel_regularizer=kernel_regularizer,
            recurrent_regularizer=recurrent_regularizer, bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint, recurrent_constraint=recurrent_constraint,
            bias_constraint=bias_constraint, dropout=dropout,
            recurrent_dropout=recurrent_dropout, seed=seed, dtype=kwargs.get("dtype", None),
            trainable=kwargs.get("trainable", True), name="simple_rnn_cell",
            kernel_trainable=kernel_trainable,
            recurrent_kernel_trainable=recurrent_kernel_trainable,
            bias_trainable=bias_trainable)
        self._init_keras_layer(
            cell, [InputSpec(ndim=3)], input_gradient, use_fused,
            return_sequences=return_sequences, return_state=return_state,
            go_backwards=go_backwards, stateful=stateful, unroll=unroll, **kwargs)


@_register
class RNN(_FusedRNN, keras.layers.RNN):
    __doc__ = ("`keras.layers.RNN` that runs tfcells cells through the fused ops.\n\n"
               "`cell` is a tfcells cell, a list of them or a `StackedRNNCells` of them; "
               "a stack runs one fused op per cell over the whole sequence. Any other cell (or "
               "an unsupported configuration) runs Keras' per-step loop, exactly as "
               "`keras.layers.RNN` would. Once tfcells is imported, `keras.layers.RNN(cell)` "
               "with tfcells cells builds this layer (see _fuse_keras_rnn_of_tfcells_cells)."
               "\n\n"
               "Arguments: those of `keras.layers.RNN`, plus `input_gradient` and `use_fused` "
               "(see `tfcells.LSTM`); freeze weights through the cells' flags.")

    def __init__(self, cell, return_sequences=False, return_state=False, go_backwards=False,
                 stateful=False, unroll=False, zero_output_for_mask=False,
                 input_gradient=True, use_fused="auto", **kwargs):
        super().__init__(cell, return_sequences=return_sequences, return_state=return_state,
                         go_backwards=go_backwards, stateful=stateful, unroll=unroll,
                         zero_output_for_mask=zero_output_for_mask, **kwargs)
        self._init_fused(input_gradient, use_fused)

    def get_config(self):
        return {**super().get_config(), **self._fused_config()}


def _only_tfcells_cells(cell):
    if isinstance(cell, keras.layers.StackedRNNCells):
        cell = cell.cells
    cells = cell if isinstance(cell, (list, tuple)) else [cell]
    return bool(cells) and all(_cell_kind(c)[0] is not None for c in cells)


def _fuse_keras_rnn_of_tfcells_cells():
    """Makes `keras.layers.RNN(cell)` build a `tfcells.RNN` when every cell is a tfcells cell.

    Keras' RNN layer hands its cell one step at a time and offers no whole-sequence hook, so
    this is the one place where tfcells changes Keras: construction of exactly
    `keras.layers.RNN` (not of its subclasses) with tfcells cells returns the subclass
    `tfcells.RNN`, which takes the same arguments, passes every isinstance check, runs the
    fused ops, and is saved as `tfcells>RNN`. Any other `keras.layers.RNN` is untouched.
    """
    keras_new = keras.layers.RNN.__new__

    def __new__(cls, *args, **kwargs):
        if cls is keras.layers.RNN and _only_tfcells_cells(
                args[0] if args else kwargs.get("cell")):
            cls = RNN
        return keras_new(cls, *args, **kwargs)

    keras.layers.RNN.__new__ = staticmethod(__new__)


_fuse_keras_rnn_of_tfcells_cells()
