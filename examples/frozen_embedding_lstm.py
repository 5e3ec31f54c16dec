"""Scenario (a): a frozen pre-trained embedding feeding an LSTM.

The embedding stays bit-identical through `fit` (Keras freezing), and `input_gradient=False`
tells the LSTM that nothing below it needs a gradient, so its dx GEMM never runs. (Keras
leaves a frozen Embedding's TensorFlow variable trainable, so without the flag the tape would
ask for dx and throw it away.)

Run: python examples/frozen_embedding_lstm.py
"""

import keras
import numpy as np

import tfcells
from tfcells.testing import CountWork

VOCAB, DIM, T, UNITS, N, BATCH = 1000, 32, 40, 64, 512, 64

rng = np.random.default_rng(0)
pretrained = rng.normal(size=(VOCAB, DIM)).astype("float32")  # e.g. GloVe vectors
tokens = rng.integers(1, VOCAB, size=(N, T)).astype("int32")
tokens[:, -5:] = 0  # padding, masked by mask_zero
labels = rng.integers(0, 2, size=(N, 1)).astype("float32")

embedding = keras.layers.Embedding(
    VOCAB, DIM, mask_zero=True, trainable=False,
    embeddings_initializer=keras.initializers.Constant(pretrained))
lstm = tfcells.LSTM(UNITS, input_gradient=False)  # the embedding below needs no gradient
model = keras.Sequential([keras.Input((T,), dtype="int32"), embedding, lstm,
                          keras.layers.Dense(1, activation="sigmoid")])
model.compile("adam", "binary_crossentropy")

with CountWork() as work:
    model.fit(tokens, labels, batch_size=BATCH, epochs=1, verbose=0)

steps = N // BATCH
print("gradient work during fit:", work.delta)
assert np.array_equal(embedding.embeddings.numpy(), pretrained), "embedding changed"
assert work.delta["grad_x"] == 0, "the LSTM computed dx"
assert work.delta["grad_kernel"] == steps == work.delta["backward_calls"]
print(f"OK: embedding unchanged; {steps} LSTM backward passes, none computed dx")
