"""MultiWorkerMirroredStrategy with two worker processes on the loopback.

A model with a frozen tfcells.LSTM under a trainable tfcells.GRU is trained for an epoch by
two worker processes (one CPU replica each, TF_CONFIG on 127.0.0.1) and by this process alone
on the same global batches (tests/multi_worker_fit.py: a custom training loop, as Keras 3's
fit() does not run under this strategy). In float64 the two differ only in the order the
gradients are summed (each replica's half batch, then the all-reduce): the trained weights
agree to 1e-10, far below what one wrong half batch or a missed all-reduce changes (~1e-3),
and the frozen weights are bit-identical (no update at all). The kernels' counters show the
frozen layer's backward never ran on a worker.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

import multi_worker_fit

TIMEOUT_S = 120
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multi_worker_fit.py")
N, T, I = 24, 5, 3
STEPS = N // 8  # multi_worker_fit.GLOBAL_BATCH


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _data(path):
    rng = np.random.default_rng(0)
    # The model's weights, in model.get_weights() order: LSTM(5) on I=3, GRU(4), Dense(1).
    shapes = [(I, 20), (5, 20), (20,), (5, 12), (4, 12), (2, 12), (4, 1), (1,)]
    weights = {f"w{k}": rng.normal(size=s) * 0.5 for k, s in enumerate(shapes)}
    np.savez(path, x=rng.normal(size=(N, T, I)), y=rng.normal(size=(N, 1)), **weights)
    return weights


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(args_list, meanwhile):
    """Runs the worker processes together, and `meanwhile` here while they start; each
    worker is killed if it outlives TIMEOUT_S."""
    procs = [subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=_env())
             for args in args_list]
    logs = []
    try:
        meanwhile()
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0 and "WORKER-OK" in log, log[-4000:]


def test_two_workers_match_one_process(tmp_path):
    data = str(tmp_path / "data.npz")
    initial = _data(data)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": k}})
               for k in range(2)]
    multi, single = str(tmp_path / "multi.npz"), str(tmp_path / "single.npz")
    _run([[data, multi, c] for c in configs],
         meanwhile=lambda: multi_worker_fit.main(data, single))  # the reference, alone
    multi, single = np.load(multi), np.load(single)
    for k in range(3):  # the frozen LSTM: untouched, bit for bit, in both runs
        np.testing.assert_array_equal(multi[f"w{k}"], initial[f"w{k}"])
        np.testing.assert_array_equal(single[f"w{k}"], initial[f"w{k}"])
    for k in range(3, 8):  # the GRU and the head trained, alike
        assert not np.allclose(multi[f"w{k}"], initial[f"w{k}"], rtol=0, atol=1e-3), k
        np.testing.assert_allclose(multi[f"w{k}"], single[f"w{k}"], rtol=1e-10, atol=1e-12)
    # Worker 0 ran its replica's half of every step: the LSTM forward only, the GRU backward
    # without dx (nothing below it trains), and no LSTM backward.
    assert int(multi["work_forward_calls"]) == 2 * STEPS
    assert int(multi["work_backward_calls"]) == STEPS
    assert int(multi["work_grad_x"]) == 0 and int(multi["work_grad_kernel"]) == STEPS
