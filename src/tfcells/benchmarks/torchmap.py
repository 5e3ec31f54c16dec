"""One layer's Keras-layout weights as torch.nn.LSTM / GRU / RNN parameters, and the gradients
of those parameters back in Keras' layout. Shared by the PyTorch contender (CPU or CUDA) and the
cuDNN contender of the GPU suite, so both load exactly the weights tfcells gets.

Keras: kernel [I, G*H], recurrent_kernel [H, G*H], gate blocks i,f,c,o (LSTM), z,r,h (GRU).
PyTorch: weight_ih [G*H, I], weight_hh [G*H, H] (transposed), gate blocks i,f,g,o (the same)
and r,z,n (GRU: z and r swap). Keras' reset_after GRU has two biases [2, 3H] (input,
recurrent), which are PyTorch's b_ih and b_hh; LSTM and SimpleRNN have one bias, PyTorch two
that are added: b_ih = bias, b_hh = 0, and b_hh is never trained.
"""

import numpy as np

MODULES = {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "RNN"}  # RNN: tanh, as SimpleRNN


def _blocks(cell, a):
    """Keras' gate blocks on the last axis in PyTorch's order; its own inverse."""
    if cell != "gru":
        return a
    z, r, h = np.split(a, 3, axis=-1)
    return np.concatenate([r, z, h], axis=-1)


def to_torch(cell, weights):
    """{PyTorch parameter name: array} of one layer's Keras weights."""
    bias = weights["bias"]
    b_ih, b_hh = (bias[0], bias[1]) if cell == "gru" else (bias, np.zeros_like(bias))
    return {"weight_ih_l0": _blocks(cell, weights["kernel"]).T,
            "weight_hh_l0": _blocks(cell, weights["recurrent_kernel"]).T,
            "bias_ih_l0": _blocks(cell, b_ih), "bias_hh_l0": _blocks(cell, b_hh)}


def params_of(cell, name):
    """The PyTorch parameters behind one Keras weight."""
    return {"kernel": ["weight_ih_l0"], "recurrent_kernel": ["weight_hh_l0"],
            "bias": ["bias_ih_l0", "bias_hh_l0"] if cell == "gru" else ["bias_ih_l0"]}[name]


def to_keras(cell, grads):
    """The Keras-layout gradient of a weight from the gradients of its params_of(), in order."""
    got = [_blocks(cell, g.T if g.ndim == 2 else g) for g in grads]
    return np.stack(got) if len(got) > 1 else got[0]


def make_module(torch, cell, weights, trainable, dtype, device):
    """One batch-first PyTorch layer holding `weights`, whose parameters require a gradient
    only behind the Keras weight names in `trainable`."""
    n_in, units = weights["kernel"].shape[0], weights["recurrent_kernel"].shape[0]
    module = getattr(torch.nn, MODULES[cell])(n_in, units, batch_first=True, dtype=dtype,
                                              device=device)
    wanted = {p for n in trainable if n != "x" for p in params_of(cell, n)}
    with torch.no_grad():
        for name, value in to_torch(cell, weights).items():
            param = getattr(module, name)
            # In place: cuDNN's flat weight buffer stays the parameters' storage.
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)))
            param.requires_grad_(name in wanted)
    return module
