"""End-to-end `model.fit` throughput (`--fit`): a small real model with Keras' layers against
the same model with tfcells' layers, per freeze scenario, in one run.

The model: Embedding(5000, 128, mask_zero=True) -> LSTM(128, return_sequences=True) ->
LSTM(128) -> Dense(1, sigmoid), Adam, binary cross-entropy, jit_compile=False. The data: a
synthetic text-classification set made from a fixed seed: noise tokens, a few label-bearing
tokens per sequence (so the loss falls), and zero padding at the end of about half of the
sequences (so the mask is exercised). Both models start from the same weights, drawn with
NumPy, and see the same batches in the same order (shuffle=False).

Per scenario and implementation: build, compile, one untimed warm-up epoch (tracing), then
the checks, then the timed epochs; throughput is the median over epochs of samples ÷ epoch
wall time. Checked before timing: the warm-up epoch's mean loss of tfcells against Keras'
(relative difference, LOSS_RTOL) and that every weight the scenario freezes is bit-identical
to its initial value (again after the timed epochs). A tfcells model whose loss disagrees is
not timed (status "mismatch"), as in the rest of the suite.
"""

import dataclasses
import time
import traceback

import numpy as np

from . import machine, timing

VOCAB = 5000
EMBED = 128
UNITS = 128
BATCH = 64
IMPLS = ("keras", "tfcells")  # keras is the reference the loss check compares against
# Warm-up epoch loss, tfcells vs Keras: same weights and data, float32 sums in another order.
LOSS_RTOL = 1e-3

# name -> what is frozen (for the report's notes)
SCENARIOS = {
    "all_trainable": "nothing frozen",
    "frozen_embedding": "Embedding(trainable=False); tfcells: first LSTM input_gradient=False",
    "first_lstm_frozen": "first LSTM layer.trainable=False",
    "first_lstm_kernel_frozen": "first LSTM kernel: tfcells kernel_trainable=False, Keras "
                                "layer.cell.kernel.trainable=False",
    "dropout": "nothing frozen; both LSTMs dropout=0.2, recurrent_dropout=0.2 (seeded alike)",
}
DROPOUT = 0.2


@dataclasses.dataclass(frozen=True)
class FitSize:
    samples: int
    seq_len: int
    epochs: int  # timed epochs, after one warm-up epoch
    batch: int = BATCH

    def __str__(self):
        return (f"{self.samples} sequences of length {self.seq_len}, batch {self.batch}, "
                f"{self.epochs} timed epochs")


# Default (quick): about 2-2.5 minutes on 2 idle cores (an epoch is 32 batches of ~0.1 s);
# --full: twice the sequences and more epochs for a tighter median (about 6 minutes).
QUICK_SIZE = FitSize(samples=2048, seq_len=80, epochs=3)
FULL_SIZE = FitSize(samples=4096, seq_len=80, epochs=5)

# Label-bearing token ids: [1, 51) votes for 1, [51, 101) for 0; noise tokens above.
_SIGNAL = 50
_NOISE_LOW = 1 + 2 * _SIGNAL


def make_data(size, seed=0):
    """(x int32 [N, T], y float32 [N]): each sequence holds 4 label-bearing tokens at random
    places among noise tokens, each one voting for the true label with probability 0.85 (so
    the task is learnable but not trivial); about half the sequences are shorter than T and
    padded with 0 at the end."""
    rng = np.random.default_rng(seed)
    n, t = size.samples, size.seq_len
    x = rng.integers(_NOISE_LOW, VOCAB, size=(n, t))
    y = rng.integers(0, 2, size=n)
    lengths = np.where(rng.random(n) < 0.5, t, rng.integers(max(1, t // 4), t + 1, size=n))
    for i in range(n):
        k = min(4, lengths[i])
        where = rng.choice(lengths[i], size=k, replace=False)
        votes = np.where(rng.random(k) < 0.85, y[i], 1 - y[i])
        # vote 1 -> [1, 51), vote 0 -> [51, 101)
        x[i, where] = 1 + rng.integers(0, _SIGNAL, size=k) + _SIGNAL * (1 - votes)
        x[i, lengths[i]:] = 0
    return x.astype(np.int32), y.astype(np.float32)


def initial_weights(seed=0):
    """Keras-layout weights both models load: Keras' default initializers' scales, drawn
    with NumPy so that they do not depend on either library's random state."""
    rng = np.random.default_rng(seed + 1)

    def glorot(fan_in, fan_out):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

    def orthogonal(n, m):
        q, r = np.linalg.qr(rng.standard_normal((m, n)))
        return (q * np.sign(np.diag(r))).T.astype(np.float32)  # [n, m], orthonormal rows

    def lstm(fan_in):
        bias = np.zeros(4 * UNITS, np.float32)
        bias[UNITS:2 * UNITS] = 1.0  # unit_forget_bias
        return {"kernel": glorot(fan_in, 4 * UNITS),
                "recurrent_kernel": orthogonal(UNITS, 4 * UNITS), "bias": bias}

    return {
        "embeddings": rng.uniform(-0.05, 0.05, (VOCAB, EMBED)).astype(np.float32),
        "lstm_1": lstm(EMBED),
        "lstm_2": lstm(UNITS),
        "dense": {"kernel": glorot(UNITS, 1), "bias": np.zeros(1, np.float32)},
    }


class _Model:
    """One compiled model, its layers, and the variables its scenario freezes."""

    def __init__(self, impl, scenario, size, weights):
        import keras

        layers = keras.layers
        if impl == "tfcells":
            import tfcells as layers

        extra = {}
        if impl == "tfcells" and scenario == "frozen_embedding":
            extra["input_gradient"] = False
        if impl == "tfcells" and scenario == "first_lstm_kernel_frozen":
            extra["kernel_trainable"] = False
        self.embedding = keras.layers.Embedding(
            VOCAB, EMBED, mask_zero=True, trainable=scenario != "frozen_embedding")
        rates = [{}, {}]
        if scenario == "dropout":  # the same seeds: both models draw the same masks
            rates = [dict(dropout=DROPOUT, recurrent_dropout=DROPOUT, seed=seed)
                     for seed in (11, 12)]
        self.lstm_1 = layers.LSTM(UNITS, return_sequences=True, **extra, **rates[0])
        self.lstm_2 = layers.LSTM(UNITS, **rates[1])
        self.dense = keras.layers.Dense(1, activation="sigmoid")
        self.model = keras.Sequential([keras.Input((size.seq_len,), dtype="int32"),
                                       self.embedding, self.lstm_1, self.lstm_2, self.dense])
        # Load by name, not by position: freezing can change the order of model.weights.
        self.embedding.embeddings.assign(weights["embeddings"])
        for layer, key in ((self.lstm_1, "lstm_1"), (self.lstm_2, "lstm_2")):
            for name, value in weights[key].items():
                getattr(layer.cell, name).assign(value)
        self.dense.kernel.assign(weights["dense"]["kernel"])
        self.dense.bias.assign(weights["dense"]["bias"])

        if scenario == "first_lstm_frozen":
            self.lstm_1.trainable = False
        if impl == "keras" and scenario == "first_lstm_kernel_frozen":
            self.lstm_1.cell.kernel.trainable = False
        cell = self.lstm_1.cell
        self.frozen = {
            "all_trainable": {},
            "dropout": {},
            "frozen_embedding": {"embeddings": (self.embedding.embeddings,
                                                weights["embeddings"])},
            "first_lstm_frozen": {f"lstm_1/{n}": (getattr(cell, n), weights["lstm_1"][n])
                                  for n in ("kernel", "recurrent_kernel", "bias")},
            "first_lstm_kernel_frozen": {"lstm_1/kernel": (cell.kernel,
                                                           weights["lstm_1"]["kernel"])},
        }[scenario]
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                           jit_compile=False)

    def fused(self):
        """Why a tfcells layer runs Keras' own loop while training, or None."""
        for layer in (self.lstm_1, self.lstm_2):
            reason = getattr(layer, "fused_unsupported_reason", None)
            if reason is not None and reason(training=True) is not None:
                return f"{layer.name}: {reason(training=True)}"
        return None

    def frozen_changed(self):
        """Names of the frozen weights that no longer equal their initial values (bit for
        bit), and of those still listed as trainable."""
        trainable = {id(v) for v in self.model.trainable_weights}
        changed = []
        for name, (variable, initial) in self.frozen.items():
            if not np.array_equal(np.asarray(variable.numpy()), initial):
                changed.append(f"{name} changed")
            if id(variable) in trainable:
                changed.append(f"{name} still in trainable_weights")
        return changed


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall time of each epoch. Keras turns the epoch's logs into numbers before
        on_epoch_end, so every step's work is done by then."""

        def __init__(self):
            super().__init__()
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._start)

    return EpochTimer()


def _error(e):
    last = traceback.extract_tb(e.__traceback__)[-1:]
    where = f" (at {last[0].filename.split('/')[-1]}:{last[0].lineno})" if last else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


def _base_record(scenario, impl, size, device):
    return {
        "cell": "model", "config": scenario, "mode": "fit", "layers": 2, "impl": impl,
        "T": size.seq_len, "B": size.batch, "I": EMBED, "H": UNITS, "dtype": "float32",
        "device": device, "sweep": None, "status": "ok", "detail": "", "median_ms": None,
        "samples": size.samples, "samples_per_s": None, "epochs": size.epochs,
        "frozen": SCENARIOS[scenario],
    }


def run_scenario(scenario, size, x, y, weights, device="cpu"):
    """One record per implementation (IMPLS order): build, warm up, check, then time."""
    import tensorflow as tf

    records, models, losses = {}, {}, {}
    dev = "/GPU:0" if device == "gpu" else "/CPU:0"
    fit = dict(batch_size=size.batch, shuffle=False, verbose=0)
    for impl in IMPLS:
        rec = records[impl] = _base_record(scenario, impl, size, device)
        try:
            with tf.device(dev):
                start = time.perf_counter()
                m = _Model(impl, scenario, size, weights)
                history = m.model.fit(x, y, epochs=1, **fit)
                # Build, compile and the first epoch, tracing included.
                rec["setup_s"] = time.perf_counter() - start
            losses[impl] = float(history.history["loss"][0])
            rec["loss_warmup"] = losses[impl]
            if impl == "tfcells":
                rec["fused_fallback"] = m.fused()
            changed = m.frozen_changed()
            if changed:
                rec.update(status="mismatch",
                           detail="frozen weights not bit-identical after the warm-up "
                                  "epoch: " + ", ".join(changed))
            else:
                models[impl] = m
        except Exception as e:  # one broken implementation must not end the run
            rec.update(status="error", detail=_error(e))

    ref = IMPLS[0]
    for impl, rec in records.items():
        if impl == ref or impl not in losses or ref not in losses:
            continue
        rel = abs(losses[impl] - losses[ref]) / max(abs(losses[ref]), 1e-12)
        rec["check"] = {"reference": ref, "loss_rel_diff": rel}
        if not rel <= LOSS_RTOL and rec["status"] == "ok":
            rec.update(status="mismatch",
                       detail=f"warm-up epoch loss {losses[impl]:.6g} vs {ref} "
                              f"{losses[ref]:.6g}: relative difference {rel:.2g} > "
                              f"{LOSS_RTOL:g}")
            models.pop(impl, None)
    if ref in records:
        records[ref]["check"] = {"reference": ref, "loss_rel_diff": 0.0}

    for impl, m in models.items():
        rec = records[impl]
        timer = _epoch_timer()
        try:
            with tf.device(dev), machine.OtherWork() as other:
                history = m.model.fit(x, y, epochs=size.epochs, callbacks=[timer], **fit)
        except Exception as e:
            rec.update(status="error", detail=_error(e))
            continue
        rec["other_cores"] = other.cores
        rec.update(timing.summarize([s * 1e3 for s in timer.seconds]))
        rec["samples_per_s"] = float(np.median([size.samples / s for s in timer.seconds]))
        rec["loss_last"] = float(history.history["loss"][-1])
        changed = m.frozen_changed()
        rec["frozen_bit_identical"] = not changed
        if changed:
            rec.update(status="mismatch", detail="frozen weights not bit-identical after "
                                                 "the timed epochs: " + ", ".join(changed))
    for impl, rec in records.items():
        if "frozen_bit_identical" not in rec and impl in losses:
            rec["frozen_bit_identical"] = "not bit-identical" not in rec["detail"]
    return list(records.values())


def run(size, scenarios=None, device="cpu", progress=None, seed=0):
    """Every scenario's records, in SCENARIOS order."""
    x, y = make_data(size, seed)
    weights = initial_weights(seed)
    records = []
    for scenario in scenarios or list(SCENARIOS):
        if progress is not None:
            progress.start(f"model.fit {scenario}")
        records += run_scenario(scenario, size, x, y, weights, device)
        if progress is not None:
            progress.advance()
    return records
