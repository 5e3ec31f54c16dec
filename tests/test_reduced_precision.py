"""bfloat16 and float16 storage: the ops, the Keras layers under mixed policies, accuracy.

With a 16-bit x the kernels compute in float32 (csrc/core/storage.h): they widen x and the
states, run the float32 pass and round what they store in 16 bits. So the exact check is that
every 16-bit output and state gradient equals tf.cast of the float32 op's (TensorFlow's own
round-to-nearest-even) and every weight gradient equals the float32 op's bit for bit. Where
the CPU level has AVX512_BF16 (build_info()["cpu_bf16_products"]), a bfloat16 call's step
products multiply bfloat16 pairs instead (on the amx level, on AMX tiles, and the weight
gradients too), and the same comparison holds to 16-bit tolerance (the core self-test checks
those products bit for bit against their definition). One exception: the float32 op reads the
state entering each step from its output y a step behind (no h_prev cache, CallPlan::HPrevFromY)
and so sums dW_h as h0's product plus y's in one more GEMM, while a 16-bit call, whose y is
rounded, keeps an h_prev cache and sums it in one: without go_backwards or recurrent dropout
(whose weight gradient reads the same values element by element either way), dW_h agrees to
float32 rounding there. The accuracy checks then measure both tfcells and Keras' own layers
against float64.
"""

import numpy as np
import pytest
import tensorflow as tf
import keras

import tfcells
from tfcells import reference as ref
from tfcells.testing import CountWork

from test_ops import CELLS, CELL_IDS, make_inputs

HALF_DTYPES = [tf.bfloat16, tf.float16]
# bfloat16 calls multiply bfloat16 pairs at this CPU level (not the float32 pass exactly).
BF16_PAIRS = tfcells.build_info()["cpu_bf16_products"]
HALF_IDS = ["bfloat16", "float16"]
STATE_NAMES = ("x", "h0", "c0")


def _split(cell, inputs, dtype):
    """16-bit x and states, float32 weights: how the layers call the op."""
    return {k: (None if v is None else tf.cast(v, dtype if k in STATE_NAMES else tf.float32))
            for k, v in inputs.items()}


def _run(fn, inputs, upstream, **kwargs):
    """Outputs and the gradients of every input for the given output gradients."""
    names = [k for k, v in inputs.items() if v is not None]
    with tf.GradientTape() as tape:
        tape.watch([inputs[n] for n in names])
        out = fn(**inputs, **kwargs)
    grads = tape.gradient(out, [inputs[n] for n in names],
                          output_gradients=[tf.cast(u, o.dtype) for u, o in zip(upstream, out)])
    return out, dict(zip(names, grads))


def _assert_same_pass(got, want, dtype, name, summed_apart=False):
    """`got` is `want` (the float32 op's, cast to got's dtype) bit for bit, or within 16-bit
    tolerance where bfloat16 calls multiply bfloat16 pairs, or within float32 rounding where the
    two sum the same products in another order (summed_apart)."""
    want = tf.cast(want, got.dtype).numpy()
    if summed_apart and not (dtype == tf.bfloat16 and BF16_PAIRS):
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-30)
        err = np.max(np.abs(got.numpy() - want), initial=0.0)
        assert err <= 1e-5 * scale, (name, err, scale)
    elif dtype == tf.bfloat16 and BF16_PAIRS:
        scale = max(float(np.max(np.abs(want.astype(np.float32)), initial=0.0)), 0.1)
        err = np.max(np.abs(got.numpy().astype(np.float32) - want.astype(np.float32)),
                     initial=0.0)
        assert err <= 3e-2 * scale, (name, err, scale)
    else:
        np.testing.assert_array_equal(got.numpy(), want, name)


def _upstream(cell, inputs, dtype, seed=1):
    """Output gradients, rounded to `dtype` so that the 16-bit run and its float32 twin get the
    same values."""
    rng = np.random.default_rng(seed)
    x, h0 = inputs["x"], inputs["h0"]
    shapes = [(x.shape[0], x.shape[1], h0.shape[1]), h0.shape] + ([h0.shape] if cell.has_c else [])
    return [tf.cast(tf.cast(rng.standard_normal(s), dtype), tf.float32) for s in shapes]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=HALF_IDS)
@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("variant", ["plain", "masked_backwards_time_major", "dropout"])
def test_16bit_is_the_float32_pass_rounded(cell, dtype, variant):
    time_major = variant == "masked_backwards_time_major"
    B, T, I, H = 3, 6, 5, 7
    inputs = _split(cell, make_inputs(cell, B, T, I, H, tf.float32, seed=3,
                                      time_major=time_major), dtype)
    widened = {k: None if v is None else tf.cast(v, tf.float32) for k, v in inputs.items()}
    kwargs = dict(time_major=time_major)
    rng = np.random.default_rng(5)
    if variant == "masked_backwards_time_major":
        kwargs["mask"] = tf.constant(rng.random((T, B)) < 0.7)
        kwargs["go_backwards"] = True
    if variant == "dropout":
        kwargs["input_dropout_mask"] = tf.constant(
            (rng.random((cell.gates, B, I)) < 0.8) / 0.8, tf.float32)
        kwargs["recurrent_dropout_mask"] = tf.constant(
            (rng.random((cell.gates, B, H)) < 0.8) / 0.8, tf.float32)
    upstream = _upstream(cell, inputs, dtype)
    out16, g16 = _run(cell.op, inputs, upstream, **kwargs)
    out32, g32 = _run(cell.op, widened, upstream, **kwargs)
    for o16, o32 in zip(out16, out32):
        assert o16.dtype == dtype
        _assert_same_pass(o16, o32, dtype, "output")
    # (the module docstring's exception)
    dw_h_apart = variant == "plain"
    for name, g in g16.items():
        assert g.dtype == (dtype if name in STATE_NAMES else tf.float32), name
        _assert_same_pass(g, g32[name], dtype, name,
                          summed_apart=dw_h_apart and name == "recurrent_kernel")


def _relative_error(got, want):
    """Largest error relative to the reference's largest magnitude (check.relative_error)."""
    got, want = np.asarray(tf.cast(got, tf.float64)), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


# Keras' layer for each cell, and its reference (tfcells.reference, float64).
_KERAS = {
    "lstm": (keras.layers.LSTM, tfcells.LSTM, ref.lstm),
    "gru": (keras.layers.GRU, tfcells.GRU, ref.gru),
    "simple_rnn": (keras.layers.SimpleRNN, tfcells.SimpleRNN, ref.simple_rnn),
}


def _layer_errors(layer_cls, kind, policy, x, weights, dy, expected):
    """A layer built under `policy` with `weights`: its output's and gradients' errors
    against the float64 reference."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = layer_cls(weights[1].shape[0], return_sequences=True)
        layer.build(x.shape)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            xs = tf.constant(x)
            tape.watch(xs)
            y = layer(xs)
        variables = [layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias]
        grads = tape.gradient(y, [xs] + [v.value for v in variables],
                              output_gradients=tf.cast(dy, y.dtype))
    finally:
        keras.config.set_dtype_policy(previous)
    got = {"y": y, "dx": grads[0], "dkernel": grads[1], "drecurrent_kernel": grads[2],
           "dbias": grads[3]}
    return {k: _relative_error(got[k], expected[k]) for k in expected}


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("kind", list(_KERAS))
def test_accuracy_against_float64_and_keras(kind, policy):
    """T=20: every output and gradient within 3e-2 of float64 fed the same rounded inputs, and
    no farther from it than Keras' own layer under the same policy."""
    keras_cls, ours_cls, ref_fn = _KERAS[kind]
    half = tf.bfloat16 if policy == "mixed_bfloat16" else tf.float16
    rng = np.random.default_rng(11)
    B, T, I, H = 8, 20, 16, 16
    G = {"lstm": 4, "gru": 3, "simple_rnn": 1}[kind]
    x = tf.cast(tf.cast(rng.standard_normal((B, T, I)), half), tf.float32).numpy()
    dy = tf.cast(tf.cast(rng.standard_normal((B, T, H)), half), tf.float32).numpy()
    kernel = (rng.standard_normal((I, G * H)) / np.sqrt(I)).astype(np.float32)
    recurrent = (rng.standard_normal((H, G * H)) / np.sqrt(H)).astype(np.float32)
    bias = (rng.standard_normal((2, G * H) if kind == "gru" else (G * H,)) * 0.3).astype(
        np.float32)
    weights = [kernel, recurrent, bias]
    # The reference: float64 from the same (rounded) x and the float32 weights.
    w64 = [tf.constant(w, tf.float64) for w in weights]
    x64 = tf.constant(x, tf.float64)
    h0 = tf.zeros((B, H), tf.float64)
    states = [h0, h0] if kind == "lstm" else [h0]
    with tf.GradientTape() as tape:
        tape.watch([x64] + w64)
        y64 = ref_fn(x64, *states, *w64)[0]
    grads = tape.gradient(y64, [x64] + w64, output_gradients=tf.constant(dy, tf.float64))
    expected = {"y": y64, "dx": grads[0], "dkernel": grads[1], "drecurrent_kernel": grads[2],
                "dbias": grads[3]}
    with CountWork() as work:
        ours = _layer_errors(ours_cls, kind, policy, x, weights, dy, expected)
    assert work.delta["forward_calls"] >= 1, "the fused op did not run"
    theirs = _layer_errors(keras_cls, kind, policy, x, weights, dy, expected)
    print(f"\n{kind} {policy}: relative error vs float64, tfcells / keras: " + ", ".join(
        f"{k} {ours[k]:.1e} / {theirs[k]:.1e}" for k in expected))
    for name in expected:
        assert ours[name] <= 3e-2, (name, ours[name])
        assert ours[name] <= theirs[name], (name, ours[name], theirs[name])


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("cls", [tfcells.LSTM, tfcells.GRU, tfcells.SimpleRNN],
                         ids=["lstm", "gru", "simple_rnn"])
def test_layer_under_mixed_policy(cls, policy):
    """The fused op runs in the policy's compute dtype; variables stay float32; the outputs
    and states come in the compute dtype, as Keras gives them."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        layer = cls(6, return_sequences=True, return_state=True)
        x = np.random.default_rng(0).standard_normal((4, 7, 5)).astype(np.float32)
        with CountWork() as work:
            out = layer(x)
    finally:
        keras.config.set_dtype_policy(previous)
    compute = layer.compute_dtype
    assert compute in ("bfloat16", "float16")
    assert all(o.dtype == compute for o in out)
    assert all(w.dtype == "float32" for w in layer.weights)
    assert work.delta["forward_calls"] == 1


def _frozen_counts(cell, dtype, frozen):
    inputs = _split(cell, make_inputs(cell, 2, 4, 3, 5, tf.float32), dtype)
    with CountWork() as work:
        _, grads = _run(cell.op, inputs, _upstream(cell, inputs, dtype), frozen=frozen)
    return work.delta, grads


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=HALF_IDS)
def test_frozen_weights_skip_their_work_in_16bit(dtype):
    cell = CELLS[0]
    delta, grads = _frozen_counts(cell, dtype, ("kernel", "x"))
    assert grads["kernel"] is None and grads["x"] is None
    assert grads["recurrent_kernel"] is not None and grads["bias"] is not None
    assert delta["grad_kernel"] == 0 and delta["grad_x"] == 0
    assert delta["grad_recurrent_kernel"] == 1 and delta["grad_bias"] == 1
    delta, grads = _frozen_counts(cell, dtype, ("kernel", "recurrent_kernel", "bias"))
    assert delta["grad_kernel"] == delta["grad_recurrent_kernel"] == delta["grad_bias"] == 0
    assert delta["grad_x"] == 1


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=HALF_IDS)
def test_16bit_weights_are_accepted_and_their_gradients_come_in_16bit(dtype):
    cell = CELLS[0]
    inputs = {k: None if v is None else tf.cast(v, dtype)
              for k, v in make_inputs(cell, 2, 4, 3, 5, tf.float32).items()}
    out, grads = _run(cell.op, inputs, _upstream(cell, inputs, dtype))
    assert all(o.dtype == dtype for o in out)
    assert all(g.dtype == dtype for g in grads.values())
    widened = {k: tf.cast(v, tf.float32) for k, v in inputs.items()}
    _, g32 = _run(cell.op, widened, _upstream(cell, inputs, dtype))
    _assert_same_pass(grads["kernel"], g32["kernel"], dtype, "kernel")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=HALF_IDS)
def test_empty_sequences_and_batches_in_16bit(dtype):
    cell = CELLS[0]
    for B, T in ((2, 0), (0, 3)):
        inputs = _split(cell, make_inputs(cell, B, T, 3, 4, tf.float32), dtype)
        out, grads = _run(cell.op, inputs, _upstream(cell, inputs, dtype))
        assert out[0].shape == (B, T, 4) and out[0].dtype == dtype
        np.testing.assert_array_equal(out[1].numpy(), inputs["h0"].numpy())
        np.testing.assert_array_equal(out[2].numpy(), inputs["c0"].numpy())
        assert grads["x"].shape == (B, T, 3) and grads["x"].dtype == dtype


def test_nan_input_propagates_in_16bit():
    cell = CELLS[0]
    inputs = _split(cell, make_inputs(cell, 2, 3, 3, 4, tf.float32), tf.bfloat16)
    x = inputs["x"].numpy()
    x[0, 1, 0] = np.nan
    inputs["x"] = tf.constant(x)
    y = cell.op(**inputs)[0].numpy().astype(np.float32)
    assert np.isnan(y[0, 1:]).all() and np.isfinite(y[1]).all() and np.isfinite(y[0, 0]).all()


@pytest.mark.parametrize("dtypes, message", [
    ((tf.float64, tf.float32, tf.float64), "kernel has dtype float32, but must be float64"),
    ((tf.bfloat16, tf.float64, tf.bfloat16), "must be float32 or bfloat16"),
    ((tf.bfloat16, tf.float32, tf.float32), "h0 has dtype float32, but must be bfloat16"),
    ((tf.float16, tf.bfloat16, tf.float16), "must be float32 or float16"),
])
def test_mismatched_dtypes_are_refused(dtypes, message):
    x_dtype, w_dtype, h_dtype = dtypes
    cell = CELLS[0]
    inputs = make_inputs(cell, 2, 3, 3, 4, tf.float32)
    args = {k: tf.cast(v, x_dtype if k in ("x", "c0") else h_dtype if k == "h0" else w_dtype)
            for k, v in inputs.items()}
    with pytest.raises(TypeError, match=message):
        cell.op(**args)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=HALF_IDS)
def test_second_order_in_16bit_matches_float32(dtype):
    """A gradient penalty through the 16-bit op (its gradient op's gradient) matches the same
    penalty through the float32 op on the widened inputs."""
    cell = CELLS[0]
    inputs = _split(cell, make_inputs(cell, 2, 4, 3, 5, tf.float32), dtype)
    widened = {k: tf.cast(v, tf.float32) for k, v in inputs.items()}

    def penalty(values):
        kernel = tf.Variable(values["kernel"])
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(values["x"])
                y = cell.op(**{**values, "kernel": kernel})[0]
                loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
            dx = inner.gradient(loss, values["x"])
            p = tf.reduce_sum(tf.cast(dx, tf.float32) ** 2)
        return outer.gradient(p, kernel)

    got, want = penalty(inputs).numpy(), penalty(widened).numpy()
    assert got.dtype == np.float32
    assert _relative_error(got, want) <= 3e-2


def _fit_loss(layer_cls, seed_weights, data, policy, epochs=4):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((12, 8)), layer_cls(16),
                                  keras.layers.Dense(1, dtype="float32")])
        model.set_weights(seed_weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        history = model.fit(*data, epochs=epochs, batch_size=32, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy(previous)
    return history.history["loss"]


def test_mixed_bfloat16_fit_reaches_keras_loss():
    """model.fit under mixed_bfloat16 from the same weights on the same batches: tfcells'
    loss curve follows Keras' own mixed_bfloat16 one within the spread Keras itself shows
    between its float32 and mixed_bfloat16 runs (at least 5 %), and both learn."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 12, 8)).astype(np.float32)
    y = np.tanh(x[:, :, :2].sum(axis=(1, 2)))[:, None].astype(np.float32)
    probe = keras.Sequential([keras.Input((12, 8)), keras.layers.LSTM(16),
                              keras.layers.Dense(1)])
    weights = probe.get_weights()
    keras_bf16 = _fit_loss(keras.layers.LSTM, weights, (x, y), "mixed_bfloat16")
    keras_f32 = _fit_loss(keras.layers.LSTM, weights, (x, y), "float32")
    ours = _fit_loss(tfcells.LSTM, weights, (x, y), "mixed_bfloat16")
    spread = max(abs(keras_bf16[-1] - keras_f32[-1]), 0.05 * keras_bf16[-1])
    print(f"\nfinal loss: keras float32 {keras_f32[-1]:.4f}, keras mixed_bfloat16 "
          f"{keras_bf16[-1]:.4f}, tfcells mixed_bfloat16 {ours[-1]:.4f}")
    assert ours[-1] < 0.7 * ours[0] and keras_bf16[-1] < 0.7 * keras_bf16[0]
    assert abs(ours[-1] - keras_bf16[-1]) <= spread
