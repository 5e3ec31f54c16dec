"""Second-order gradients and forward mode through the fused ops, against Keras' own layers.

The gradient ops' gradient recomputes the recurrence in plain TensorFlow (see
tfcells._second_order); here it is held, in float64, to Keras' layers with the same weights:
gradient penalties (a tape over a tape) w.r.t. the weights, the input and the initial states,
forward-mode JVPs (`tf.autodiff.ForwardAccumulator`) and Hessian-vector products
(forward over reverse), for every cell with masks, go_backwards, initial states, dropout and
no bias; at the op level time_major and frozen inputs; inside tf.function with an unknown
sequence length and with graph-mode tf.gradients.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfcells
from tfcells.testing import CountWork

B, T, I, H = 2, 4, 3, 3
DTYPE = "float64"
RTOL, ATOL = 1e-10, 1e-12

MASK = np.array([[0, 1, 1, 0], [1, 1, 0, 1]], dtype=bool)

KINDS = {
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "gru_reset_before": ("GRU", {"reset_after": False}),
    "simple_rnn": ("SimpleRNN", {}),
}

CONFIGS = {
    # layer kwargs, mask, initial states, training
    "mask_backwards_state": ({"go_backwards": True, "return_sequences": True,
                              "return_state": True}, True, True, False),
    "dropout": ({"dropout": 0.3, "recurrent_dropout": 0.25, "seed": 3,
                 "return_sequences": True}, True, True, True),
    "no_bias_last": ({"use_bias": False}, False, False, False),
}


def _rng(seed):
    return np.random.default_rng(seed)


def _x(seed=0, t=T):
    return tf.constant(_rng(seed).normal(size=(B, t, I)), DTYPE)


def _states(kind, seed=1):
    n = 2 if KINDS[kind][0] == "LSTM" else 1
    return [tf.constant(_rng(seed + k).normal(size=(B, H)) * 0.5, DTYPE) for k in range(n)]


def _pair(kind, **kwargs):
    """(keras layer, tfcells layer), float64, built alike, same weights."""
    cls_name, extra = KINDS[kind]
    theirs = getattr(keras.layers, cls_name)(H, dtype=DTYPE, **extra, **kwargs)
    ours = getattr(tfcells, cls_name)(H, dtype=DTYPE, **extra, **kwargs)
    x = _x()
    theirs(x)
    ours(x)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def _call(layer, x, states, mask, training):
    kwargs = {"training": training}
    if states:
        kwargs["initial_state"] = states
    if mask is not None:
        kwargs["mask"] = tf.constant(mask)
    outputs = tf.nest.flatten(layer(x, **kwargs))
    # Nonlinear in the outputs (a non-zero Hessian of its own), differently for each output.
    return tf.add_n([tf.reduce_sum(tf.sin((1.3 + 0.7 * k) * o)) for k, o in enumerate(outputs)])


def _penalty_gradients(layer, x, states, mask=None, training=False):
    """d/d(weights, x, states) of the squared norm of d loss / d(x, states, weights)."""
    inputs = [x] + list(states)
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            loss = _call(layer, x, states, mask, training)
        firsts = inner.gradient(loss, inputs + list(layer.trainable_weights))
        penalty = tf.add_n([tf.reduce_sum(g ** 2) for g in firsts])
    return outer.gradient(penalty, list(layer.trainable_weights) + inputs)


def _assert_all_close(got, expected):
    assert len(got) == len(expected)
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g is not None and e is not None, k
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=RTOL, atol=ATOL,
                                   err_msg=f"entry {k}")


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradient_penalty_matches_keras(kind, config):
    kwargs, use_mask, use_states, training = CONFIGS[config]
    theirs, ours = _pair(kind, **kwargs)
    x = _x(seed=4)
    states = _states(kind) if use_states else []
    mask = MASK if use_mask else None
    expected = _penalty_gradients(theirs, x, states, mask, training)
    with CountWork() as work:
        got = _penalty_gradients(ours, x, states, mask, training)
    # The fused gradient op runs twice: for the penalty's first-order gradients, and again
    # when the outer tape follows the loss' own dependence on the outputs (sin'(y) seeds).
    assert work.delta["forward_calls"] == 1 and work.delta["backward_calls"] == 2
    _assert_all_close(got, expected)


def _variables(layer):
    return [w.value for w in layer.trainable_weights]  # the tf.Variables


def _forward_mode(layer, kind, hvp):
    """JVP of the loss w.r.t. weights, input and initial states together; with `hvp`, also
    the Hessian-vector products of the loss w.r.t. the weights (forward over reverse)."""
    x = _x(seed=5)
    states = _states(kind)
    variables = _variables(layer)
    primals = variables + [x] + states
    tangents = [tf.constant(_rng(70 + k).normal(size=p.shape), DTYPE)
                for k, p in enumerate(primals)]
    with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
        loss = _call(layer, x, states, MASK, False)
    results = [acc.jvp(loss)]
    if hvp:
        with tf.autodiff.ForwardAccumulator(variables, tangents[:len(variables)]) as acc:
            with tf.GradientTape() as tape:
                loss = _call(layer, x, states, MASK, False)
            grads = tape.gradient(loss, variables)
        results += [acc.jvp(g) for g in grads]
    return results


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forward_accumulator_matches_keras(kind):
    """JVPs for every cell; Hessian-vector products (which trace the gradient ops' gradient
    once more, slowly) for the LSTM."""
    theirs, ours = _pair(kind, return_sequences=True, return_state=True, go_backwards=True)
    hvp = kind == "lstm"
    _assert_all_close(_forward_mode(ours, kind, hvp), _forward_mode(theirs, kind, hvp))


def test_penalty_in_tf_function_with_unknown_length_and_graph_gradients():
    """Inside tf.function, T unknown at trace time (the reference runs a tf.while_loop), and
    graph-mode tf.gradients of tf.gradients."""
    theirs, ours = _pair("lstm", return_sequences=True)
    spec = tf.TensorSpec([B, None, I], DTYPE)
    x = _x(seed=6, t=5)

    def penalty(layer):
        return tf.function(lambda v: _penalty_gradients(layer, v, []),
                           input_signature=[spec])(x)

    _assert_all_close(penalty(ours), penalty(theirs))

    def tf_gradients(layer):
        def fn(v):
            loss = _call(layer, v, [], None, False)
            (dx,) = tf.gradients(loss, [v])
            return tf.gradients(tf.reduce_sum(dx ** 2), list(layer.trainable_weights) + [v])
        return tf.function(fn, input_signature=[spec])(x)

    _assert_all_close(tf_gradients(ours), tf_gradients(theirs))


def test_frozen_weight_stays_none_and_first_order_skips_its_work():
    theirs, ours = _pair("lstm", return_sequences=True)
    ours.cell.kernel.trainable = False
    x = _x(seed=7)
    expected = dict(zip([w.name for w in theirs.trainable_weights] + ["x"],
                        _penalty_gradients(theirs, x, [])))
    inputs = [x]
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            loss = _call(ours, x, [], None, False)
        with CountWork() as work:
            firsts = inner.gradient(loss, inputs + list(ours.weights))
        assert firsts[1] is None  # kernel (ours.weights: kernel, recurrent_kernel, bias)
        penalty = tf.add_n([tf.reduce_sum(g ** 2) for g in firsts if g is not None])
    got = outer.gradient(penalty, list(ours.weights) + inputs)
    assert work.delta["grad_kernel"] == 0 and work.delta["grad_recurrent_kernel"] == 1
    assert got[0] is None  # the frozen kernel: no second-order gradient either
    # Keras' penalty also counted d/d kernel; ours leaves the frozen kernel's gradient out of
    # the penalty, so compare against Keras with the same penalty.
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs)
            loss = _call(theirs, x, [], None, False)
        keras_firsts = inner.gradient(loss, inputs + list(theirs.weights))
        penalty = tf.add_n([tf.reduce_sum(g ** 2) for k, g in enumerate(keras_firsts)
                            if k != 1])
    keras_got = outer.gradient(penalty, list(theirs.weights) + inputs)
    _assert_all_close(got[1:], keras_got[1:])
    assert set(expected)  # Keras' layer itself supports the penalty


def _op_inputs(time_major):
    rng = _rng(9)
    x = rng.normal(size=(B, T, I))
    if time_major:
        x = x.transpose(1, 0, 2)
    values = dict(x=x, h0=rng.normal(size=(B, H)), c0=rng.normal(size=(B, H)),
                  kernel=rng.normal(size=(I, 4 * H)) / 2,
                  recurrent_kernel=rng.normal(size=(H, 4 * H)) / 2,
                  bias=rng.normal(size=(4 * H,)))
    return {k: tf.constant(v, DTYPE) for k, v in values.items()}


@pytest.mark.parametrize("frozen", [(), ("kernel", "h0")])
def test_op_time_major_and_frozen(frozen):
    """The op in time_major layout gives the batch-major penalty gradients (transposed);
    frozen inputs get None at second order."""
    results = []
    for time_major in (False, True):
        values = _op_inputs(time_major)
        names = list(values)
        mask = tf.constant(MASK.T if time_major else MASK)
        with tf.GradientTape() as outer:
            outer.watch(list(values.values()))
            with tf.GradientTape() as inner:
                inner.watch(list(values.values()))
                y, h, c = tfcells.ops.lstm(**values, mask=mask, time_major=time_major,
                                           go_backwards=True, frozen=frozen)
                loss = tf.reduce_sum(y * tf.tanh(y)) + tf.reduce_sum(h * c)
            firsts = inner.gradient(loss, list(values.values()))
            penalty = tf.add_n([tf.reduce_sum(g ** 2) for g in firsts if g is not None])
        grads = dict(zip(names, outer.gradient(penalty, list(values.values()))))
        for name in frozen:
            assert grads.pop(name) is None
        if time_major:
            grads["x"] = tf.transpose(grads["x"], [1, 0, 2])
        results.append([grads[n] for n in sorted(grads)])
    _assert_all_close(results[1], results[0])
