import os

import pytest

# Keep TensorFlow's start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The tests hold float32 kernels to float32 tolerances. On a GPU with TensorFlow, tfcells' kernels
# follow TensorFlow's TF32 setting (on by default from Ampere on), which rounds GEMM operands to
# 10 mantissa bits: off here. TF32 itself is tested on its own (test_cuda.py).
os.environ.setdefault("TFCELLS_CUDA_TF32", "0")

# What pytest says for a skip given no reason.
_NO_REASON = ("Skipped", "Skipped: unconditional skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip must say why (`pytest -rs` lists the reasons; README: Skipped tests): one
    without a reason fails."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) \
            and report.longrepr[2].strip() in _NO_REASON:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} skipped without a reason: give pytest.skip, "
                           "skipif or importorskip one")
