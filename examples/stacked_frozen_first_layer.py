"""Scenario (b): a 3-layer stacked RNN whose first layer is frozen.

`layer.trainable = False` keeps layer 1 bit-identical through `fit`; since its weights are
frozen and its input is data, the fused op is not even recorded on the tape, so layer 1's
backward pass never runs. Layer 2's input then needs no gradient either, so its dx is skipped
as well: only layer 3 computes dx.

Run: python examples/stacked_frozen_first_layer.py
"""

import keras
import numpy as np

import tfcells
from tfcells.testing import CountWork

T, FEATURES, UNITS, N, BATCH = 50, 32, 64, 512, 64

rng = np.random.default_rng(0)
x = rng.normal(size=(N, T, FEATURES)).astype("float32")
y = rng.normal(size=(N, 1)).astype("float32")

layer1 = tfcells.LSTM(UNITS, return_sequences=True)
layer2 = tfcells.LSTM(UNITS, return_sequences=True)
layer3 = tfcells.LSTM(UNITS)
model = keras.Sequential([keras.Input((T, FEATURES)), layer1, layer2, layer3,
                          keras.layers.Dense(1)])
layer1.trainable = False  # e.g. pre-trained; freeze before compile()
model.compile("adam", "mse")

frozen_before = [w.numpy().copy() for w in layer1.weights]
with CountWork() as work:
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

steps = N // BATCH
print("gradient work during fit:", work.delta)
assert all(np.array_equal(w.numpy(), b) for w, b in zip(layer1.weights, frozen_before))
assert work.delta["forward_calls"] == 3 * steps
assert work.delta["backward_calls"] == 2 * steps, "layer 1's backward ran"
assert work.delta["grad_x"] == steps  # layer 3 only
print(f"OK: layer 1 unchanged; {steps} steps ran 3 forward ops but only 2 backward ops each")
