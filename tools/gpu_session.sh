#!/usr/bin/env bash
# Everything a GPU check needs, in one command, on a GPU machine with PyTorch and nvcc but no
# TensorFlow (such as the project's lent device machine): build the kernel modules with CMake,
# run the CUDA tests (CUDA vs CPU kernels, vs cuDNN) and the GPU benchmark suite. Logs, JSON
# and the plot go to $OUT (or ./gpu-out).
#
# Python packages the machine lacks (scipy-openblas32, for the CPU kernels the tests compare
# against) can come as wheels in .whl/ (see the device tool's README, "carry wheels"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# Extra arguments go to the benchmark, e.g. tools/gpu_session.sh --tf32 or --full.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
python=$(command -v python3 || command -v python)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tfcells-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/tfcells-site
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1

cmake -S . -B build/gpu -G Ninja -DSKBUILD_PROJECT_VERSION=0.1.0 -DTFCELLS_BUILD_TF_OPS=OFF \
  -DTFCELLS_WITH_CUDA=ON -DPython_EXECUTABLE="$python" > "$out/build.log" 2>&1 &&
  cmake --build build/gpu >> "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }

export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" TFCELLS_CUDA_MODULE_DIR=build/gpu
export PYTHONUNBUFFERED=1
"$python" -m pytest tests/test_cuda.py -q -rs 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
"$python" -m benchmarks --device gpu --no-progress --json "$out/gpu.json" \
  --plot "$out/gpu.png" "$@" 2>&1 | tee "$out/bench.md"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
exit $((tests || bench))
