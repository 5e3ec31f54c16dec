"""The gradient of the gradient ops: second-order gradients and forward mode.

`TfcellsLstmGrad`, `TfcellsGruGrad` and `TfcellsSimpleRnnGrad` compute a vector-Jacobian
product of their forward op, g(inputs, dy) = J(inputs)ᵀ·dy. Their own gradient (what a
gradient penalty, a Hessian-vector product or `tf.autodiff.ForwardAccumulator` needs) is the
VJP of g: it recomputes the forward recurrence with plain TensorFlow ops (`tfcells.reference`,
Keras' math), takes g from that under one tape and differentiates g under a second. No fused
kernel runs here, and the result is differentiable again (third order and beyond).

Which gradients:
- Every gradient-op output the op produced (its `grad_mask`) is differentiated w.r.t. the
  gradient op's inputs that the tape wants (`skip_input_indices`): the forward inputs (x,
  initial states, weights) and the incoming output gradients (dy, dh_last, dc_last).
- The cache inputs get None: g is recomputed from the forward inputs, so the whole dependence
  is carried by those. The step mask and the dropout masks get None, as at first order.
- Frozen inputs stay frozen. `frozen=(...)` (and so the Keras layers' freezing) feeds the
  forward op a `tf.stop_gradient` of the input, so the gradient op reads that same stopped
  tensor: a frozen weight gets None at every order. A tape skips its second-order work
  (`skip_input_indices`); graph-mode `tf.gradients`, which cannot say so, gets a gradient for
  the stopped tensor that goes no further. A gradient the first-order op did not produce (a
  frozen or unwatched input) has no output to differentiate, so adds nothing at second order.

Names, not positions: the inputs and outputs are matched by the op definitions' argument names
(the gradient op's inputs are the forward op's inputs, its cache outputs, then `d<output>`
for each differentiable forward output; its outputs are `d<input>`).
"""

import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from . import ops as _ops
from . import reference

_REFERENCE = {"TfcellsLstm": reference.lstm, "TfcellsGru": reference.gru,
              "TfcellsSimpleRnn": reference.simple_rnn}
_LAYOUT_ATTRS = ("time_major", "go_backwards")


def _arg_names(op_type):
    op_def = op_def_registry.get(op_type)
    return [a.name for a in op_def.input_arg], [a.name for a in op_def.output_arg]


def _present(seed):
    """An output gradient the first-order gradient received (absent ones are fed as [0])."""
    return seed.shape.rank is None or seed.shape.rank > 1


def gradient_of_gradient(op, *upstream):
    """Registered gradient of the gradient ops (see the module docstring)."""
    forward_type = op.type[:-len("Grad")]
    forward_inputs, forward_outputs = _arg_names(forward_type)
    grad_inputs, grad_outputs = _arg_names(op.type)
    values = dict(zip(grad_inputs, op.inputs))
    skipped = {grad_inputs[i] for i in (getattr(op, "skip_input_indices", None) or ())}

    def attr(name):
        return op.get_attr(name)

    # g's outputs that exist and carry an upstream gradient, by the input they belong to.
    grad_mask = attr("grad_mask")
    wanted = {name[1:]: g for name, g in zip(grad_outputs, upstream)
              if g is not None and _ops.GRAD_BITS[name[1:]] & grad_mask}
    # The forward outputs g received a gradient for (dy, dh_last, dc_last).
    seeds = [o for o in forward_outputs if "d" + o in values and _present(values["d" + o])]
    differentiable = [n for n in forward_inputs if n in _ops.GRAD_BITS
                      and (n != "bias" or attr("has_bias"))]
    sources = [n for n in differentiable if n not in skipped] + [
        "d" + o for o in seeds if "d" + o not in skipped]
    if not wanted or not seeds or not sources:
        return [None] * len(grad_inputs)

    kwargs = {name: attr(name) for name in _LAYOUT_ATTRS}
    if forward_type == "TfcellsGru":
        kwargs["reset_after"] = attr("reset_after")
    kwargs["mask"] = values["mask"] if attr("has_mask") else None
    for name in ("input_dropout", "recurrent_dropout"):
        kwargs[name + "_mask"] = values[name] if attr("has_" + name) else None

    # With 16-bit storage the recurrence runs in the compute dtype, as the kernels run it: the
    # 16-bit inputs are widened under both tapes, so their gradients come back in 16 bits.
    compute = attr("Tcompute")
    wanted = {n: tf.cast(g, compute) for n, g in wanted.items()}
    with tf.GradientTape() as outer:
        # Distinct copies, so that one tensor fed to two inputs (h0 is c0) gets the partial
        # derivative of each slot, as the gradient op computed them.
        given = {n: tf.identity(values[n]) for n in differentiable + ["d" + o for o in seeds]}
        outer.watch([given[n] for n in sources])
        local = {n: tf.cast(v, compute) for n, v in given.items()}
        with tf.GradientTape() as inner:
            inner.watch([local[n] for n in wanted])
            args = {n: local.get(n) for n in forward_inputs if n in _ops.GRAD_BITS}
            outputs = dict(zip(forward_outputs, _REFERENCE[forward_type](**args, **kwargs)))
        first = inner.gradient([outputs[o] for o in seeds], [local[n] for n in wanted],
                               output_gradients=[local["d" + o] for o in seeds],
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
    second = outer.gradient(first, [given[n] for n in sources],
                            output_gradients=list(wanted.values()))
    by_name = dict(zip(sources, second))
    return [by_name.get(name) for name in grad_inputs]
