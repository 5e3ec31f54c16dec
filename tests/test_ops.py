"""The fused ops against plain-TF references (float64, tf.GradientTape) and finite differences.

Every value and gradient is checked; gradients that must be skipped are checked to be None
*and* never computed (kernel work counters), not just absent.
"""

import contextlib
import functools
import glob
import itertools
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfcells
from tfcells import reference as ref
from tfcells.testing import CountWork


class Cell:
    def __init__(self, name, op, ref_fn, gates, has_c, bias_shape):
        self.name, self.op, self.ref, self.gates = name, op, ref_fn, gates
        self.has_c, self.bias_shape = has_c, bias_shape

    @property
    def grad_inputs(self):
        return ["x", "h0"] + (["c0"] if self.has_c else []) + [
            "kernel", "recurrent_kernel", "bias"]

    @property
    def n_outputs(self):
        return 3 if self.has_c else 2

    def __repr__(self):
        return self.name


CELLS = [
    Cell("lstm", tfcells.ops.lstm, ref.lstm, 4, True, lambda h: [4 * h]),
    Cell("gru", functools.partial(tfcells.ops.gru, reset_after=True),
         functools.partial(ref.gru, reset_after=True), 3, False, lambda h: [2, 3 * h]),
    Cell("gru_reset_before", functools.partial(tfcells.ops.gru, reset_after=False),
         functools.partial(ref.gru, reset_after=False), 3, False, lambda h: [3 * h]),
    Cell("simple_rnn", tfcells.ops.simple_rnn, ref.simple_rnn, 1, False, lambda h: [h]),
]
CELL_IDS = [c.name for c in CELLS]


def make_inputs(cell, B, T, I, H, dtype, seed=0, time_major=False, bias=True):
    rng = np.random.default_rng(seed)
    x_shape = (T, B, I) if time_major else (B, T, I)
    values = {
        "x": rng.standard_normal(x_shape),
        "h0": rng.standard_normal((B, H)) * 0.5,
        "kernel": rng.standard_normal((I, cell.gates * H)) / np.sqrt(max(I, 1)),
        "recurrent_kernel": rng.standard_normal((H, cell.gates * H)) / np.sqrt(H),
    }
    if cell.has_c:
        values["c0"] = rng.standard_normal((B, H)) * 0.5
    values["bias"] = rng.standard_normal(cell.bias_shape(H)) * 0.3 if bias else None
    return {k: None if v is None else tf.constant(v, dtype) for k, v in values.items()}


def make_mask(kind, B, T, time_major, seed=0):
    if kind is None:
        return None
    rng = np.random.default_rng(seed + 1)
    if kind == "random":
        m = rng.random((B, T)) > 0.35
    elif kind == "non_contiguous":  # holes in the middle of sequences
        m = np.ones((B, T), bool)
        m[:, 1::3] = False
    elif kind == "all_masked_row":
        m = rng.random((B, T)) > 0.35
        m[0, :] = False
    elif kind == "left_padded":
        lengths = rng.integers(0, T + 1, size=B)
        m = np.arange(T)[None, :] >= (T - lengths)[:, None]
    else:
        raise ValueError(kind)
    return tf.constant(m.T if time_major else m)


def loss_weights(cell, inputs, time_major, seed=7):
    """Fixed random weights so that every output carries a distinct gradient."""
    rng = np.random.default_rng(seed)
    x = inputs["x"]
    B, T = (x.shape[1], x.shape[0]) if time_major else (x.shape[0], x.shape[1])
    H = inputs["h0"].shape[1]
    y_shape = (T, B, H) if time_major else (B, T, H)
    shapes = [y_shape, (B, H)] + ([(B, H)] if cell.has_c else [])
    return [tf.constant(rng.standard_normal(s), x.dtype) for s in shapes]


def run_with_grads(fn, inputs, watched, weights, **kwargs):
    """Outputs of fn and the tape gradients of a weighted sum of them w.r.t. `watched`."""
    with tf.GradientTape() as tape:
        for name in watched:
            tape.watch(inputs[name])
        outputs = fn(**inputs, **kwargs)
        # A None weight leaves that output out of the loss: no gradient reaches it.
        loss = tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outputs, weights)
                         if w is not None])
    grads = tape.gradient(loss, [inputs[n] for n in watched])
    return outputs, dict(zip(watched, grads))


def cast_inputs(inputs, dtype):
    return {k: None if v is None else tf.cast(v, dtype) for k, v in inputs.items()}


def assert_close(actual, expected, dtype, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if dtype == tf.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12, err_msg=what)
    else:
        # A float32 sum's rounding error scales with its terms, not with its result: a weight
        # gradient element that cancels to near zero over a thousand rows keeps the error of
        # the others' magnitude (seen: 2.3e-5 off at -0.0098, beside elements of 48).
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-5 * scale, err_msg=what)


def check_against_reference(cell, inputs, mask, time_major, go_backwards, dtype,
                            watched=None, frozen=(), dropout=None, unused_outputs=()):
    """Runs the op in `dtype` and the reference in float64; compares values and gradients.

    dropout: optional dict of input_dropout_mask / recurrent_dropout_mask for both.
    unused_outputs: indices of outputs (0: the sequence) the loss leaves out."""
    watched = watched if watched is not None else [
        n for n in cell.grad_inputs if inputs.get(n) is not None]
    inputs64 = cast_inputs(inputs, tf.float64)
    weights64 = [None if i in unused_outputs else w
                 for i, w in enumerate(loss_weights(cell, inputs64, time_major))]
    dropout = dropout or {}
    ref_out, ref_grads = run_with_grads(cell.ref, inputs64, watched, weights64, mask=mask,
                                        time_major=time_major, go_backwards=go_backwards,
                                        **cast_inputs(dropout, tf.float64))
    ours_in = cast_inputs(inputs, dtype)
    weights = [None if w is None else tf.cast(w, dtype) for w in weights64]
    with CountWork() as work:
        out, grads = run_with_grads(cell.op, ours_in, watched, weights, mask=mask,
                                    time_major=time_major, go_backwards=go_backwards,
                                    frozen=frozen, **cast_inputs(dropout, dtype))
    for name, o, r in zip(["outputs", "h_last", "c_last"], out, ref_out):
        assert o.dtype == dtype
        assert_close(o, r, dtype, f"{cell} {name}")
    for name in watched:
        if name in frozen:
            assert grads[name] is None, f"{cell}: frozen {name} got a gradient"
        else:
            assert grads[name] is not None, f"{cell}: no gradient for {name}"
            expected = ref_grads[name]
            if expected is None:  # the reference output does not depend on it (T or B is 0)
                expected = np.zeros(grads[name].shape)
            assert_close(grads[name], expected, dtype, f"{cell} d{name}")
    return work.delta


SHAPES = [(1, 1, 1, 1), (2, 3, 4, 5), (3, 7, 5, 3), (4, 5, 9, 13)]  # B, T, I, H
LAYOUTS = [(False, False), (True, False), (False, True), (True, True)]  # time_major, go_backwards


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}I{}H{}".format(*s))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["batch_major", "time_major", "backwards",
                                                 "time_major_backwards"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_values_and_gradients_float64(cell, shape, layout, masked):
    B, T, I, H = shape
    time_major, go_backwards = layout
    inputs = make_inputs(cell, B, T, I, H, tf.float64, time_major=time_major)
    mask = make_mask("random" if masked else None, B, T, time_major)
    check_against_reference(cell, inputs, mask, time_major, go_backwards, tf.float64)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("shape", [(3, 7, 5, 3), (8, 20, 16, 24)],
                         ids=lambda s: "B{}T{}I{}H{}".format(*s))
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=["batch_major", "time_major", "backwards"])
def test_values_and_gradients_float32(cell, shape, layout):
    B, T, I, H = shape
    time_major, go_backwards = layout
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=3, time_major=time_major)
    mask = make_mask("random", B, T, time_major, seed=3)
    check_against_reference(cell, inputs, mask, time_major, go_backwards, tf.float32)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=["batch_major", "time_major", "backwards"])
def test_products_of_several_steps_at_once(cell, layout):
    """The CPU runs the products by W_x of several steps back to back (x_t·W_x ahead of the
    recurrence, dx_t behind it: csrc/core/cpu/cpu_rnn.h's kCpuProjectionSteps) where W_x and W_h
    outgrow half of a core's L2: here 4-16 MiB in float64, more than any L2 of today's x86 cores.
    T = 19 ends in a partial group. With dx alone the gate gradients rotate through a few slots;
    inference keeps the projections in slots of its own."""
    B, T, I, H = 3, 19, 512, 512
    time_major, go_backwards = layout
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=7, time_major=time_major)
    mask = make_mask("random", B, T, time_major, seed=7)
    check_against_reference(cell, inputs, mask, time_major, go_backwards, tf.float64)
    weights = [n for n in cell.grad_inputs if n != "x"]
    check_against_reference(cell, inputs, mask, time_major, go_backwards, tf.float64,
                            watched=cell.grad_inputs, frozen=weights)
    args = {k: v for k, v in inputs.items() if v is not None}
    trained = cell.op(**args, mask=mask, time_major=time_major, go_backwards=go_backwards,
                      training=True)
    inferred = cell.op(**args, mask=mask, time_major=time_major, go_backwards=go_backwards,
                       training=False)
    for a, b in zip(inferred, trained):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("kind", ["non_contiguous", "all_masked_row", "left_padded"])
@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
def test_mask_kinds(cell, kind, time_major):
    B, T, I, H = 4, 6, 3, 5
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=11, time_major=time_major)
    mask = make_mask(kind, B, T, time_major, seed=11)
    check_against_reference(cell, inputs, mask, time_major, False, tf.float64)
    check_against_reference(cell, inputs, mask, time_major, True, tf.float64)


def test_all_masked_row_keeps_initial_state():
    cell = CELLS[0]
    inputs = make_inputs(cell, 3, 4, 2, 5, tf.float64)
    mask = make_mask("all_masked_row", 3, 4, False)
    y, h, c = tfcells.ops.lstm(**inputs, mask=mask)
    np.testing.assert_array_equal(h[0], inputs["h0"][0])
    np.testing.assert_array_equal(c[0], inputs["c0"][0])
    np.testing.assert_array_equal(y[0], np.repeat(inputs["h0"][0][None], 4, axis=0))


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_without_bias(cell):
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64, bias=False)
    check_against_reference(cell, inputs, make_mask("random", 3, 4, False), False, False,
                            tf.float64)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=["float64", "float32"])
def test_gradient_through_final_state_only(cell, bias, dtype):
    """The loss reads only the final state(s), as after return_sequences=False: no dy reaches
    the gradient op, whose driver reads the absent dy (and an absent bias) as zeros."""
    B, T, I, H = 5, 6, 4, 9
    inputs = make_inputs(cell, B, T, I, H, dtype, bias=bias)
    check_against_reference(cell, inputs, make_mask("random", B, T, False), False, False,
                            dtype, unused_outputs=(0,))


def _subsets(names):
    return [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


FROZEN_CASES = [(cell, subset) for cell in CELLS for subset in _subsets(cell.grad_inputs)]

# What each gradient's work counter is called; h0 is counted, c0 rides along with it.
COUNTER_OF = {"x": "grad_x", "h0": "grad_h0", "kernel": "grad_kernel",
              "recurrent_kernel": "grad_recurrent_kernel", "bias": "grad_bias"}


def _expected_work(cell, needed):
    return {counter: int(name in needed) for name, counter in COUNTER_OF.items()}


@pytest.mark.parametrize("how", ["frozen_arg", "unwatched"])
@pytest.mark.parametrize("cell,skipped", FROZEN_CASES,
                         ids=[f"{c.name}-{'+'.join(s) or 'none'}" for c, s in FROZEN_CASES])
def test_every_frozen_combination(cell, skipped, how):
    """Each skipped gradient is None and never computed; each requested one is exact."""
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64, seed=5)
    mask = make_mask("random", 3, 4, False, seed=5)
    needed = [n for n in cell.grad_inputs if n not in skipped]
    if how == "frozen_arg":  # the caller says so; the tape watches everything
        work = check_against_reference(cell, inputs, mask, False, False, tf.float64,
                                       watched=cell.grad_inputs, frozen=skipped)
    else:  # the tape knows: skipped inputs are not watched (skip_input_indices)
        work = check_against_reference(cell, inputs, mask, False, False, tf.float64,
                                       watched=needed)
    expected = _expected_work(cell, needed)
    if not needed:
        # Nothing needs a gradient: the op is not even recorded on the tape.
        assert work["backward_calls"] == 0
    else:
        assert work["backward_calls"] == 1
        if "h0" not in needed and "c0" in needed:
            expected["grad_h0"] = 0
        got = {k: work[k] for k in expected}
        assert got == expected, f"work done {got}, expected {expected}"


def test_frozen_rejects_unknown_names():
    cell = CELLS[3]
    inputs = make_inputs(cell, 2, 3, 4, 5, tf.float32)
    with pytest.raises(ValueError, match="frozen names unknown inputs.*'kernal'"):
        tfcells.ops.simple_rnn(**inputs, frozen=("kernal",))
    with pytest.raises(ValueError, match=r"frozen names unknown inputs \['c0'\]"):
        tfcells.ops.simple_rnn(**inputs, frozen=("c0",))  # only the LSTM has c0


def test_variables_trainable_and_not():
    """A non-trainable tf.Variable is skipped by the tape; a trainable one is differentiated."""
    cell = CELLS[0]
    inputs = make_inputs(cell, 2, 3, 4, 5, tf.float32)
    kernel = tf.Variable(inputs["kernel"], trainable=False)
    recurrent = tf.Variable(inputs["recurrent_kernel"])
    with CountWork() as work:
        with tf.GradientTape() as tape:
            y, _, _ = tfcells.ops.lstm(inputs["x"], inputs["h0"], inputs["c0"], kernel,
                                       recurrent, inputs["bias"])
            loss = tf.reduce_sum(y)
        gk, gr = tape.gradient(loss, [kernel, recurrent])
    assert gk is None and gr is not None
    assert work.delta["grad_kernel"] == 0 and work.delta["grad_recurrent_kernel"] == 1
    assert work.delta["grad_x"] == 0 and work.delta["grad_bias"] == 0


def _graph_gradients(cell, inputs, mask, frozen=()):
    """tf.gradients in a TF1-style graph (no skip_input_indices there)."""
    names = [n for n in cell.grad_inputs if inputs.get(n) is not None]
    weights = [w.numpy() for w in loss_weights(cell, inputs, False)]
    with tf.Graph().as_default() as g:
        placeholders = {n: tf.constant(inputs[n].numpy()) for n in names}
        mask_t = None if mask is None else tf.constant(mask.numpy())
        outs = cell.op(**placeholders, mask=mask_t, frozen=frozen)
        loss = tf.add_n([tf.reduce_sum(o * tf.constant(w))
                         for o, w in zip(outs, weights)])
        grads = tf.gradients(loss, [placeholders[n] for n in names])
        fetch = [g_ for g_ in grads if g_ is not None]
        with tf.compat.v1.Session(graph=g) as sess:
            values = iter(sess.run(fetch))
    return {n: (next(values) if g_ is not None else None) for n, g_ in zip(names, grads)}


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_graph_mode_tf_gradients(cell):
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64)
    mask = make_mask("random", 3, 4, False)
    weights = loss_weights(cell, inputs, False)
    _, expected = run_with_grads(cell.ref, inputs, cell.grad_inputs, weights, mask=mask)
    got = _graph_gradients(cell, inputs, mask)
    for name in cell.grad_inputs:
        assert_close(got[name], expected[name], tf.float64, f"graph d{name}")
    frozen = ("kernel", "x")
    got = _graph_gradients(cell, inputs, mask, frozen=frozen)
    for name in cell.grad_inputs:
        if name in frozen:
            assert got[name] is None
        else:
            assert_close(got[name], expected[name], tf.float64, f"graph frozen d{name}")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_tf_function_tape_and_tf_gradients(cell):
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64)
    mask = make_mask("random", 3, 4, False)
    weights = loss_weights(cell, inputs, False)
    names = cell.grad_inputs
    _, expected = run_with_grads(cell.ref, inputs, names, weights, mask=mask)

    @tf.function
    def with_tape(values):
        return run_with_grads(cell.op, values, names, weights, mask=mask)[1]

    @tf.function
    def with_tf_gradients(values):  # no tape inside: the forward keeps no cache
        outs = cell.op(**values, mask=mask)
        loss = tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outs, weights)])
        return dict(zip(names, tf.gradients(loss, [values[n] for n in names])))

    for fn in (with_tape, with_tf_gradients):
        got = fn(inputs)
        for name in names:
            assert_close(got[name], expected[name], tf.float64, f"{fn.__name__} d{name}")


def _forward_op(concrete_function):
    ops = [op for op in concrete_function.graph.get_operations()
           if op.type.startswith("Tfcells") and not op.type.endswith("Grad")]
    assert len(ops) == 1
    return ops[0]


def test_inference_keeps_no_training_cache():
    """Without a tape (Keras predict) the forward op is built with training=False."""
    cell = CELLS[0]
    inputs = make_inputs(cell, 2, 3, 4, 5, tf.float32)
    inference = tf.function(lambda v: cell.op(**v)).get_concrete_function(inputs)
    assert _forward_op(inference).get_attr("training") is False

    def train_step(v):
        with tf.GradientTape() as tape:
            tape.watch(v["kernel"])
            loss = tf.reduce_sum(cell.op(**v)[0])
        return tape.gradient(loss, v["kernel"])

    training = tf.function(train_step).get_concrete_function(inputs)
    assert _forward_op(training).get_attr("training") is True
    y, h, c = cell.op(**inputs, training=False)
    assert y.shape == (2, 3, 5)


def test_training_false_under_tape_recomputes_cache():
    cell = CELLS[1]
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64)
    weights = loss_weights(cell, inputs, False)
    names = cell.grad_inputs
    _, expected = run_with_grads(cell.ref, inputs, names, weights)
    _, got = run_with_grads(cell.op, inputs, names, weights, training=False)
    for name in names:
        assert_close(got[name], expected[name], tf.float64, f"d{name}")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_finite_differences(cell):
    B, T, I, H = 2, 3, 3, 4
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=21)
    mask = make_mask("non_contiguous", B, T, False)
    names = cell.grad_inputs
    weights = loss_weights(cell, inputs, False)

    def loss(*values):
        outs = cell.op(**dict(zip(names, values)), mask=mask)
        return tf.add_n([tf.reduce_sum(o * w) for o, w in zip(outs, weights)])

    theoretical, numerical = tf.test.compute_gradient(loss, [inputs[n] for n in names],
                                                        delta=1e-6)
    for name, t, n in zip(names, theoretical, numerical):
        np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_empty_sequence_returns_initial_state(cell):
    inputs = make_inputs(cell, 3, 0, 4, 5, tf.float64)
    names = cell.grad_inputs
    weights = loss_weights(cell, inputs, False)
    out, grads = run_with_grads(cell.op, inputs, names, weights)
    assert out[0].shape == (3, 0, 5)
    np.testing.assert_array_equal(out[1], inputs["h0"])
    if cell.has_c:
        np.testing.assert_array_equal(out[2], inputs["c0"])
        np.testing.assert_array_equal(grads["c0"], weights[2])
    np.testing.assert_array_equal(grads["h0"], weights[1])
    for name in ("x", "kernel", "recurrent_kernel", "bias"):
        assert not np.any(grads[name]), name


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_zero_batch(cell):
    inputs = make_inputs(cell, 0, 4, 3, 5, tf.float32)
    names = cell.grad_inputs
    weights = loss_weights(cell, inputs, False)
    out, grads = run_with_grads(cell.op, inputs, names, weights)
    assert out[0].shape == (0, 4, 5) and out[1].shape == (0, 5)
    assert grads["kernel"].shape == (3, cell.gates * 5)
    assert not np.any(grads["kernel"]) and not np.any(grads["recurrent_kernel"])


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_nan_propagates_like_reference(cell):
    inputs = make_inputs(cell, 3, 4, 2, 3, tf.float32)
    x = inputs["x"].numpy()
    x[1, 2, 0] = np.nan
    inputs["x"] = tf.constant(x)
    out = cell.op(**inputs)[0].numpy()
    expected = cell.ref(**cast_inputs(inputs, tf.float64))[0].numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    assert np.isnan(out[1, 2:]).all() and np.isfinite(out[[0, 2]]).all()


def test_core_module_matches_op():
    """The pybind11 module (no TensorFlow) runs the same kernels as the op."""
    from tfcells import _tfcells_core as core
    cell = CELLS[0]
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float32)
    mask = make_mask("random", 3, 4, False)
    n = {k: v.numpy() for k, v in inputs.items()}
    fwd = core.forward("lstm", n["x"], n["h0"], n["c0"], n["kernel"], n["recurrent_kernel"],
                       n["bias"], mask.numpy())
    y, h, c = tfcells.ops.lstm(**inputs, mask=mask)
    np.testing.assert_array_equal(fwd["y"], y)
    np.testing.assert_array_equal(fwd["c_last"], c)
    dy = np.ones_like(fwd["y"])
    bwd = core.backward("lstm", n["x"], n["h0"], n["c0"], n["kernel"], n["recurrent_kernel"],
                        n["bias"], mask.numpy(), False, False, fwd["gates"], fwd["aux"],
                        fwd["h_prev"], dy, None, None, core.GRAD_KERNEL | core.GRAD_X,
                        y=fwd["y"])
    assert sorted(bwd) == ["dkernel", "dx"]
    # dW_h reads each step's h_prev from y (the forward keeps no copy): without y, refused.
    assert fwd["h_prev"].size == 0
    for y_arg in ({}, {"y": fwd["y"][:, :-1]}):
        with pytest.raises(ValueError, match="y must be the forward op's output sequence"):
            core.backward("lstm", n["x"], n["h0"], n["c0"], n["kernel"],
                          n["recurrent_kernel"], n["bias"], mask.numpy(), False, False,
                          fwd["gates"], fwd["aux"], fwd["h_prev"], dy, None, None,
                          core.GRAD_RECURRENT_KERNEL, **y_arg)
    with tf.GradientTape() as tape:
        tape.watch([inputs["kernel"], inputs["x"]])
        loss = tf.reduce_sum(tfcells.ops.lstm(**inputs, mask=mask)[0])
    dk, dx = tape.gradient(loss, [inputs["kernel"], inputs["x"]])
    np.testing.assert_allclose(bwd["dkernel"], dk, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bwd["dx"], dx, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="kernel must have shape"):
        core.forward("lstm", n["x"], n["h0"], n["c0"], n["kernel"][:-1],
                     n["recurrent_kernel"], n["bias"], None)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("kind", ["input", "recurrent", "both"])
def test_core_module_with_dropout_matches_op(cell, kind):
    """The pybind11 module's dropout masks reach the kernels as the op's do: same outputs, same
    gradients of every input (tests/test_cuda.py holds the CUDA module to this module)."""
    from tfcells import _tfcells_core as core
    B, T, I, H = 3, 4, 5, 6
    inputs = make_inputs(cell, B, T, I, H, tf.float32, seed=25)
    mask = make_mask("random", B, T, False, seed=25)
    dropout = cast_inputs(make_dropout(cell, B, I, H, kind, seed=25), tf.float32)
    n = {k: None if v is None else v.numpy() for k, v in inputs.items()}
    masks = {name[:-len("_mask")]: v.numpy() for name, v in dropout.items()}
    args = (cell.name, n["x"], n["h0"], n.get("c0"), n["kernel"], n["recurrent_kernel"],
            n["bias"], mask.numpy())
    fwd = core.forward(*args, **masks)
    weights = loss_weights(cell, inputs, False)
    out, grads = run_with_grads(cell.op, inputs, cell.grad_inputs, weights, mask=mask, **dropout)
    for name, o in zip(["y", "h_last", "c_last"], out):
        np.testing.assert_array_equal(fwd[name], o, err_msg=f"{cell} {kind} {name}")
    bwd = core.backward(*args, False, False, fwd["gates"], fwd["aux"], fwd["h_prev"],
                        *(w.numpy() for w in weights), *([None] * (3 - len(weights))),
                        core.GRAD_ALL, y=fwd["y"], **masks)
    for name in cell.grad_inputs:
        np.testing.assert_allclose(bwd["d" + name], grads[name], rtol=1e-6, atol=1e-6,
                                   err_msg=f"{cell} {kind} d{name}")
    # Mask shapes are checked like the op's: [G, B, I] and [G, B, H].
    bad = {k: v[:, :, :-1] for k, v in masks.items()}
    with pytest.raises(ValueError, match="dropout must have shape"):
        core.forward(*args, **bad)
    with pytest.raises(ValueError, match="dropout must have shape"):
        core.backward(*args, False, False, fwd["gates"], fwd["aux"], fwd["h_prev"], None, None,
                      None, core.GRAD_ALL, **bad)


def test_deterministic_run_to_run():
    cell = CELLS[0]
    inputs = make_inputs(cell, 8, 10, 16, 32, tf.float32)
    weights = loss_weights(cell, inputs, False)
    first = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
    second = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
    for a, b in zip(first[0], second[0]):
        np.testing.assert_array_equal(a, b)
    for name in cell.grad_inputs:
        np.testing.assert_array_equal(first[1][name], second[1][name])


# The CPU kernels parallelise in three ways, chosen by size: a batch large enough to give every
# thread a shard runs batch shards, each on one thread for the whole sequence; a small batch
# with large steps splits each step's GEMM and pointwise loop across threads; and, opted into
# with tfcells.set_cpu_split_units, weights at least twice a core's L2 split each step's units
# across threads, which synchronise at every step (H a multiple of 32; not GRU
# reset_after=False, whose candidate reads every unit). All must give the reference's numbers.
PARALLEL_SHAPES = {"split_units": (8, 3, 8, 1024), "split_steps": (8, 3, 8, 1000),
                   "batch_shards": (40, 5, 6, 24)}


@contextlib.contextmanager
def cpu_path(path):
    """The unit split is opt-in: on for the split_units shape only."""
    tfcells.set_cpu_split_units(path == "split_units")
    try:
        yield
    finally:
        tfcells.set_cpu_split_units(False)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("path", sorted(PARALLEL_SHAPES))
@pytest.mark.parametrize("go_backwards", [False, True], ids=["forwards", "backwards"])
def test_parallel_paths(cell, path, go_backwards):
    B, T, I, H = PARALLEL_SHAPES[path]
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=13)
    mask = make_mask("random", B, T, False, seed=13)
    with cpu_path(path):
        check_against_reference(cell, inputs, mask, False, go_backwards, tf.float64)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_split_units_bit_identical_to_batch_shards(cell):
    """The unit split computes every element by the same chain of multiply-adds: its outputs
    and gradients equal the default path's bit for bit, and the switch reads back."""
    B, T, I, H = PARALLEL_SHAPES["split_units"]
    inputs = make_inputs(cell, B, T, I, H, tf.float32, seed=31)
    weights = loss_weights(cell, inputs, False)
    assert not tfcells.cpu_split_units()
    default = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
    with cpu_path("split_units"):
        assert tfcells.cpu_split_units()
        split = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
    assert not tfcells.cpu_split_units()
    for a, b in zip(default[0], split[0]):
        np.testing.assert_array_equal(a, b)
    for name in cell.grad_inputs:
        np.testing.assert_array_equal(default[1][name], split[1][name])


def _thread_affinities():
    """Each thread of this process: the set of CPUs it may run on, as Linux reports it."""
    out = {}
    for status in glob.glob("/proc/self/task/*/status"):
        try:
            with open(status) as f:
                line = next(l for l in f if l.startswith("Cpus_allowed_list:"))
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        cpus = set()
        for part in line.split(":", 1)[1].strip().split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        out[status] = frozenset(cpus)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is Linux-only")
@pytest.mark.parametrize("path", ["batch_shards", "split_units"])
def test_pinned_shards_leave_every_thread_as_it_was(path):
    """Batch shards and unit-split parts hold CPUs of their own while a loop runs (on by
    default): same results as without, and afterwards every thread of the process, TensorFlow's
    pools included, may run on every CPU it could before; the switch reads back."""
    cell = CELLS[0]
    B, T, I, H = PARALLEL_SHAPES[path]
    inputs = make_inputs(cell, B, T, I, H, tf.float32, seed=37)
    weights = loss_weights(cell, inputs, False)
    # Nothing here pins threads but tfcells: the threads' CPUs together are the process's.
    process_cpus = frozenset().union(*_thread_affinities().values())
    assert tfcells.cpu_pin_shards()
    with cpu_path(path):
        pinned = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
        after = _thread_affinities()
        tfcells.set_cpu_pin_shards(False)
        try:
            assert not tfcells.cpu_pin_shards()
            unpinned = run_with_grads(cell.op, inputs, cell.grad_inputs, weights)
        finally:
            tfcells.set_cpu_pin_shards(True)
    assert all(cpus == process_cpus for cpus in after.values()), after
    for a, b in zip(pinned[0], unpinned[0]):
        np.testing.assert_array_equal(a, b)
    for name in cell.grad_inputs:
        np.testing.assert_array_equal(pinned[1][name], unpinned[1][name])


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_row_copies_same_results(cell):
    """Step products that copy each block of A's rows first ("always"; "auto" does it on a CPU
    with few L1 ways where the rows' stride would share L1 sets) and that never do: both match
    the float64 reference and each other bit for bit, and the work counters say which ran (in
    the batch shards too). Batch-major x [26, 8, 64] has rows 8 * 64 * 4 = 2048 bytes apart,
    and the LSTM's gate gradients (4 * 128 floats) too; 13-row shards take two row blocks."""
    B, T, I, H = 26, 8, 64, 128
    inputs = make_inputs(cell, B, T, I, H, tf.float32, seed=41)
    weights = loss_weights(cell, inputs, False)
    watched = [n for n in cell.grad_inputs if inputs.get(n) is not None]
    assert tfcells.cpu_row_copies() == "auto"
    results = {}
    try:
        for mode in ("always", "never", "auto"):
            tfcells.set_cpu_row_copies(mode)
            assert tfcells.cpu_row_copies() == mode
            work = check_against_reference(cell, inputs, None, False, False, tf.float32)
            # Every step's x_t·W_x, h·W_h, dG·W_hᵀ and dG·W_xᵀ: at least 4T products.
            if mode == "always":
                assert work["row_copy_products"] >= 4 * T, work
            if mode == "never":
                assert work["row_copy_products"] == 0, work
            results[mode] = run_with_grads(cell.op, inputs, watched, weights)
    finally:
        tfcells.set_cpu_row_copies("auto")
    for mode in ("never", "auto"):
        for a, b in zip(results["always"][0], results[mode][0]):
            np.testing.assert_array_equal(a, b)
        for name in watched:
            np.testing.assert_array_equal(results["always"][1][name], results[mode][1][name])
    with pytest.raises(ValueError, match="sometimes"):
        tfcells.set_cpu_row_copies("sometimes")


# ---------------------------------------------------------------------------------- dropout
# Keras' implementation=1 dropout: gate g reads x ⊙ input_mask[g] and h_prev ⊙ recurrent_mask[g]
# at every step. The reference multiplies gate by gate (reference._products).

DROPOUT_KINDS = {"input": ("input_dropout_mask",), "recurrent": ("recurrent_dropout_mask",),
                 "both": ("input_dropout_mask", "recurrent_dropout_mask")}


def make_dropout(cell, B, I, H, kind, rate=0.3, seed=0):
    """Keras-like scaled masks (0 or 1/(1-rate)), a different one per gate."""
    rng = np.random.default_rng(seed + 2)
    widths = {"input_dropout_mask": I, "recurrent_dropout_mask": H}
    return {name: tf.constant((rng.random((cell.gates, B, widths[name])) >= rate) / (1 - rate))
            for name in DROPOUT_KINDS[kind]}


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("kind", sorted(DROPOUT_KINDS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["batch_major", "time_major", "backwards",
                                                 "time_major_backwards"])
def test_dropout_values_and_gradients_float64(cell, kind, layout):
    B, T, I, H = 4, 5, 9, 13
    time_major, go_backwards = layout
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=21, time_major=time_major)
    mask = make_mask("random", B, T, time_major, seed=21)
    check_against_reference(cell, inputs, mask, time_major, go_backwards, tf.float64,
                            dropout=make_dropout(cell, B, I, H, kind, seed=21))


# With more rows (T*B) than the CPU's masked weight-gradient products pack at a time
# (cpu_tuning::kMaskedChunkRows = 128), the last chunk partial, H = 72 a partial panel; with
# up to two threads summed in two parts (cpu_tuning::kMaskedRowParts) of 552 and 1152 rows
# (from four on, the column tasks' packed chunks leave the LSTM's and GRU's 1104 rows no room:
# summed whole).
DROPOUT_PARALLEL_SHAPES = {**PARALLEL_SHAPES, "masked_chunks": (48, 23, 20, 72),
                           "masked_row_parts": (48, 48, 20, 72)}


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("path", sorted(DROPOUT_PARALLEL_SHAPES))
def test_dropout_float32_and_parallel_paths(cell, path):
    B, T, I, H = DROPOUT_PARALLEL_SHAPES[path]
    inputs = make_inputs(cell, B, T, I, H, tf.float64, seed=22)
    dropout = make_dropout(cell, B, I, H, "both", seed=22)
    with cpu_path(path):
        for dtype in (tf.float64, tf.float32):
            check_against_reference(cell, inputs, None, False, True, dtype, dropout=dropout)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("skipped", [("x",), ("kernel",), ("recurrent_kernel",),
                                     ("kernel", "recurrent_kernel", "bias"),
                                     ("x", "kernel", "recurrent_kernel", "bias")],
                         ids=lambda s: "+".join(s))
def test_dropout_with_frozen_inputs(cell, skipped):
    """Freezing still skips work with dropout masks, and what is computed stays exact."""
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float64, seed=23)
    needed = [n for n in cell.grad_inputs if n not in skipped]
    work = check_against_reference(cell, inputs, make_mask("random", 3, 4, False, seed=23),
                                   False, False, tf.float64, watched=cell.grad_inputs,
                                   frozen=skipped,
                                   dropout=make_dropout(cell, 3, 5, 6, "both", seed=23))
    expected = _expected_work(cell, needed)
    got = {k: work[k] for k in expected}
    assert got == expected, f"work done {got}, expected {expected}"


def test_dropout_masks_of_ones_change_nothing():
    cell = CELLS[0]
    inputs = make_inputs(cell, 3, 4, 5, 6, tf.float32, seed=24)
    plain = cell.op(**inputs)
    ones = {"input_dropout_mask": tf.ones([4, 3, 5]), "recurrent_dropout_mask": tf.ones([4, 3, 6])}
    for a, b in zip(plain, cell.op(**inputs, **ones)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_kept_workspaces_across_calls_of_changing_size(cell):
    """The CPU kernels keep their workspace and training cache from one call to the next
    (rnn_kernels.h' WorkspaceCache, OutputCache): one traced function, called with sequences
    and batches that repeat, shrink and grow, so that kept buffers are reused (a workspace
    larger than needed), dropped when they no longer fit, and hold stale contents each time;
    every call matches the float64 reference."""
    H, I = 5, 4
    names = cell.grad_inputs
    spec = {"x": tf.TensorSpec([None, None, I], tf.float32),
            "h0": tf.TensorSpec([None, H], tf.float32)}
    if cell.has_c:
        spec["c0"] = tf.TensorSpec([None, H], tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec(None, tf.float32)])
    def step(states, y_weights):
        inputs = {**states, **weights}
        with tf.GradientTape() as tape:
            tape.watch(list(states.values()))
            out = cell.op(**inputs)
            loss = tf.reduce_sum(out[0] * y_weights)
        return out[0], tape.gradient(loss, [inputs[n] for n in names])

    full = make_inputs(cell, 3, 9, I, H, tf.float32, seed=11)
    weights = {n: tf.Variable(full[n]) for n in ("kernel", "recurrent_kernel", "bias")}
    for B, T in [(3, 6), (3, 6), (2, 2), (3, 9), (3, 9), (1, 6), (3, 9)]:
        inputs = make_inputs(cell, B, T, I, H, tf.float32, seed=B * 10 + T)
        inputs.update({n: tf.convert_to_tensor(weights[n]) for n in weights})
        y_weights = tf.constant(np.random.default_rng(T).standard_normal((B, T, H)), tf.float32)
        y, grads = step({k: inputs[k] for k in spec}, y_weights)
        inputs64 = cast_inputs(inputs, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch([inputs64[n] for n in names])
            ref_y = cell.ref(**inputs64)[0]
            ref_loss = tf.reduce_sum(ref_y * tf.cast(y_weights, tf.float64))
        ref_grads = tape.gradient(ref_loss, [inputs64[n] for n in names])
        assert_close(y, ref_y, tf.float32, f"{cell} y at B={B} T={T}")
        for n, g, r in zip(names, grads, ref_grads):
            assert_close(g, r, tf.float32, f"{cell} d{n} at B={B} T={T}")
