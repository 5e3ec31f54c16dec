"""Malformed arguments raise clear errors naming the argument and the expected shape, before
any kernel runs; they never crash the process."""

import numpy as np
import pytest
import tensorflow as tf

import tfcells

B, T, I, H = 2, 3, 4, 5


def lstm_args(**override):
    args = dict(x=tf.zeros([B, T, I]), h0=tf.zeros([B, H]), c0=tf.zeros([B, H]),
                kernel=tf.zeros([I, 4 * H]), recurrent_kernel=tf.zeros([H, 4 * H]),
                bias=tf.zeros([4 * H]), mask=None)
    args.update(override)
    return args


def gru_args(**override):
    args = dict(x=tf.zeros([B, T, I]), h0=tf.zeros([B, H]), kernel=tf.zeros([I, 3 * H]),
                recurrent_kernel=tf.zeros([H, 3 * H]), bias=tf.zeros([2, 3 * H]), mask=None)
    args.update(override)
    return args


def rnn_args(**override):
    args = dict(x=tf.zeros([B, T, I]), h0=tf.zeros([B, H]), kernel=tf.zeros([I, H]),
                recurrent_kernel=tf.zeros([H, H]), bias=tf.zeros([H]), mask=None)
    args.update(override)
    return args


InvalidArgument = tf.errors.InvalidArgumentError

# (id, function, arguments, exception type, message pattern)
CASES = [
    ("x_rank2", tfcells.ops.lstm, lstm_args(x=tf.zeros([B, I])), ValueError,
     r"x must have rank 3 \(\[B, T, I\]\)"),
    ("x_rank4", tfcells.ops.gru, gru_args(x=tf.zeros([B, T, I, 1])), ValueError,
     r"x must have rank 3"),
    ("x_int", tfcells.ops.lstm, lstm_args(x=tf.zeros([B, T, I], tf.int32)), TypeError,
     r"x has dtype int32; the kernels support float32, float64, bfloat16 and float16"),
    ("x_float16_weights_float64", tfcells.ops.simple_rnn,
     rnn_args(x=tf.zeros([B, T, I], tf.float16), h0=tf.zeros([B, H], tf.float16),
              kernel=tf.zeros([I, H], tf.float64)),
     TypeError, r"kernel has dtype float64, but must be float32 or float16"),
    ("mixed_dtypes", tfcells.ops.lstm, lstm_args(h0=tf.zeros([B, H], tf.float64)), TypeError,
     r"h0 has dtype float64, but must be float32 \(x has dtype float32\)"),
    ("kernel_rank1", tfcells.ops.lstm, lstm_args(kernel=tf.zeros([I])), ValueError,
     r"kernel must have rank 2"),
    ("kernel_wrong_input_size", tfcells.ops.lstm, lstm_args(kernel=tf.zeros([I + 1, 4 * H])),
     InvalidArgument, r"kernel must have shape \[4, 20\] \(I from x, H from recurrent_kernel\), "
     r"got \[5, 20\]"),
    ("kernel_wrong_gates", tfcells.ops.gru, gru_args(kernel=tf.zeros([I, 4 * H])),
     InvalidArgument, r"kernel must have shape \[4, 15\]"),
    ("recurrent_not_square_gates", tfcells.ops.lstm,
     lstm_args(recurrent_kernel=tf.zeros([H, 3 * H])), InvalidArgument,
     r"recurrent_kernel must have shape \[H, 4\*H\], got \[5, 15\]"),
    ("h0_wrong_batch", tfcells.ops.lstm, lstm_args(h0=tf.zeros([B + 1, H])), InvalidArgument,
     r"h0 must have shape \[2, 5\] \(B from x, H from recurrent_kernel\), got \[3, 5\]"),
    ("c0_wrong_units", tfcells.ops.lstm, lstm_args(c0=tf.zeros([B, H + 1])), InvalidArgument,
     r"c0 must have shape \[2, 5\]"),
    ("h0_rank3", tfcells.ops.simple_rnn, rnn_args(h0=tf.zeros([1, B, H])), ValueError,
     r"h0 must have rank 2"),
    ("bias_wrong", tfcells.ops.lstm, lstm_args(bias=tf.zeros([3 * H])), InvalidArgument,
     r"bias must have shape \[20\]"),
    ("gru_bias_for_reset_before", tfcells.ops.gru, gru_args(bias=tf.zeros([3 * H])),
     InvalidArgument, r"bias must have shape \[2, 15\] \(input and recurrent bias, as GRU "
     r"reset_after=True keeps them\), got \[15\]"),
    ("mask_wrong_shape", tfcells.ops.lstm, lstm_args(mask=tf.ones([T, B], tf.bool)),
     InvalidArgument, r"mask must have shape \[2, 3\] \(\[B, T\] like x\), got \[3, 2\]"),
    ("mask_rank1", tfcells.ops.simple_rnn, rnn_args(mask=tf.ones([B], tf.bool)), ValueError,
     r"mask must have rank 2"),
]


@pytest.mark.parametrize("fn,args,error,pattern", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(fn, args, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(**args)


def test_bad_input_in_tf_function_is_a_clear_error():
    # Unknown static shapes: the op's own check raises at run time.
    fn = tf.function(tfcells.ops.lstm, input_signature=[tf.TensorSpec([None, None, None])] +
                     [tf.TensorSpec([None, None])] * 4 + [tf.TensorSpec([None])])
    args = lstm_args(kernel=tf.zeros([I + 2, 4 * H]))
    del args["mask"]
    with pytest.raises(InvalidArgument, match=r"kernel must have shape \[4, 20\]"):
        fn(**args)


def test_gru_reset_before_bias_shape():
    args = gru_args()
    with pytest.raises(InvalidArgument, match=r"bias must have shape \[15\] \(one bias, as GRU "
                                              r"reset_after=False keeps it\), got \[2, 15\]"):
        tfcells.ops.gru(**args, reset_after=False)


def test_grad_op_rejects_a_foreign_cache():
    x = tf.zeros([B, T, I])
    args = lstm_args()
    with pytest.raises(InvalidArgument, match="gates must hold the forward op's training cache"):
        tfcells.ops.ops_module.tfcells_lstm_grad(
            x, args["h0"], args["c0"], args["kernel"], args["recurrent_kernel"], args["bias"],
            tf.zeros([0], tf.bool), tf.zeros([0]), tf.zeros([0]), tf.zeros([7]),
            tf.zeros([B * T * H]),
            tf.zeros([B * T * H]), tf.zeros([B, T, H]), tf.zeros([0]), tf.zeros([0]),
            tf.zeros([0]), grad_mask=63)


@pytest.mark.parametrize("y_shape", [[0], [B, T - 1, H]])
def test_grad_op_needs_the_forward_output(y_shape):
    """The gradient op reads each step's h_prev from the forward's y (the cache keeps no copy):
    an empty or misshapen y is refused with the shape it must have."""
    x = tf.random.normal([B, T, I])
    args = lstm_args(x=x)
    out = tfcells.ops.ops_module.tfcells_lstm(
        x, args["h0"], args["c0"], args["kernel"], args["recurrent_kernel"], args["bias"],
        tf.zeros([0], tf.bool), tf.zeros([0]), tf.zeros([0]), training=True)
    assert out.h_prev.shape == [0]
    with pytest.raises(InvalidArgument, match=rf"y must be the forward op's output sequence, "
                                              rf"of shape \[{B}, {T}, {H}\]"):
        tfcells.ops.ops_module.tfcells_lstm_grad(
            x, args["h0"], args["c0"], args["kernel"], args["recurrent_kernel"], args["bias"],
            tf.zeros([0], tf.bool), tf.zeros([0]), tf.zeros([0]), out.gates, out.aux,
            out.h_prev, tf.zeros(y_shape), out.y, tf.zeros([0]), tf.zeros([0]), grad_mask=63)


def test_mask_of_numbers_is_converted():
    args = lstm_args(x=tf.random.normal([B, T, I]), mask=np.array([[1, 0, 1], [1, 1, 0]]))
    y_num = tfcells.ops.lstm(**args)[0]
    args["mask"] = tf.constant([[True, False, True], [True, True, False]])
    np.testing.assert_array_equal(y_num, tfcells.ops.lstm(**args)[0])


def test_import_refuses_other_tensorflow_version(monkeypatch):
    # The loader runs this check before it loads the op library.
    from tfcells import _build_info, _loader
    monkeypatch.setattr(_build_info, "TENSORFLOW_VERSION", "2.0.0")
    with pytest.raises(ImportError, match=r"tfcells was built against TensorFlow 2\.0\.0, but "
                                          r"TensorFlow 2\.\d+\.\d+ is installed.*"
                                          r"pip install --no-build-isolation"):
        _loader._check_tensorflow_version()


def test_build_info():
    info = tfcells.build_info()
    assert info["tensorflow_version"] == tf.__version__
    assert info["version"] == tfcells.__version__
    assert isinstance(info["cuda"], bool)


def test_dropout_mask_shapes():
    args = lstm_args()
    with pytest.raises(InvalidArgument, match=r"recurrent_dropout must have shape \[4, 2, 5\] "
                                              r"\(one mask per gate and batch entry"):
        tfcells.ops.lstm(**args, recurrent_dropout_mask=tf.ones([1, B, H]))
    with pytest.raises(InvalidArgument, match=r"input_dropout must have shape \[3, 2, 4\]"):
        tfcells.ops.gru(**gru_args(), input_dropout_mask=tf.ones([3, B, I + 1]))
    with pytest.raises(ValueError, match=r"recurrent_dropout_mask must have rank 3 "
                                         r"\(\[4, B, H\]: one mask per gate\)"):
        tfcells.ops.lstm(**args, recurrent_dropout_mask=tf.ones([B, H]))
    with pytest.raises(TypeError, match="input_dropout_mask has dtype float64"):
        tfcells.ops.lstm(**args, input_dropout_mask=tf.ones([4, B, I], tf.float64))
