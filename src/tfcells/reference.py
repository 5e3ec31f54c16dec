"""Reference recurrences written with plain TensorFlow ops, one step at a time.

They follow Keras' math and weight layout and share no code with the kernels. The tests
differentiate them with tf.GradientTape (in float64) to check the fused ops, and the gradient
ops' own gradient (second order, forward mode; see `tfcells._second_order`) differentiates
them twice: this module is the one place where the cells' math is written in TensorFlow.

Each cell is a step function, (x_t, states) -> new states, run by one driver: unrolled in
Python when the number of steps is known when the function is traced (as it always is
eagerly), a `tf.while_loop` otherwise. Both are differentiable to any order.
"""

import tensorflow as tf


def _keep(m, new, old):
    """A masked step (m = 0) keeps the previous state (Keras semantics)."""
    return new if m is None else m * new + (1 - m) * old


def _recur(step, x, states, mask, time_major, go_backwards):
    """Runs `step(x_t, states) -> states` over the sequence, masked steps keeping the state.

    Returns (outputs [B, T, H] or [T, B, H] in processing order, final states); the output
    of a step is its first state.
    """
    xs = x if time_major else tf.transpose(x, [1, 0, 2])
    ms = None
    if mask is not None:
        ms = tf.cast(mask if time_major else tf.transpose(mask), x.dtype)[:, :, None]
    if go_backwards:
        xs = tf.reverse(xs, [0])
        ms = None if ms is None else tf.reverse(ms, [0])

    def masked_step(x_t, m_t, states):
        new = step(x_t, states)
        return tuple(_keep(m_t, n, s) for n, s in zip(new, states))

    states = tuple(states)
    steps = xs.shape[0]
    if steps is not None:
        outputs = []
        for t in range(steps):
            states = masked_step(xs[t], None if ms is None else ms[t], states)
            outputs.append(states[0])
        ys = (tf.stack(outputs) if outputs else
              tf.zeros(tf.concat([[0], tf.shape(states[0])], 0), x.dtype))
    else:
        def body(t, states, ys):
            states = masked_step(xs[t], None if ms is None else ms[t], states)
            return t + 1, states, ys.write(t, states[0])

        n = tf.shape(xs)[0]
        ys = tf.TensorArray(x.dtype, size=n, element_shape=states[0].shape)
        _, states, ys = tf.while_loop(lambda t, *_: t < n, body, (0, states, ys))
        ys = ys.stack()
    return (ys if time_major else tf.transpose(ys, [1, 0, 2])), states


def _products(v, dropout, w, gates):
    """v·w; with dropout masks [G, B, n], gate g's columns of w multiply v ⊙ dropout[g]
    (Keras' implementation=1)."""
    if dropout is None:
        return tf.matmul(v, w)
    blocks = tf.split(w, gates, axis=1)
    return tf.concat([tf.matmul(v * dropout[g], blocks[g]) for g in range(gates)], axis=1)


def lstm(x, h0, c0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
         go_backwards=False, input_dropout_mask=None, recurrent_dropout_mask=None):
    def step(x_t, states):
        h, c = states
        z = (_products(x_t, input_dropout_mask, kernel, 4) +
             _products(h, recurrent_dropout_mask, recurrent_kernel, 4))
        if bias is not None:
            z = z + bias
        zi, zf, zc, zo = tf.split(z, 4, axis=1)
        c_new = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zc)
        return tf.sigmoid(zo) * tf.tanh(c_new), c_new

    outputs, (h, c) = _recur(step, x, (h0, c0), mask, time_major, go_backwards)
    return outputs, h, c


def gru(x, h0, kernel, recurrent_kernel, bias=None, mask=None, reset_after=True,
        time_major=False, go_backwards=False, input_dropout_mask=None,
        recurrent_dropout_mask=None):
    units = recurrent_kernel.shape[0]
    rec_drop = recurrent_dropout_mask

    def step(x_t, states):
        (h,) = states
        xz = _products(x_t, input_dropout_mask, kernel, 3)
        if bias is not None:
            xz = xz + (bias[0] if reset_after else bias)
        x_z, x_r, x_h = tf.split(xz, 3, axis=1)
        if reset_after:
            rz = _products(h, rec_drop, recurrent_kernel, 3)
            if bias is not None:
                rz = rz + bias[1]
            r_z, r_r, r_h = tf.split(rz, 3, axis=1)
            z = tf.sigmoid(x_z + r_z)
            r = tf.sigmoid(x_r + r_r)
            hh = tf.tanh(x_h + r * r_h)
        else:
            r_zr = _products(h, None if rec_drop is None else rec_drop[:2],
                             recurrent_kernel[:, :2 * units], 2)
            z = tf.sigmoid(x_z + r_zr[:, :units])
            r = tf.sigmoid(x_r + r_zr[:, units:])
            h_h = h if rec_drop is None else h * rec_drop[2]
            hh = tf.tanh(x_h + tf.matmul(r * h_h, recurrent_kernel[:, 2 * units:]))
        return (z * h + (1 - z) * hh,)

    outputs, (h,) = _recur(step, x, (h0,), mask, time_major, go_backwards)
    return outputs, h


def simple_rnn(x, h0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
               go_backwards=False, input_dropout_mask=None, recurrent_dropout_mask=None):
    def step(x_t, states):
        (h,) = states
        z = (_products(x_t, input_dropout_mask, kernel, 1) +
             _products(h, recurrent_dropout_mask, recurrent_kernel, 1))
        if bias is not None:
            z = z + bias
        return (tf.tanh(z),)

    outputs, (h,) = _recur(step, x, (h0,), mask, time_major, go_backwards)
    return outputs, h
