"""Which path a tfcells layer call takes, and that it says so.

A symbolic `training` tensor selects dropout at run time (Keras' layers refuse one); every
fallback to Keras' loop is reported by `fused_unsupported_reason` and raised by
`use_fused=True`: the configuration, non-float inputs, nested inputs, an XLA function.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfcells
from tfcells.testing import CountWork

B, T, I, H = 3, 5, 4, 5
RTOL, ATOL = 1e-5, 1e-5
MASK = np.array([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=bool)


def _x(dtype=tf.float32, seed=0):
    return tf.cast(np.random.default_rng(seed).normal(size=(B, T, I)) * 2, dtype)


def _pair(cls_name, **kwargs):
    theirs = getattr(keras.layers, cls_name)(H, **kwargs)
    ours = getattr(tfcells, cls_name)(H, **kwargs)
    x = _x()
    theirs(x)
    ours(x)
    ours.set_weights(theirs.get_weights())
    return theirs, ours


def _outputs_and_gradients(layer, x, training):
    with tf.GradientTape() as tape:
        tape.watch(x)
        outputs = tf.nest.flatten(layer(x, mask=tf.constant(MASK), training=training))
        loss = tf.add_n([tf.reduce_sum(tf.sin(o * (k + 1.0))) for k, o in enumerate(outputs)])
    return outputs + tape.gradient(loss, list(layer.trainable_weights) + [x])


@pytest.mark.parametrize("cls_name, kwargs", [
    ("LSTM", {"dropout": 0.3, "recurrent_dropout": 0.2}),
    ("GRU", {"recurrent_dropout": 0.4, "reset_after": False}),
    ("SimpleRNN", {"dropout": 0.5}),
])
def test_symbolic_training_tensor_selects_dropout(cls_name, kwargs):
    """tf.function(training=t): t False gives Keras' inference numbers, t True Keras'
    training numbers with the same masks, call after call (the seed advances alike)."""
    theirs, ours = _pair(cls_name, seed=4, return_sequences=True, return_state=True, **kwargs)
    x = _x(seed=1)
    fn = tf.function(lambda v, t: _outputs_and_gradients(ours, v, t))
    for training in (True, False, True):
        expected = _outputs_and_gradients(theirs, x, training)
        with CountWork() as work:
            got = fn(x, tf.constant(training))
        assert work.delta["forward_calls"] == 1 and work.delta["backward_calls"] == 1
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=RTOL, atol=ATOL)
    assert fn.experimental_get_tracing_count() == 1  # one graph serves both values


def test_symbolic_training_tensor_in_stacked_cells():
    cells = lambda mod: [mod.LSTMCell(H, dropout=0.2, seed=5),
                         mod.GRUCell(H, recurrent_dropout=0.3, seed=6)]
    theirs = keras.layers.RNN(cells(keras.layers), return_sequences=True)
    ours = tfcells.RNN(cells(tfcells), return_sequences=True)
    x = _x()
    theirs(x)
    ours(x)
    ours.set_weights(theirs.get_weights())
    fn = tf.function(lambda v, t: ours(v, training=t))
    for training in (False, True):
        np.testing.assert_allclose(fn(x, tf.constant(training)).numpy(),
                                   theirs(x, training=training).numpy(), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Every fallback is reported


def test_xla_function_is_reported_and_raises_with_use_fused_true():
    theirs, ours = _pair("GRU")
    assert ours.fused_unsupported_reason() is None  # eagerly: fused
    seen = []

    @tf.function(jit_compile=True)
    def xla(v):
        seen.append(ours.fused_unsupported_reason())
        return ours(v)

    x = _x()
    with CountWork() as work:
        got = xla(x)
    assert work.delta["forward_calls"] == 0
    assert "XLA" in seen[0] and "jit_compile" in seen[0]
    np.testing.assert_allclose(got.numpy(), theirs(x).numpy(), rtol=RTOL, atol=ATOL)

    strict = tfcells.GRU(H, use_fused=True)
    strict(x)
    with pytest.raises(ValueError, match="use_fused=True.*XLA"):
        tf.function(lambda v: strict(v), jit_compile=True)(x)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.bool])
@pytest.mark.parametrize("cls_name", ["LSTM", "SimpleRNN"])
def test_non_float_input_is_reported_and_raises_with_use_fused_true(cls_name, dtype):
    theirs, ours = _pair(cls_name, return_sequences=True)
    x = _x(dtype)
    reason = ours.fused_unsupported_reason(inputs=x)
    assert reason is not None and f"input dtype {dtype.name}" in reason
    assert ours.fused_unsupported_reason(inputs=_x(tf.float16)) is None
    with CountWork() as work:
        got = ours(x)
    assert work.delta["forward_calls"] == 0  # Keras' loop, and Keras' numbers
    np.testing.assert_allclose(got.numpy(), theirs(x).numpy(), rtol=RTOL, atol=ATOL)
    strict = getattr(tfcells, cls_name)(H, use_fused=True)
    strict(_x())
    with pytest.raises(ValueError, match=f"use_fused=True.*input dtype {dtype.name}"):
        strict(x)


def test_nested_inputs_are_reported():
    layer = tfcells.LSTM(H)
    assert layer.fused_unsupported_reason(inputs=(_x(), _x())) == "nested inputs"
    assert layer.fused_unsupported_reason(inputs=keras.KerasTensor((B, T, I))) is None


@pytest.mark.parametrize("kwargs, name", [({"activation": "relu"}, "relu"),
                                          ({"recurrent_activation": "hard_sigmoid"},
                                           "hard_sigmoid"),
                                          ({"activation": keras.activations.elu}, "elu")])
def test_reason_names_the_activation(kwargs, name):
    reason = tfcells.LSTM(H, **kwargs).fused_unsupported_reason()
    assert f" {name} is not " in reason and "<function" not in reason
