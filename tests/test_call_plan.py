"""The call plan and the core's tables as the bindings expose them (csrc/core/plan.h, cells.h).

The layout itself is checked in the core self-test (every pass in exactly-sized, NaN-filled
buffers under ASan; a buffer one element short is refused). Here: what reaches Python.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from tfcells import _tfcells_core, ops
from tfcells.testing import work_counters

CELLS = {  # the Python entry point and its forward op
    "lstm": (ops.lstm, "TfcellsLstm"),
    "gru": (ops.gru, "TfcellsGru"),
    "simple_rnn": (ops.simple_rnn, "TfcellsSimpleRnn"),
}


def _call(cell, x, h, kernel, rk, bias, **kw):
    fn = CELLS[cell][0]
    if cell == "lstm":
        return fn(x, h, h, kernel, rk, bias, **kw)
    return fn(x, h, kernel, rk, bias, **kw)


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("time_major", [False, True])
def test_zero_units_give_zero_input_gradient(cell, time_major):
    """H = 0: no unit reads x, so dx is zero (the backward pass once returned before writing
    it, leaving whatever the allocator held), and every output is empty."""
    B, T, I = 3, 4, 5
    x = tf.random.normal((T, B, I) if time_major else (B, T, I), dtype=tf.float64)
    h = tf.zeros((B, 0), tf.float64)
    kernel = tf.zeros((I, 0), tf.float64)
    rk = tf.zeros((0, 0), tf.float64)
    bias = tf.zeros((2, 0) if cell == "gru" else (0,), tf.float64)
    for _ in range(3):  # reused allocations must not leak into dx either
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = _call(cell, x, h, kernel, rk, bias, time_major=time_major)
            loss = tf.reduce_sum(outputs[0]) + tf.reduce_sum(x) * 0.0
        dx = tape.gradient(loss, x)
        np.testing.assert_array_equal(dx.numpy(), np.zeros(x.shape))
        assert outputs[0].shape == ((T, B, 0) if time_major else (B, T, 0))
        assert all(o.shape == (B, 0) for o in outputs[1:])


def test_zero_units_dx_through_the_gradient_op():
    """The gradient op itself, asked for dx alone at H = 0, writes zeros."""
    B, T, I = 2, 3, 4
    x = tf.random.normal((B, T, I))
    h = tf.zeros((B, 0))
    empty = tf.zeros((0,))
    outs = ops.ops_module.tfcells_simple_rnn(
        x, h, tf.zeros((I, 0)), tf.zeros((0, 0)), empty, tf.zeros((0,), tf.bool), empty, empty,
        has_bias=False, training=True)
    grads = ops.ops_module.tfcells_simple_rnn_grad(
        x, h, tf.zeros((I, 0)), tf.zeros((0, 0)), empty, tf.zeros((0,), tf.bool), empty, empty,
        outs.gates, outs.aux, outs.h_prev, outs.y, tf.zeros((B, T, 0)), tf.zeros((B, 0)),
        has_bias=False, grad_mask=ops.GRAD_X)
    np.testing.assert_array_equal(grads.dx.numpy(), np.zeros((B, T, I)))
    assert grads.dkernel.shape == (0,)  # not asked for: empty


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_gradient_op_outputs_come_from_the_core_table(cell):
    """The gradient op has one output per forward input with a gradient bit, named and ordered
    by the core's table; Python reads the same table."""
    forward = op_def_registry.get(CELLS[cell][1])
    grad = op_def_registry.get(CELLS[cell][1] + "Grad")
    inputs = [a.name for a in forward.input_arg]
    expected = [_tfcells_core.GRAD_OUTPUTS[n] for n in inputs if n in _tfcells_core.GRAD_BITS]
    assert [a.name for a in grad.output_arg] == expected
    assert ("c0" in inputs) == _tfcells_core.CELLS[cell]["cell_state"]
    # Every bit is its own, and GRAD_ALL is their union.
    bits = list(_tfcells_core.GRAD_BITS.values())
    assert len(set(bits)) == len(bits) and sum(bits) == _tfcells_core.GRAD_ALL
    assert ops.GRAD_BITS == dict(_tfcells_core.GRAD_BITS)


def test_work_counters_are_named_by_the_core():
    counters = work_counters()
    assert tuple(counters) == tuple(_tfcells_core.WORK_COUNTERS)
    before = counters["forward_calls"]
    x = tf.random.normal((1, 2, 3))
    ops.simple_rnn(x, tf.zeros((1, 4)), tf.zeros((3, 4)), tf.zeros((4, 4)))
    assert work_counters()["forward_calls"] == before + 1


def test_numpy_module_refuses_a_cache_of_another_shape():
    rng = np.random.default_rng(0)
    B, T, I, H = 2, 3, 4, 5
    x = rng.normal(size=(B, T, I))
    h0 = np.zeros((B, H))
    k, rk = rng.normal(size=(I, 3 * H)), rng.normal(size=(H, 3 * H))
    out = _tfcells_core.forward("gru", x, h0, None, k, rk, None, None)
    with pytest.raises(ValueError, match="gates must hold the forward op's training cache"):
        _tfcells_core.backward("gru", x, h0, None, k, rk, None, None, False, False,
                               out["gates"][:-1], out["aux"], out["h_prev"], None, None, None,
                               y=out["y"])


def test_unknown_cell_names_the_choices():
    with pytest.raises(ValueError, match="cell must be one of lstm, gru, gru_reset_before, "
                                         "simple_rnn, got peephole"):
        _tfcells_core.forward("peephole", np.zeros((1, 1, 1)), np.zeros((1, 1)), None,
                              np.zeros((1, 1)), np.zeros((1, 1)), None, None)


def test_bad_recurrent_kernel_message_gives_the_concrete_shape():
    x = tf.zeros((2, 3, 4))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"recurrent_kernel must have shape \[H, 4\*H\], got \[6, 20\]; "
                             r"with H = 5 from kernel's 20 columns that is \[5, 20\]"):
        ops.lstm(x, tf.zeros((2, 5)), tf.zeros((2, 5)), tf.zeros((4, 20)), tf.zeros((6, 20)))


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("go_backwards", [False, True])
def test_h_prev_cache_only_where_y_cannot_serve(cell, go_backwards):
    """The backward pass reads the state entering each step, h_prev, from the forward's output
    y a step behind (h0 first), so the forward keeps no copy of it: T*B*H elements less. Only
    go_backwards (whose y is reversed) keeps an h_prev cache, and there only where something
    reads it: without dW_h, only the GRUs' backward step. Every gradient comes out the same,
    bit for bit, whether the forward was told that the recurrent kernel is frozen or not
    (an unwatched recurrent kernel leaves a kept cache unread)."""
    rng = np.random.default_rng(3)
    B, T, I, H = 3, 5, 4, 6
    gates = _tfcells_core.CELLS[cell]["gates"]
    x = tf.constant(rng.normal(size=(B, T, I)))
    h = tf.constant(rng.normal(size=(B, H)))
    kernel = tf.constant(rng.normal(size=(I, gates * H)) * 0.3)
    rk = tf.constant(rng.normal(size=(H, gates * H)) * 0.3)
    bias = tf.constant(rng.normal(size=(2, gates * H) if cell == "gru" else (gates * H,)))

    def run(frozen):
        with tf.GradientTape() as tape:
            tape.watch([x, h, kernel, bias])
            outputs = _call(cell, x, h, kernel, rk, bias, frozen=frozen,
                            go_backwards=go_backwards)
            loss = sum(tf.reduce_sum(o * o) for o in outputs)
        return [g.numpy() for g in tape.gradient(loss, [x, h, kernel, bias])]

    kept, lean = run(()), run(("recurrent_kernel",))
    for a, b in zip(kept, lean):
        np.testing.assert_array_equal(a, b)

    raw = getattr(ops.ops_module, "tfcells_" + cell)
    empty = tf.zeros((0,), tf.float64)
    args = [x, h] + ([h] if cell == "lstm" else []) + [kernel, rk, bias,
                                                      tf.zeros((0,), tf.bool), empty, empty]
    read_without_dw_h = B * T if cell == "gru" else 0
    for frozen, rows in ((0, B * T), (ops.GRAD_RECURRENT_KERNEL, read_without_dw_h)):
        out = raw(*args, training=True, frozen=frozen, go_backwards=go_backwards)
        assert out.h_prev.shape == ((rows if go_backwards else 0) * H,)
        # (SimpleRNN's one gate is read back from y: test_simple_rnn_reads_its_gate_from_y)
        assert out.gates.shape == ((0 if cell == "simple_rnn" else B * T * gates) * H,)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_simple_rnn_reads_its_gate_from_y(dtype, go_backwards):
    """A SimpleRNN step's one activated gate is its new state, so the backward pass reads it from
    the forward's y, and the training forward keeps no gates cache (T*B*H elements less, its
    whole cache); 16-bit storage, whose y is rounded, keeps one. Where the mask skips a step, y
    holds the carried state instead of the gate, and such a row gets no gradient there: every
    gradient still matches the reference's. The gradient op refuses to run without y."""
    from tfcells import reference

    rng = np.random.default_rng(5)
    B, T, I, H = 3, 6, 4, 5
    compute = tf.float64 if dtype == "float64" else tf.float32
    x = tf.cast(tf.constant(rng.normal(size=(B, T, I))), dtype)
    h = tf.cast(tf.constant(rng.normal(size=(B, H))), dtype)
    kernel = tf.constant(rng.normal(size=(I, H)) * 0.4, compute)
    rk = tf.constant(rng.normal(size=(H, H)) * 0.4, compute)
    bias = tf.constant(rng.normal(size=(H,)), compute)
    mask = tf.constant(rng.random((B, T)) < 0.7)
    dy = tf.cast(tf.constant(rng.normal(size=(B, T, H))), dtype)

    empty = tf.zeros((0,), compute)
    out = ops.ops_module.tfcells_simple_rnn(x, h, kernel, rk, bias, mask, empty, empty,
                                            has_mask=True, go_backwards=go_backwards,
                                            training=True)
    assert out.gates.shape == ((B * T * H if dtype == "bfloat16" else 0),)
    assert out.aux.shape == (0,) and out.h_prev.shape == ((B * T * H if dtype == "bfloat16" or
                                                           go_backwards else 0),)

    def grads(fn, cast):
        sources = [x, h, kernel, rk, bias]
        with tf.GradientTape() as tape:
            tape.watch(sources)
            y = fn(*[cast(v) for v in sources])
        return tape.gradient(y, sources, output_gradients=cast(dy))

    ours = grads(lambda *v: ops.simple_rnn(*v, mask=mask, go_backwards=go_backwards)[0],
                 lambda v: v)
    ref = grads(lambda *v: reference.simple_rnn(*v, mask=mask, go_backwards=go_backwards)[0],
                lambda v: tf.cast(v, tf.float64))
    tol = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2}[dtype]
    for name, a, b in zip(["x", "h0", "kernel", "recurrent_kernel", "bias"], ours, ref):
        a, b = tf.cast(a, tf.float64).numpy(), b.numpy()
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)

    if dtype != "bfloat16":
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"y must be the forward op's output sequence"):
            ops.ops_module.tfcells_simple_rnn_grad(
                x, h, kernel, rk, bias, mask, empty, empty, out.gates, out.aux, out.h_prev,
                tf.zeros((0,), dtype), dy, tf.zeros((0,), dtype), has_mask=True,
                go_backwards=go_backwards, grad_mask=ops.GRAD_BIAS)
