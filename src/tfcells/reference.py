"""Reference recurrences written with plain TensorFlow ops, one step at a time.

They follow Keras' math and weight layout, share no code with the kernels, and are what the
tests differentiate with tf.GradientTape (in float64) to check the fused ops.
"""

import tensorflow as tf


def _steps(x, mask, time_major, go_backwards):
    """Yields (x_t, mask_t) in processing order; x_t is [B, I], mask_t [B, 1] or None."""
    if not time_major:
        x = tf.transpose(x, [1, 0, 2])
        mask = None if mask is None else tf.transpose(mask)
    order = range(x.shape[0] - 1, -1, -1) if go_backwards else range(x.shape[0])
    for t in order:
        yield x[t], None if mask is None else tf.cast(mask[t], x.dtype)[:, None]


def _keep(m, new, old):
    return new if m is None else m * new + (1 - m) * old


def _stack(outputs, h0, time_major):
    if not outputs:
        shape = [0, h0.shape[0], h0.shape[1]] if time_major else [h0.shape[0], 0, h0.shape[1]]
        return tf.zeros(shape, h0.dtype)
    return tf.stack(outputs, axis=0 if time_major else 1)


def _products(v, dropout, w, gates):
    """v·w; with dropout masks [G, B, n], gate g's columns of w multiply v ⊙ dropout[g]
    (Keras' implementation=1)."""
    if dropout is None:
        return tf.matmul(v, w)
    blocks = tf.split(w, gates, axis=1)
    return tf.concat([tf.matmul(v * dropout[g], blocks[g]) for g in range(gates)], axis=1)


def lstm(x, h0, c0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
         go_backwards=False, input_dropout_mask=None, recurrent_dropout_mask=None):
    h, c, outputs = h0, c0, []
    for x_t, m in _steps(x, mask, time_major, go_backwards):
        z = (_products(x_t, input_dropout_mask, kernel, 4) +
             _products(h, recurrent_dropout_mask, recurrent_kernel, 4))
        if bias is not None:
            z = z + bias
        zi, zf, zc, zo = tf.split(z, 4, axis=1)
        c_new = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zc)
        h_new = tf.sigmoid(zo) * tf.tanh(c_new)
        h, c = _keep(m, h_new, h), _keep(m, c_new, c)
        outputs.append(h)
    return _stack(outputs, h0, time_major), h, c


def gru(x, h0, kernel, recurrent_kernel, bias=None, mask=None, reset_after=True,
        time_major=False, go_backwards=False, input_dropout_mask=None,
        recurrent_dropout_mask=None):
    units = recurrent_kernel.shape[0]
    rec_drop = recurrent_dropout_mask
    h, outputs = h0, []
    for x_t, m in _steps(x, mask, time_major, go_backwards):
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
        h = _keep(m, z * h + (1 - z) * hh, h)
        outputs.append(h)
    return _stack(outputs, h0, time_major), h


def simple_rnn(x, h0, kernel, recurrent_kernel, bias=None, mask=None, time_major=False,
               go_backwards=False, input_dropout_mask=None, recurrent_dropout_mask=None):
    h, outputs = h0, []
    for x_t, m in _steps(x, mask, time_major, go_backwards):
        z = (_products(x_t, input_dropout_mask, kernel, 1) +
             _products(h, recurrent_dropout_mask, recurrent_kernel, 1))
        if bias is not None:
            z = z + bias
        h = _keep(m, tf.tanh(z), h)
        outputs.append(h)
    return _stack(outputs, h0, time_major), h
