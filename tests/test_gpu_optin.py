"""tfcells' TensorFlow GPU kernels are opt-in (TFCELLS_GPU_KERNELS=1) until they have run inside
TensorFlow on a GPU (their CUDA kernels have passed through the pybind11 module).

Without the opt-in, a tfcells layer on a machine where TensorFlow sees a GPU runs Keras' own
implementation (cuDNN where Keras uses it), says why in `fused_unsupported_reason`, and warns
once. Tested here, on a CPU, by making the loader believe a GPU is visible.
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

import tfcells  # noqa: E402
from tfcells import _loader  # noqa: E402
from tfcells.testing import work_counters  # noqa: E402

OPT_IN = _loader.gpu_kernels_reason(opted_in=False, tf_cuda_build=True, tf_cuda_version="12.5.1",
                                    built_cuda=True, built_cuda_version="12.8.93",
                                    library_exists=True)


def test_load_decision():
    """Which reason the loader gives, case by case (None: the GPU kernels are loaded)."""
    def reason(**override):
        args = dict(opted_in=True, tf_cuda_build=True, tf_cuda_version="12.5.1",
                    built_cuda=True, built_cuda_version="12.8.93", library_exists=True)
        return _loader.gpu_kernels_reason(**{**args, **override})

    assert reason() is None
    assert "TFCELLS_GPU_KERNELS=1" in reason(opted_in=False) and "opt-in" in OPT_IN
    assert "not a CUDA build" in reason(tf_cuda_build=False)
    assert "no CUDA kernels" in reason(built_cuda=False)
    assert "no CUDA kernels" in reason(library_exists=False)
    # A CUDA 13 build would need a driver for CUDA 13 beside TensorFlow's CUDA 12.
    assert "CUDA 12's nvcc" in reason(built_cuda_version="13.0.88")
    assert reason(tf_cuda_version="") is None  # a CUDA build that does not say: load


def test_opt_in_is_read_from_the_environment_at_import():
    """TFCELLS_GPU_KERNELS is read when tfcells is imported (here tensorflow-cpu: the
    kernels stay unloaded either way, for the first reason that applies)."""
    code = ("from tfcells import _loader; "
            "print(_loader.gpu_kernels_unavailable); print(_loader.gpu_c_library)")
    for value in ("1", "0"):
        env = dict(os.environ, TFCELLS_GPU_KERNELS=value, TF_CPP_MIN_LOG_LEVEL="2")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        why, library = run.stdout.strip().splitlines()[-2:]
        assert library == "None"
        if tf.test.is_built_with_cuda():  # pragma: no cover - a CUDA TensorFlow
            assert ("opt-in" in why) == (value != "1"), why
        else:
            assert why == "TensorFlow is not a CUDA build"


@pytest.fixture
def on_a_gpu(monkeypatch):
    """The loader sees a GPU and has not loaded tfcells' GPU kernels for want of the opt-in;
    the one-time warning not yet given."""
    monkeypatch.setattr(_loader, "_gpu_visible", lambda: True)
    monkeypatch.setattr(_loader, "gpu_kernels_unavailable", OPT_IN)
    monkeypatch.setattr(_loader, "_warned", False)


def test_layers_fall_back_to_keras_on_a_gpu_without_the_opt_in(on_a_gpu):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3)).astype("float32")
    for cls, keras_cls in ((tfcells.LSTM, keras.layers.LSTM), (tfcells.GRU, keras.layers.GRU),
                           (tfcells.SimpleRNN, keras.layers.SimpleRNN)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = cls(4, return_sequences=True)
            reason = layer.fused_unsupported_reason()
        assert reason is not None and "TFCELLS_GPU_KERNELS=1" in reason, reason
        reference = keras_cls(4, return_sequences=True)
        reference.build(x.shape)
        layer.build(x.shape)
        layer.set_weights(reference.get_weights())
        before = work_counters()
        y = layer(x)
        assert work_counters() == before, f"{cls.__name__} ran the fused op"
        np.testing.assert_allclose(y.numpy(), reference(x).numpy(), rtol=1e-6, atol=1e-6)
        # use_fused=True cannot fall back: it says why instead.
        strict = cls(4, use_fused=True)
        with pytest.raises(ValueError, match="TFCELLS_GPU_KERNELS=1"):
            strict(x)
        messages = [str(w.message) for w in caught if "tfcells" in str(w.message)]
        if cls is tfcells.LSTM:  # once per process: the first layer warns, no other does
            assert len(messages) == 1 and "TFCELLS_GPU_KERNELS=1" in messages[0], messages
            assert "Keras' own implementation" in messages[0]
        else:
            assert messages == [], messages


def test_no_gpu_or_kernels_loaded_changes_nothing(monkeypatch):
    """Without a visible GPU (this machine), or with tfcells' GPU kernels loaded, the fused op
    runs as before and nothing warns."""
    monkeypatch.setattr(_loader, "_warned", False)
    x = np.ones((2, 3, 4), "float32")
    for visible, unavailable in ((False, OPT_IN), (True, None)):
        monkeypatch.setattr(_loader, "_gpu_visible", lambda: visible)
        monkeypatch.setattr(_loader, "gpu_kernels_unavailable", unavailable)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            layer = tfcells.LSTM(3)
            assert layer.fused_unsupported_reason() is None
            before = work_counters()
            layer(x)
        assert work_counters() != before
