"""The implementations compared, in one registry.

A contender turns a Workload into a Step: a callable that runs one training step (or one
inference) and a `fetch` that converts what it returned into NumPy arrays in Keras' layout
({"y": outputs [B, T, H], "kernel": d(kernel), ...}), so that every contender can be checked
against the same reference before it is timed.
"""

import contextlib

import numpy as np

from . import timing, torchmap
from .workload import CELLS, DROPOUT_RATE, weight_dtype

REGISTRY = {}  # name -> Contender, in registration (= report) order


def register(contender):
    REGISTRY[contender.name] = contender
    return contender


class Step:

    def __init__(self, run, fetch, framework, measure=timing.measure):
        self.run = run  # () -> raw result; see Contender.measure for when it returns
        self.fetch = fetch  # raw result -> {"y": ..., grad name: ...} as NumPy, Keras layout
        self.framework = framework  # "tf", "torch" or "cuda": which memory statistics apply
        self.measure = measure  # (run, reps, warmup, budget_s) -> timing statistics


class Contender:
    name = ""
    label = ""
    cells = CELLS
    # How its steps are timed: timing.measure, by the wall clock, so run() must return only
    # once the work is done; or timing.measure_cuda_events, on the GPU's clock, so run() only
    # enqueues the work on PyTorch's current CUDA stream.
    measure = staticmethod(timing.measure)
    # Whether it can apply Keras' per-gate input and recurrent dropout masks (config.dropout).
    supports_dropout = False

    def unavailable(self):
        """Why this contender cannot run on this machine at all, or None."""
        return None

    def unsupported(self, work):
        """Why this contender cannot run this workload, or None."""
        if work.cell not in self.cells:
            return f"no {work.cell} implementation"
        if work.config.dropout and not self.supports_dropout:
            return "no recurrent dropout"
        return None

    def layer_weights(self, work, layer):
        """The Keras-layout weights this contender loads (a hook for deliberately wrong
        contenders in tests)."""
        return work.weights[layer]

    def build(self, work):
        raise NotImplementedError


# ---------------------------------------------------------------------------- TensorFlow

def _tf_device(device):
    return "/GPU:0" if device == "gpu" else "/CPU:0"


def _tf_inputs(work):
    """The workload's x and dy as TF tensors, made once and shared by all TF contenders."""
    import tensorflow as tf

    if "tf" not in work.cache:
        with tf.device(_tf_device(work.device)):
            work.cache["tf"] = (tf.constant(work.x), tf.constant(work.dy))
    return work.cache["tf"]


class TFContender(Contender):
    """A TF contender supplies forward(x) and the variables; this class builds the step.

    The step is a tf.function (jit_compile=False), as Keras' fit runs it. Training: the
    gradients of sum(y * dy) (the tape's output_gradients=dy) w.r.t. the trainable names of the
    workload; x is watched only when the configuration needs dx, as it would be a constant input
    (data) otherwise.
    """

    def make_model(self, work):
        """Returns (forward(x) -> y [B, T, H], {grad name: variable}, to_keras(name, grad))."""
        raise NotImplementedError

    def policy(self, work):
        """The Keras global dtype policy make_model and tracing run under (None: unchanged).
        Keras-layer contenders run a 16-bit workload under its mixed policy."""
        return None

    def build(self, work):
        import tensorflow as tf

        x, dy = _tf_inputs(work)
        device = _tf_device(work.device)
        with keras_policy(self.policy(work)), tf.device(device):
            forward, variables, to_keras = self.make_model(work)
        names = work.grads

        if work.config.train:
            @tf.function(jit_compile=False)
            def step(x, dy):
                with tf.GradientTape() as tape:
                    if "x" in names:
                        tape.watch(x)
                    y = forward(x)
                sources = [x if n == "x" else variables[n] for n in names]
                # output_gradients=dy: the gradient of sum(y * dy) without computing that sum
                # and its own gradient (two passes over y, 0.8 ms of a SimpleRNN step here),
                # as the PyTorch contender's grad_outputs=dy does. Returned: nothing is pruned.
                return y, tape.gradient(y, sources, output_gradients=tf.cast(dy, y.dtype))
        else:
            @tf.function(jit_compile=False)
            def step(x, dy):
                del dy
                return forward(x), []

        with keras_policy(self.policy(work)), tf.device(device):
            # Traced here, under the contender's policy (a Keras layer may read it when
            # called); the timed calls run the traced graph, with the policy restored.
            step.get_concrete_function(x, dy)

        def run():
            with tf.device(device):
                out = step(x, dy)
            if work.device == "gpu":
                tf.test.experimental.sync_devices()  # the kernels run after step() returns
            return out

        def fetch(raw):
            y, grads = raw
            out = {"y": y.numpy()}
            for name, g in zip(names, grads):
                out[name] = None if g is None else to_keras(name, tf.convert_to_tensor(g).numpy())
            return out

        return Step(run, fetch, "tf")


@contextlib.contextmanager
def keras_policy(name):
    """Keras' global dtype policy set to `name` (None: left as it is) inside the block only,
    restored afterwards even on an error, so that no contender's policy leaks into another's."""
    if name is None:
        yield
        return
    import keras

    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def _identity(name, grad):
    return grad


def _tf_dropout_masks(work):
    """The workload's dropout masks as TF constants, per gate: (input list, recurrent list)."""
    import tensorflow as tf

    return tuple([tf.constant(m) for m in work.dropout_masks[name]]
                 for name in ("input", "recurrent"))


class TfcellsContender(TFContender):
    name = "tfcells"
    label = "tfcells"
    supports_dropout = True

    def unavailable(self):
        try:
            import tfcells  # noqa: F401
        except Exception as e:  # a broken build must show up as a reason, not a crash
            return f"import tfcells failed: {e}"
        return None

    def make_model(self, work):
        import tensorflow as tf
        import tfcells

        fn = getattr(tfcells.ops, work.cell)
        B, H = work.shape.B, work.shape.H
        # 16-bit: states and outputs in work.dtype, float32 weights (the op computes in
        # float32), the fused op as tfcells' layers call it under a mixed policy.
        states = [tf.zeros([B, H], work.dtype)] * (2 if work.cell == "lstm" else 1)
        layers = []
        for layer in range(work.config.layers):
            w = self.layer_weights(work, layer)
            variables = {n: tf.Variable(w[n], name=n, dtype=weight_dtype(work.dtype))
                         for n in ("kernel", "recurrent_kernel", "bias")}
            # The op is told what is frozen; a layer with nothing to train is not recorded.
            wanted = set(work.grads) if layer == work.config.layers - 1 else set()
            frozen = tuple(n for n in variables if n not in wanted)
            layers.append((variables, frozen))

        dropout = {}
        if work.config.dropout:
            masks = _tf_dropout_masks(work)
            dropout = {"input_dropout_mask": tf.stack(masks[0]),
                       "recurrent_dropout_mask": tf.stack(masks[1])}

        def forward(x):
            for variables, frozen in layers:
                x = fn(x, *states, variables["kernel"], variables["recurrent_kernel"],
                       variables["bias"], frozen=frozen, **dropout)[0]
            return x

        return forward, layers[-1][0], _identity


class KerasContender(TFContender):
    name = "keras"
    label = "keras"
    supports_dropout = True
    _LAYERS = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN"}

    def policy(self, work):
        return work.mixed_policy

    def make_model(self, work):
        import keras

        layers = []
        n_in = work.shape.I
        for layer in range(work.config.layers):
            w = self.layer_weights(work, layer)
            rates = {}
            if work.config.dropout:
                rates = {"dropout": DROPOUT_RATE, "recurrent_dropout": DROPOUT_RATE}
            # 16-bit: dtype None, the global mixed policy (policy()): float32 variables,
            # compute and outputs in work.dtype.
            rnn = getattr(keras.layers, self._LAYERS[work.cell])(
                work.shape.H, return_sequences=True,
                dtype=None if work.mixed_policy else work.dtype, **rates)
            rnn.build((work.shape.B, work.shape.T, n_in))
            rnn.set_weights([w["kernel"], w["recurrent_kernel"], w["bias"]])
            if work.config.dropout:
                # The cell applies the workload's masks instead of drawing its own (a
                # SimpleRNNCell takes one mask, the others a list with one per gate).
                masks = _tf_dropout_masks(work)
                if work.cell == "simple_rnn":
                    masks = [m[0] for m in masks]
                rnn.cell.get_dropout_mask = lambda step_input, m=masks[0]: m
                rnn.cell.get_recurrent_dropout_mask = lambda state, m=masks[1]: m
            n_in = work.shape.H
            layers.append(rnn)
        # Freeze the Keras way: flags the optimizer (and trainable_weights) respect.
        top = layers[-1]
        if work.config.stack:
            layers[0].trainable = False
        top.cell.kernel.trainable = "kernel" in work.grads
        top.cell.recurrent_kernel.trainable = "recurrent_kernel" in work.grads
        by_id = {id(getattr(top.cell, n)): n for n in ("kernel", "recurrent_kernel", "bias")}
        variables = {by_id[id(v)]: v for v in top.trainable_weights}
        missing = {n for n in work.grads if n != "x"} ^ set(variables)
        if work.config.train and missing:
            raise RuntimeError(f"keras trainable_weights differ from the config: {missing}")
        training = work.config.train

        def forward(x):
            for rnn in layers:
                x = rnn(x, training=training)
            return x

        return forward, variables, _identity


def _icfo(a):
    """Keras' i,f,c,o gate blocks (last axis) <-> BlockLSTM's i,c,f,o; its own inverse."""
    i, f, c, o = np.split(a, 4, axis=-1)
    return np.concatenate([i, c, f, o], axis=-1)


class BlockLSTMContender(TFContender):
    """tf.raw_ops.BlockLSTM (V1) with TF's registered V1 gradient. Not V2: its registered
    gradient is wrong in TF 2.21."""

    name = "blocklstm"
    label = "tf BlockLSTM"
    cells = ("lstm",)

    def unsupported(self, work):
        if work.mixed_policy:
            return ("a raw op with one dtype for weights and data: no mixed precision "
                    "(float32 weights, 16-bit data), and no bfloat16 kernel")
        if work.dtype != "float32":
            return f"BlockLSTM has no {work.dtype} kernel"
        return super().unsupported(work)

    def make_model(self, work):
        import tensorflow as tf

        T, B, H = work.shape.T, work.shape.B, work.shape.H
        zeros_bh = tf.zeros([B, H], work.dtype)
        zeros_h = tf.zeros([H], work.dtype)  # peephole weights, unused
        layers = []
        for layer in range(work.config.layers):
            w = self.layer_weights(work, layer)
            trainable = layer == work.config.layers - 1
            # Weights kept in BlockLSTM's own gate order, as its user would store them.
            layers.append({n: tf.Variable(_icfo(w[n]), trainable=trainable, name=n)
                           for n in ("kernel", "recurrent_kernel", "bias")})

        def forward(x):
            h = tf.transpose(x, [1, 0, 2])  # BlockLSTM is time-major
            for v in layers:
                w = tf.concat([v["kernel"], v["recurrent_kernel"]], axis=0)  # [I+H, 4H]
                h = tf.raw_ops.BlockLSTM(
                    seq_len_max=tf.constant(T, tf.int64), x=h, cs_prev=zeros_bh,
                    h_prev=zeros_bh, w=w, wci=zeros_h, wcf=zeros_h, wco=zeros_h, b=v["bias"],
                    forget_bias=0.0, cell_clip=-1.0, use_peephole=False).h
            return tf.transpose(h, [1, 0, 2])

        def to_keras(name, grad):
            return grad if name == "x" else _icfo(grad)

        return forward, layers[-1], to_keras


# ---------------------------------------------------------------------------- PyTorch

def _dtype_name(torch_dtype):
    return str(torch_dtype).replace("torch.", "")


def _numpy(t):
    """A torch tensor as NumPy; bfloat16 (which NumPy lacks) as float32, values unchanged."""
    t = t.detach().cpu()
    return (t.float() if _dtype_name(t.dtype) == "bfloat16" else t).numpy()


class TorchContender(Contender):
    """torch.nn.LSTM / GRU / RNN with the workload's weights (torchmap), on the CPU or, with
    --device gpu, on CUDA (cuDNN)."""

    name = "torch"
    label = "PyTorch"

    def unavailable(self):
        try:
            import torch  # noqa: F401
        except Exception as e:
            return f"PyTorch not installed ({type(e).__name__})"
        return None

    def unsupported(self, work):
        if work.device == "gpu":
            import torch

            if not torch.cuda.is_available():
                return f"PyTorch {torch.__version__} sees no CUDA GPU"
        return super().unsupported(work) or self._autocast_unsupported(work)

    @staticmethod
    def _autocast(torch, work):
        """16-bit: the float32 modules run under torch.autocast, as PyTorch's mixed-precision
        training runs them; else a no-op context."""
        if not work.mixed_policy:
            return contextlib.nullcontext()
        return torch.autocast("cuda" if work.device == "gpu" else "cpu",
                              dtype=getattr(torch, work.dtype))

    def _autocast_unsupported(self, work):
        """Why autocast would not run this cell in work.dtype here (a PyTorch that lacks the
        dtype for the device warns and runs float32): a one-step probe of the module."""
        if not work.mixed_policy:
            return None
        import torch

        device = "cuda" if work.device == "gpu" else "cpu"
        try:
            module = getattr(torch.nn, torchmap.MODULES[work.cell])(1, 1, batch_first=True,
                                                                     device=device)
            with self._autocast(torch, work):
                got = module(torch.zeros(1, 1, 1, device=device))[0].dtype
        except Exception as e:
            return f"torch.autocast({device}, {work.dtype}) fails: {type(e).__name__}: {e}"
        if got != getattr(torch, work.dtype):
            return (f"torch.autocast({device}, {work.dtype}) runs nn."
                    f"{torchmap.MODULES[work.cell]} in {_dtype_name(got)} "
                    f"(PyTorch {torch.__version__})")
        return None

    def build(self, work):
        import torch

        # 16-bit: float32 parameters and inputs, autocast to work.dtype inside the forward.
        dtype = getattr(torch, weight_dtype(work.dtype))
        device = "cuda" if work.device == "gpu" else "cpu"
        names = work.grads
        top = work.config.layers - 1
        modules = [torchmap.make_module(torch, work.cell, self.layer_weights(work, layer),
                                        names if layer == top else (), dtype, device)
                   for layer in range(work.config.layers)]
        # The workload's values (16-bit: already rounded to it) as float32, as a PyTorch
        # user's data reaches autocast: torch.from_numpy has no bfloat16.
        x = torch.from_numpy(work.x.astype(weight_dtype(work.dtype))).to(device)
        dy = torch.from_numpy(work.dy.astype(weight_dtype(work.dtype))).to(device)
        params = {n: [getattr(modules[-1], p) for p in torchmap.params_of(work.cell, n)]
                  for n in names if n != "x"}

        def forward(x):
            with self._autocast(torch, work):  # the forward only, as PyTorch's AMP does
                for mod in modules:
                    x, state = mod(x)
            return x, state

        if work.config.train:
            def compute():
                xin = x.detach().requires_grad_("x" in names)
                y, state = forward(xin)
                sources = [xin] if "x" in names else []
                sources += [p for n in names if n != "x" for p in params[n]]
                # grad_outputs=dy: the gradient of sum(y * dy), as the TF contenders take it
                # (in y's dtype: 16-bit under autocast).
                return y.detach(), state, torch.autograd.grad(y, sources,
                                                              grad_outputs=dy.to(y.dtype))
        else:
            def compute():
                with torch.inference_mode():
                    return (*forward(x), ())

        run = compute
        if device == "cuda" and self.measure is timing.measure:
            def run():  # timed by the wall clock: wait for the GPU
                out = compute()
                torch.cuda.synchronize()
                return out

        def fetch(raw):
            y, state, grads = raw
            h, c = state if work.cell == "lstm" else (state, None)
            out = {"y": _numpy(y), "h_last": _numpy(h[0])}
            if c is not None:
                out["c_last"] = _numpy(c[0])
            grads = [_numpy(g) for g in grads]
            if "x" in names:
                out["x"] = grads.pop(0)
            for n in params:
                out[n] = torchmap.to_keras(work.cell, [grads.pop(0) for _ in params[n]])
            return out

        return Step(run, fetch, "torch", self.measure)


register(TfcellsContender())
register(KerasContender())
register(BlockLSTMContender())
register(TorchContender())
