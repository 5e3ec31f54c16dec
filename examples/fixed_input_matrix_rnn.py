"""Scenario (c): a tanh RNN h' = tanh(x·W_fixed + h·W_trainable + b) with W_fixed frozen.

`kernel_trainable=False` keeps the input matrix W_fixed (the kernel) out of
`trainable_weights`, so `fit` leaves it bit-identical, and the backward op never computes its
gradient; the recurrent matrix W_trainable (recurrent_kernel) trains.

Run: python examples/fixed_input_matrix_rnn.py
"""

import keras
import numpy as np

import tfcells
from tfcells.testing import CountWork

T, FEATURES, UNITS, N, BATCH = 50, 32, 64, 512, 64

rng = np.random.default_rng(0)
x = rng.normal(size=(N, T, FEATURES)).astype("float32")
y = rng.normal(size=(N, 1)).astype("float32")
w_fixed = rng.normal(scale=FEATURES ** -0.5, size=(FEATURES, UNITS)).astype("float32")

rnn = tfcells.SimpleRNN(UNITS, kernel_trainable=False,
                        kernel_initializer=keras.initializers.Constant(w_fixed))
model = keras.Sequential([keras.Input((T, FEATURES)), rnn, keras.layers.Dense(1)])
model.compile("adam", "mse")
print("trainable:", [w.name for w in rnn.trainable_weights])

w_trainable_before = rnn.cell.recurrent_kernel.numpy().copy()
with CountWork() as work:
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

steps = N // BATCH
print("gradient work during fit:", work.delta)
assert np.array_equal(rnn.cell.kernel.numpy(), w_fixed), "W_fixed changed"
assert not np.array_equal(rnn.cell.recurrent_kernel.numpy(), w_trainable_before)
assert work.delta["grad_kernel"] == 0, "the gradient of W_fixed was computed"
assert work.delta["grad_recurrent_kernel"] == steps
print(f"OK: W_fixed bit-identical, its gradient never computed; W_trainable updated")
