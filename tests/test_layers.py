"""tfcells Keras layers and cells against Keras' own, with identical weights.

Every comparison builds the Keras layer and the tfcells layer, copies the weights across with
`set_weights(get_weights())`, and compares outputs, states and tape gradients (w.r.t. every
weight, the input and the initial state). `CountWork` proves which path ran (forward_calls)
and which gradient GEMMs were skipped.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfcells
from tfcells.testing import CountWork

B, T, I, H = 3, 6, 4, 5
RTOL, ATOL = 1e-5, 1e-5

# Non-contiguous mask: leading masked steps, a fully masked row, trailing masked steps.
MASK = np.array([[0, 1, 0, 1, 1, 0],
                 [1, 1, 0, 0, 1, 1],
                 [0, 0, 0, 0, 0, 0]], dtype=bool)

KINDS = {
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "gru_reset_before": ("GRU", {"reset_after": False}),
    "simple_rnn": ("SimpleRNN", {}),
}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _x(b=B, t=T, i=I, seed=0):
    return tf.constant(_rng(seed).normal(size=(b, t, i)), tf.float32)


def _states(kind, b=B, seed=1):
    n = 2 if KINDS[kind][0] == "LSTM" else 1
    return [tf.constant(_rng(seed + k).normal(size=(b, H)), tf.float32) for k in range(n)]


def _pair(kind, ours_only=None, **kwargs):
    """(keras layer, tfcells layer) built alike; `ours_only` goes to the tfcells one only."""
    cls_name, extra = KINDS[kind]
    args = {**extra, **kwargs}
    ours = getattr(tfcells, cls_name)(H, **args, **(ours_only or {}))
    theirs = getattr(keras.layers, cls_name)(H, **args)
    return theirs, ours


def _build_and_copy(theirs, ours, x, **call_kwargs):
    theirs(x, **call_kwargs)
    ours(x, **call_kwargs)
    ours.set_weights(theirs.get_weights())


def _loss_weights(outputs):
    return [tf.constant(_rng(100 + k).normal(size=o.shape), o.dtype)
            for k, o in enumerate(outputs)]


def _run(layer, x, initial_state=None, mask=None, training=False, watch_input=True):
    """Outputs (flattened) and gradients of a fixed random projection of them w.r.t. the
    layer's weights, the input and the initial state."""
    x = tf.convert_to_tensor(x)
    states = None if initial_state is None else [tf.convert_to_tensor(s) for s in initial_state]
    with tf.GradientTape(persistent=True) as tape:
        if watch_input:
            tape.watch(x)
        if states is not None:
            tape.watch(states)
        kwargs = {"training": training}
        if states is not None:
            kwargs["initial_state"] = states
        if mask is not None:
            kwargs["mask"] = tf.constant(mask)
        outputs = tf.nest.flatten(layer(x, **kwargs))
        loss = tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outputs, _loss_weights(outputs))])
    grads = tape.gradient(loss, list(layer.weights) + [x] + (states or []))
    return [o.numpy() for o in outputs], [None if g is None else g.numpy() for g in grads]


def _assert_same(a, b, rtol=RTOL, atol=ATOL):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
            continue
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol)


def _compare(theirs, ours, x, initial_state=None, mask=None, training=False, fused=True):
    expected = _run(theirs, x, initial_state, mask, training)
    with CountWork() as work:
        got = _run(ours, x, initial_state, mask, training)
    _assert_same(got[0], expected[0])
    _assert_same(got[1], expected[1])
    if fused:
        assert work.delta["forward_calls"] >= 1 and work.delta["backward_calls"] >= 1
    else:
        assert work.delta["forward_calls"] == 0
    return work.delta


# ----------------------------------------------------------------------------------------------
# Same numbers as Keras

CONFIGS = {
    "default": ({}, False, False),
    "sequences_state_initial": ({"return_sequences": True, "return_state": True}, False, True),
    "backwards_mask_initial": ({"go_backwards": True, "return_sequences": True}, True, True),
    "no_bias_mask_state": ({"use_bias": False, "return_state": True}, True, False),
    "backwards_last_mask_state": ({"go_backwards": True, "return_state": True}, True, True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_matches_keras_values_and_gradients(kind, config):
    kwargs, use_mask, use_initial = CONFIGS[config]
    theirs, ours = _pair(kind, **kwargs)
    x = _x()
    initial = _states(kind) if use_initial else None
    call_kwargs = {} if initial is None else {"initial_state": initial}
    _build_and_copy(theirs, ours, x, **call_kwargs)
    _compare(theirs, ours, x, initial, MASK if use_mask else None)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_any_batch_and_time_size_and_weights_both_ways(kind):
    theirs, ours = _pair(kind, return_sequences=True)
    # Build both independently, then copy ours -> Keras this time.
    ours(_x(2, 3))
    theirs(_x(2, 3))
    theirs.set_weights(ours.get_weights())
    for b, t in [(1, 1), (5, 2), (2, 11)]:
        _compare(theirs, ours, _x(b, t, seed=b * t))


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_bidirectional_with_mask(kind):
    cls_name = KINDS[kind][0]
    x = _x()
    for return_sequences in (True, False):
        theirs = keras.layers.Bidirectional(
            getattr(keras.layers, cls_name)(H, return_sequences=return_sequences))
        ours = keras.layers.Bidirectional(
            getattr(tfcells, cls_name)(H, return_sequences=return_sequences))
        _build_and_copy(theirs, ours, x)
        assert isinstance(ours.backward_layer, getattr(tfcells, cls_name))
        _compare(theirs, ours, x, mask=MASK)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_stateful_across_batches_and_reset(kind):
    theirs, ours = _pair(kind, stateful=True, return_sequences=True)
    batches = [_x(seed=s) for s in range(4)]
    _build_and_copy(theirs, ours, batches[0])
    theirs.reset_states()
    ours.reset_states()
    for k, x in enumerate(batches):
        if k == 2:
            theirs.reset_states()
            ours.reset_states()
        np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=RTOL, atol=ATOL)
        for a, b in zip(ours.states, theirs.states):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=RTOL, atol=ATOL)


def _model(module, cls_name, front):
    inputs = keras.Input((T,) if front == "embedding" else (T, I),
                         dtype="int32" if front == "embedding" else "float32")
    if front == "embedding":
        h = keras.layers.Embedding(10, I, mask_zero=True)(inputs)
    else:
        h = keras.layers.Masking(mask_value=0.0)(inputs)
    h = getattr(module, cls_name)(H, return_sequences=True)(h)
    h = getattr(module, cls_name)(H, go_backwards=True)(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


@pytest.mark.parametrize("front", ["embedding", "masking"])
def test_masks_from_embedding_and_masking_layers(front):
    theirs = _model(keras.layers, "LSTM", front)
    ours = _model(tfcells, "LSTM", front)
    ours.set_weights(theirs.get_weights())
    if front == "embedding":
        x = np.array([[3, 4, 0, 5, 0, 0], [0, 0, 1, 2, 3, 4], [0] * 6], dtype="int32")
    else:
        x = _x().numpy()
        x[MASK == 0] = 0.0
    with CountWork() as work:
        got = ours(x)
    assert work.delta["forward_calls"] == 2
    np.testing.assert_allclose(got.numpy(), theirs(x).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_input_dropout_same_masks_as_keras(kind):
    theirs, ours = _pair(kind, dropout=0.4, seed=7, return_sequences=True)
    x = _x()
    _build_and_copy(theirs, ours, x)
    _compare(theirs, ours, x, mask=MASK, training=True)
    _compare(theirs, ours, x, training=False)


DROPOUT_CASES = {"recurrent": {"recurrent_dropout": 0.3},
                 "both": {"dropout": 0.2, "recurrent_dropout": 0.3},
                 "input_implementation_1": {"dropout": 0.4, "implementation": 1},
                 "recurrent_rate_1": {"dropout": 0.2, "recurrent_dropout": 1.0}}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("case", sorted(DROPOUT_CASES))
def test_dropout_runs_fused_with_keras_masks(kind, case):
    """Keras draws per-gate masks (implementation=1, forced by recurrent_dropout); the fused
    op applies the same ones: same outputs and gradients, call after call."""
    kwargs = dict(DROPOUT_CASES[case])
    if kind == "simple_rnn":
        kwargs.pop("implementation", None)
        if case == "recurrent_rate_1":  # SimpleRNN applies a rate of 1: all state dropped
            kwargs["recurrent_dropout"] = 0.999
    theirs, ours = _pair(kind, seed=3, return_sequences=True, return_state=True, **kwargs)
    if kwargs.get("implementation") == 1 and "recurrent_dropout" not in kwargs:
        # Keras' own LSTM/GRU layer applies one input mask to the whole sequence before its
        # cuDNN attempt and fails on implementation=1's per-gate list; its cell loop is right.
        cls_name, extra = KINDS[kind]
        theirs = getattr(keras.layers, cls_name)(H, seed=3, return_sequences=True,
                                                 return_state=True, use_cudnn=False,
                                                 **extra, **kwargs)
    x = _x()
    _build_and_copy(theirs, ours, x)
    assert ours.fused_unsupported_reason(training=True) is None
    states = _states(kind)
    for _ in range(2):  # new masks each call, drawn alike
        _compare(theirs, ours, x, initial_state=states, mask=MASK, training=True)
    _compare(theirs, ours, x, training=False)


def test_stacked_cells_with_dropout():
    cells = lambda mod: [mod.LSTMCell(H, dropout=0.2, recurrent_dropout=0.3, seed=5),
                         mod.GRUCell(H, recurrent_dropout=0.25, seed=6)]
    theirs = keras.layers.RNN(cells(keras.layers), return_sequences=True)
    ours = tfcells.RNN(cells(tfcells), return_sequences=True)
    x = _x()
    _build_and_copy(theirs, ours, x)
    _compare(theirs, ours, x, mask=MASK, training=True)


@pytest.mark.parametrize("kind, kwargs, reason", [
    ("lstm", {"activation": "relu"}, "activation"),
    ("lstm", {"recurrent_activation": "hard_sigmoid"}, "recurrent_activation"),
    ("gru", {"activation": "relu"}, "activation"),
    ("simple_rnn", {"activation": "relu"}, "activation"),
    ("simple_rnn", {"unroll": True}, "unroll"),
    ("gru", {"use_fused": False}, "use_fused"),
])
def test_unsupported_configurations_fall_back_to_keras(kind, kwargs, reason):
    keras_kwargs = {k: v for k, v in kwargs.items() if k != "use_fused"}
    cls_name, extra = KINDS[kind]
    theirs = getattr(keras.layers, cls_name)(H, return_sequences=True, **extra, **keras_kwargs)
    ours = getattr(tfcells, cls_name)(H, return_sequences=True, **extra, **kwargs)
    x = _x()
    _build_and_copy(theirs, ours, x)
    assert reason in ours.fused_unsupported_reason()
    assert ours.supports_jit  # Keras' loop compiles with XLA
    _compare(theirs, ours, x, mask=MASK, fused=False)


def test_use_fused_true_raises_when_unsupported():
    layer = tfcells.LSTM(H, activation="relu", use_fused=True)
    with pytest.raises(ValueError, match="use_fused=True.*activation"):
        layer(_x())
    with pytest.raises(ValueError, match="use_fused"):
        tfcells.GRU(H, use_fused="always")


def test_cell_subclass_overriding_call_is_not_fused():
    class Custom(tfcells.LSTMCell):
        def call(self, inputs, states, training=False):
            h, (h2, c) = super().call(inputs, states, training=training)
            return 2 * h, [h2, c]

    layer = tfcells.RNN(Custom(H))
    assert "overrides call" in layer.fused_unsupported_reason()
    with CountWork() as work:
        layer(_x())
    assert work.delta["forward_calls"] == 0


# ----------------------------------------------------------------------------------------------
# Cells


def _cells(module, dropout=0.0):
    return [module.LSTMCell(H, dropout=dropout, seed=1),
            module.GRUCell(H + 1, reset_after=False, dropout=dropout, seed=2),
            module.SimpleRNNCell(H - 1, dropout=dropout, seed=3)]


@pytest.mark.parametrize("single", [True, False])
@pytest.mark.parametrize("kwargs", [
    {"return_sequences": True, "return_state": True},
    {"go_backwards": True, "return_state": True},
])
def test_rnn_with_tfcells_cells_matches_keras_rnn(single, kwargs):
    if single:
        theirs = keras.layers.RNN(keras.layers.GRUCell(H), **kwargs)
        ours = tfcells.RNN(tfcells.GRUCell(H), **kwargs)
        initial = [tf.constant(_rng(5).normal(size=(B, H)), tf.float32)]
    else:
        theirs = keras.layers.RNN(keras.layers.StackedRNNCells(_cells(keras.layers)),
                                  **kwargs)
        ours = tfcells.RNN(keras.layers.StackedRNNCells(_cells(tfcells)), **kwargs)
        initial = None
    x = _x()
    _build_and_copy(theirs, ours, x)
    with CountWork() as work:
        ours(x)
    assert work.delta["forward_calls"] == (1 if single else 3)
    _compare(theirs, ours, x, initial, MASK)


def test_stacked_cells_with_dropout_match_keras():
    theirs = keras.layers.RNN(_cells(keras.layers, dropout=0.3), return_sequences=True)
    ours = tfcells.RNN(_cells(tfcells, dropout=0.3), return_sequences=True)
    x = _x()
    _build_and_copy(theirs, ours, x)
    _compare(theirs, ours, x, mask=MASK, training=True)


@pytest.mark.parametrize("stacked", [False, True], ids=["list", "StackedRNNCells"])
def test_keras_rnn_wrapping_tfcells_cells_runs_fused(stacked):
    cells = _cells(tfcells)
    ours = keras.layers.RNN(keras.layers.StackedRNNCells(cells) if stacked else cells,
                            return_sequences=True)
    assert isinstance(ours, tfcells.RNN) and isinstance(ours, keras.layers.RNN)
    theirs = keras.layers.RNN(_cells(keras.layers), return_sequences=True)
    assert type(theirs) is keras.layers.RNN  # Keras' own cells: untouched
    x = _x()
    _build_and_copy(theirs, ours, x)
    with CountWork() as work:
        ours(x)
    assert work.delta["forward_calls"] == len(cells)  # one fused op per cell, not per step
    _compare(theirs, ours, x, mask=MASK)
    # Saved as tfcells>RNN; loads (fused) where tfcells is importable.
    restored = keras.layers.deserialize(keras.layers.serialize(ours))
    assert isinstance(restored, tfcells.RNN)


def test_tfcells_rnn_with_keras_cell_runs_keras_loop():
    theirs = keras.layers.RNN(keras.layers.LSTMCell(H))
    ours = tfcells.RNN(keras.layers.LSTMCell(H))
    x = _x()
    _build_and_copy(theirs, ours, x)
    assert "not a tfcells cell" in ours.fused_unsupported_reason()
    _compare(theirs, ours, x, mask=MASK, fused=False)


# ----------------------------------------------------------------------------------------------
# Freezing: excluded from trainable_weights, and the gradient work is skipped


def _names(variables):
    return sorted(v.name for v in variables)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
@pytest.mark.parametrize("how", ["constructor", "after_build"])
def test_frozen_kernel_skips_its_gradient(kind, how):
    flags = {"kernel_trainable": False} if how == "constructor" else {}
    theirs, ours = _pair(kind, ours_only=flags, return_sequences=True)
    x = _x()
    _build_and_copy(theirs, ours, x)
    if how == "after_build":
        ours.cell.kernel.trainable = False
    assert _names(ours.trainable_weights) == ["bias", "recurrent_kernel"]
    assert ours.get_config()["kernel_trainable"] is False
    expected = _run(theirs, x, mask=MASK)
    with CountWork() as work:
        got = _run(ours, tf.Variable(x), mask=MASK)
    _assert_same(got[0], expected[0])
    kernel_index = [w.name for w in ours.weights].index("kernel")
    assert got[1][kernel_index] is None
    others = [g for k, g in enumerate(got[1]) if k != kernel_index]
    _assert_same(others, [g for k, g in enumerate(expected[1]) if k != kernel_index])
    assert work.delta["grad_kernel"] == 0
    assert work.delta["grad_recurrent_kernel"] == 1 and work.delta["grad_bias"] == 1


def test_every_flag_combination_and_layer_trainable():
    x = _x()
    for kernel in (True, False):
        for recurrent in (True, False):
            for bias in (True, False):
                layer = tfcells.LSTM(H, kernel_trainable=kernel,
                                     recurrent_kernel_trainable=recurrent,
                                     bias_trainable=bias)
                layer(x)
                expected = [n for n, f in (("bias", bias), ("kernel", kernel),
                                           ("recurrent_kernel", recurrent)) if f]
                assert _names(layer.trainable_weights) == expected
                with CountWork() as work:
                    _, grads = _run(layer, x)
                assert [g is not None for g in grads[:3]] == [kernel, recurrent, bias]
                assert work.delta["grad_kernel"] == int(kernel)
                assert work.delta["grad_recurrent_kernel"] == int(recurrent)
                assert work.delta["grad_bias"] == int(bias)
                assert work.delta["grad_x"] == 1  # x was watched
                assert work.delta["backward_calls"] == 1

    layer = tfcells.GRU(H)
    layer(x)
    layer.trainable = False
    assert layer.trainable_weights == []
    with CountWork() as work:  # data input, every weight frozen: nothing on the tape
        _, grads = _run(layer, x, watch_input=False)
    assert all(g is None for g in grads)
    assert work.delta["forward_calls"] == 1 and work.delta["backward_calls"] == 0
    with CountWork() as work:  # a watched input still gets its gradient, and only that
        _run(layer, x)
    assert work.delta["grad_x"] == 1 and work.delta["backward_calls"] == 1
    assert work.delta["grad_kernel"] == work.delta["grad_recurrent_kernel"] == 0


def test_input_gradient_false_skips_dx():
    x = tf.Variable(_x())
    for input_gradient, dx_runs in ((True, 1), (False, 0)):
        layer = tfcells.SimpleRNN(H, input_gradient=input_gradient)
        with CountWork() as work:
            _, grads = _run(layer, x)
        assert work.delta["grad_x"] == dx_runs
        assert (grads[-1] is None) == (not input_gradient)
        assert work.delta["grad_kernel"] == 1
    assert layer.get_config()["input_gradient"] is False


def _fit(model, x, y, epochs=1):
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False)


def test_freezing_takes_effect_at_next_compile():
    x = _x(16, T)
    y = np.ones((16, 1), "float32")
    model = keras.Sequential([keras.Input((T, I)), tfcells.LSTM(H), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    with CountWork() as work:
        _fit(model, x, y)
    assert work.delta["grad_kernel"] == 2  # two batches
    lstm = model.layers[0]
    lstm.cell.kernel.trainable = False
    model.compile("adam", "mse")
    before = lstm.cell.kernel.numpy().copy()
    recurrent_before = lstm.cell.recurrent_kernel.numpy().copy()
    with CountWork() as work:
        _fit(model, x, y)
    assert work.delta["grad_kernel"] == 0 and work.delta["grad_recurrent_kernel"] == 2
    np.testing.assert_array_equal(lstm.cell.kernel.numpy(), before)
    assert not np.array_equal(lstm.cell.recurrent_kernel.numpy(), recurrent_before)


# ----------------------------------------------------------------------------------------------
# The three scenarios (see examples/)


def test_scenario_a_frozen_embedding_into_lstm():
    rng = _rng(11)
    tokens = rng.integers(1, 50, size=(32, T)).astype("int32")
    labels = rng.integers(0, 2, size=(32, 1)).astype("float32")
    pretrained = rng.normal(size=(50, 8)).astype("float32")
    embedding = keras.layers.Embedding(50, 8, trainable=False, mask_zero=True,
                                       embeddings_initializer=keras.initializers.Constant(
                                           pretrained))
    lstm = tfcells.LSTM(H, input_gradient=False)
    model = keras.Sequential([keras.Input((T,), dtype="int32"), embedding, lstm,
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    kernel_before = lstm.cell.kernel.numpy().copy()
    with CountWork() as work:
        _fit(model, tokens, labels)
    np.testing.assert_array_equal(embedding.embeddings.numpy(), pretrained)
    assert work.delta["backward_calls"] == 4
    assert work.delta["grad_x"] == 0  # the LSTM's dx GEMM never ran
    assert work.delta["grad_kernel"] == 4
    assert not np.array_equal(lstm.cell.kernel.numpy(), kernel_before)

    # Without the declaration the tape cannot know (Keras' frozen Embedding variable is still
    # trainable to TensorFlow), so dx is computed and then thrown away.
    embedding2 = keras.layers.Embedding(50, 8, trainable=False)
    layer2 = tfcells.LSTM(H)
    tokens_small = tf.constant(tokens[:4])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer2(embedding2(tokens_small)))
    with CountWork() as work:
        tape.gradient(loss, layer2.trainable_weights)
    assert work.delta["grad_x"] == 1


def test_scenario_b_stacked_rnn_with_frozen_first_layer():
    rng = _rng(12)
    x = rng.normal(size=(32, T, I)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    layers = [tfcells.LSTM(H, return_sequences=True), tfcells.GRU(H, return_sequences=True),
              tfcells.SimpleRNN(H)]
    model = keras.Sequential([keras.Input((T, I)), *layers, keras.layers.Dense(1)])
    layers[0].trainable = False
    model.compile("sgd", "mse")
    before = [w.numpy().copy() for w in layers[0].weights]
    others_before = [w.numpy().copy() for layer in layers[1:] for w in layer.weights]
    with CountWork() as work:
        _fit(model, x, y)
    steps = 4
    for w, b in zip(layers[0].weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    others = [w.numpy() for layer in layers[1:] for w in layer.weights]
    assert all(not np.array_equal(a, b) for a, b in zip(others, others_before))
    assert work.delta["forward_calls"] == 3 * steps
    assert work.delta["backward_calls"] == 2 * steps  # layer 1's backward never ran
    # Layer 2's input comes from the frozen layer 1, which is off the tape: its dx is skipped
    # too; only layer 3 computes dx (into layer 2).
    assert work.delta["grad_x"] == steps


def test_scenario_c_tanh_rnn_with_fixed_input_matrix():
    rng = _rng(13)
    x = rng.normal(size=(32, T, I)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    rnn = tfcells.SimpleRNN(H, kernel_trainable=False)
    model = keras.Sequential([keras.Input((T, I)), rnn, keras.layers.Dense(1)])
    model.compile("adam", "mse")
    w_fixed = rnn.cell.kernel.numpy().copy()
    w_trainable = rnn.cell.recurrent_kernel.numpy().copy()
    assert _names(rnn.trainable_weights) == ["bias", "recurrent_kernel"]
    with CountWork() as work:
        _fit(model, x, y)
    np.testing.assert_array_equal(rnn.cell.kernel.numpy(), w_fixed)
    assert not np.array_equal(rnn.cell.recurrent_kernel.numpy(), w_trainable)
    assert work.delta["backward_calls"] == 4
    assert work.delta["grad_kernel"] == 0 and work.delta["grad_x"] == 0
    assert work.delta["grad_recurrent_kernel"] == 4


# ----------------------------------------------------------------------------------------------
# Serialization


def _all_layers_model():
    inputs = keras.Input((T, I))
    h = tfcells.LSTM(H, return_sequences=True, kernel_trainable=False)(inputs)
    h = keras.layers.Bidirectional(tfcells.GRU(H, reset_after=False,
                                               return_sequences=True))(h)
    h = tfcells.RNN([tfcells.LSTMCell(H, bias_trainable=False), tfcells.SimpleRNNCell(H)],
                    return_sequences=True)(h)
    h = tfcells.SimpleRNN(H, go_backwards=True, input_gradient=False)(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h))


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "SimpleRNN"])
def test_get_config_from_config(cls_name):
    layer = getattr(tfcells, cls_name)(H, dropout=0.25, go_backwards=True,
                                        recurrent_kernel_trainable=False, input_gradient=False,
                                        use_fused=False, name="r")
    config = layer.get_config()
    assert config["recurrent_kernel_trainable"] is False and config["use_fused"] is False
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone(_x())
    assert clone.cell.recurrent_kernel.trainable is False
    keras_config = getattr(keras.layers, cls_name)(H).get_config()
    assert set(keras_config) <= set(config)
    cell = tfcells.GRUCell(H, kernel_trainable=False)
    assert tfcells.GRUCell.from_config(cell.get_config()).get_config() == cell.get_config()


def test_keras_file_and_export_round_trip(tmp_path):
    model = _all_layers_model()
    x = _x()
    expected = model(x).numpy()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), expected)
    assert isinstance(loaded.layers[1], tfcells.LSTM)
    assert loaded.layers[1].cell.kernel.trainable is False
    assert isinstance(loaded.layers[3].cell.cells[0], tfcells.LSTMCell)
    assert loaded.layers[3].cell.cells[0].bias.trainable is False
    assert loaded.layers[4].input_gradient is False

    export_dir = str(tmp_path / "exported")
    model.export(export_dir, verbose=False)
    served = tf.saved_model.load(export_dir)
    np.testing.assert_allclose(served.serve(x).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_weights_file_interchange_with_keras_layers(tmp_path):
    def build(module):
        return keras.Sequential([keras.Input((T, I)),
                                 module.LSTM(H, return_sequences=True),
                                 module.GRU(H, return_sequences=True),
                                 module.SimpleRNN(H), keras.layers.Dense(1)])

    theirs, ours = build(keras.layers), build(tfcells)
    x = _x()
    path = str(tmp_path / "keras.weights.h5")
    theirs.save_weights(path)
    ours.load_weights(path)
    np.testing.assert_allclose(ours(x).numpy(), theirs(x).numpy(), rtol=RTOL, atol=ATOL)
    back = build(keras.layers)
    path = str(tmp_path / "tfcells.weights.h5")
    ours.save_weights(path)
    back.load_weights(path)
    np.testing.assert_allclose(back(x).numpy(), ours(x).numpy(), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Precision policies, XLA, distribution


@pytest.mark.parametrize("policy, dtype", [("mixed_float16", "float16"),
                                           ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision(policy, dtype):
    x = _x(16, T)
    reference = keras.layers.LSTM(H, return_sequences=True)
    expected = reference(x).numpy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = tfcells.LSTM(H, return_sequences=True)
        model = keras.Sequential([keras.Input((T, I)), layer, keras.layers.GlobalAveragePooling1D(),
                                  keras.layers.Dense(1, dtype="float32")])
        layer.set_weights(reference.get_weights())
        assert layer.cell.kernel.dtype == "float32"
        with CountWork() as work:
            got = layer(x)
        assert work.delta["forward_calls"] == 1
        assert got.dtype == dtype
        tol = 2e-2 if dtype == "bfloat16" else 5e-3
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected, atol=tol)
        model.compile("adam", "mse")
        before = layer.cell.kernel.numpy().copy()
        with CountWork() as work:
            _fit(model, x, np.ones((16, 1), "float32"))
        assert work.delta["backward_calls"] == 2
        assert np.all(np.isfinite(layer.cell.kernel.numpy()))
        assert not np.array_equal(layer.cell.kernel.numpy(), before)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_jit_compile_requested_opts_out_cleanly():
    x = _x(16, T)
    y = np.ones((16, 1), "float32")
    layer = tfcells.GRU(H)
    assert layer.supports_jit is False
    model = keras.Sequential([keras.Input((T, I)), layer, keras.layers.Dense(1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.compile("adam", "mse", jit_compile=True)
    assert model.jit_compile is False
    assert any("jit_compile" in str(w.message) for w in caught)
    with CountWork() as work:
        _fit(model, x, y)
    assert work.delta["backward_calls"] == 2

    # Called directly inside an XLA function, the layer runs Keras' loop (no XLA kernel).
    reference = keras.layers.GRU(H)
    reference(x)
    reference.set_weights(layer.get_weights())
    with CountWork() as work:
        got = tf.function(lambda v: layer(v), jit_compile=True)(x)
    assert work.delta["forward_calls"] == 0
    np.testing.assert_allclose(got.numpy(), reference(x).numpy(), rtol=1e-5, atol=1e-5)


def test_mirrored_strategy_on_two_logical_cpus():
    script = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, tfcells
        from tfcells.testing import CountWork
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            rnn = tfcells.LSTM(5, kernel_trainable=False)
            model = keras.Sequential([keras.Input((6, 4)), rnn, keras.layers.Dense(1)])
            model.compile("adam", "mse")
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 6, 4)).astype("float32")
        y = rng.normal(size=(32, 1)).astype("float32")
        kernel = rnn.cell.kernel.numpy().copy()
        recurrent = rnn.cell.recurrent_kernel.numpy().copy()
        with CountWork() as work:
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        assert np.array_equal(rnn.cell.kernel.numpy(), kernel)
        assert not np.array_equal(rnn.cell.recurrent_kernel.numpy(), recurrent)
        # two steps, each on two replicas
        assert work.delta["backward_calls"] == 4, work.delta
        assert work.delta["grad_kernel"] == 0, work.delta
        print("MIRRORED-OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert "MIRRORED-OK" in result.stdout, result.stdout + result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_errors():
    layer = tfcells.LSTM(H)
    layer(_x())
    with pytest.raises(ValueError, match="ndim=3"):
        layer(tf.zeros([B, I]))
    with pytest.raises(ValueError, match="expected axis -1 .* value 4"):
        layer(tf.zeros([B, T, I + 1]))
    with pytest.raises(ValueError, match="expects 2 initial state"):
        layer(_x(), initial_state=[tf.zeros([B, H])])
    with pytest.raises(ValueError, match=r"initial_state\[1\] must have shape"):
        layer(_x(), initial_state=[tf.zeros([B, H]), tf.zeros([B, H + 1])])
    with pytest.raises(ValueError, match=r"initial_state\[0\] must have shape"):
        layer(_x(), initial_state=[tf.zeros([B + 1, H]), tf.zeros([B + 1, H])])
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(_x(), mask=tf.ones([B, T + 1], bool))
    with pytest.raises(ValueError, match="mask must have shape"):
        layer(_x(), mask=tf.ones([B], bool))
    rnn = tfcells.RNN(tfcells.GRUCell(H))
    with pytest.raises(ValueError, match="ndim=3"):
        rnn(tf.zeros([B, T, I, 1]))


# ----------------------------------------------------------------------------------------------
# The runnable examples of the three scenarios (they assert what they print)

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script", ["frozen_embedding_lstm.py", "stacked_frozen_first_layer.py",
                                    "fixed_input_matrix_rnn.py"])
def test_example_runs(script):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, script)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "OK:" in result.stdout
