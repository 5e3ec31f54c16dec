#!/usr/bin/env bash
# The whole GPU check in one command, for a bare GPU machine with PyTorch (CUDA), nvcc, CMake and
# pybind11 but no TensorFlow (such as the project's lent H100/H200): probe the machine, build the
# kernel modules with CMake alone, run the highest-signal CUDA tests first, then the rest, then
# compute-sanitizer's memcheck on a small forward and backward of every cell, then the GPU
# benchmark suite against cuDNN (float32), a profile (tools/gpu_profile.py), and the suite on
# tensor cores. Every stage has a time budget, and the stages together end within
# TFCELLS_SESSION_BUDGET_S (default 470 s, under 8 minutes). On an H200 (2026-12-04) the whole
# took 395 s: build 69, tests 63, bench 66, profile 21, tensor cores 152; with a machine's start
# (60-90 s) that leaves no room for a second full run in 15 minutes of device time, so rerun only
# the stages that failed.
#
# Everything goes to $OUT (default ./gpu-out), at most 8 files (the device tool brings back 8):
#   summary.txt  one line per stage: ok / FAILED / TIMED OUT / not run, with its time
#   probe.txt    nvidia-smi, nvcc, CMake, Python headers, PyTorch, the cuBLAS PyTorch loaded
#   build.log    CMake configure and build
#   tests.log    pytest: tests/test_cuda.py's comparisons first, then the rest
#   memcheck.log compute-sanitizer --tool memcheck over tools/memcheck_driver.py
#   bench.md     the GPU suite's table (float32), then TF32, float16 and bfloat16 tables;
#                gpu.json the float32 run's records
#   profile.txt  tools/gpu_profile.py: host against GPU time per step, kernels, CUDA graphs
#                on and off
#
# Tests run with TFCELLS_REQUIRE_GPU=1: a test that cannot run for want of a GPU, the CUDA
# module, PyTorch or cuBLAS fails, so a broken set-up cannot pass green. Exit status: 0 when
# every stage passed, else 1.
#
# Python packages the machine lacks (scipy-openblas32, for the CPU kernels the tests compare
# against) can come as wheels in .whl/ (the device tool's README, "carry wheels"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl scipy-openblas32
# Extra arguments go to the benchmark, e.g. tools/gpu_session.sh --tf32.
# PYTHON picks the interpreter (default python3); TFCELLS_SESSION_BUDGET_S the total budget.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${PYTHON:-$(command -v python3 || command -v python)}
budget=${TFCELLS_SESSION_BUDGET_S:-470}
summary="$out/summary.txt"
: > "$summary"
failed=0

note() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP LATER LOG CMD...: runs CMD with its output appended to LOG (and shown), for at
# most CAP seconds and never into the LATER seconds kept for the stages after it.
stage() {
  local name=$1 cap=$2 later=$3 log=$4
  shift 4
  local left=$((budget - SECONDS - later))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    note "$name: not run (no time left in the ${budget} s budget)"
    failed=1
    return 1
  fi
  echo "=== $name (at most ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$log"
  local start=$SECONDS rc
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    note "$name: ok (${took} s)"
  elif ((rc == 124 || rc == 137)); then
    note "$name: TIMED OUT after ${took} s (limit ${limit} s)"
    failed=1
  else
    note "$name: FAILED, exit status $rc (${took} s; see $(basename "$log"))"
    failed=1
  fi
  return "$rc"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tfcells-site \
    .whl/*.whl || { note "wheels: FAILED to install .whl/*.whl"; exit 1; }
  export PYTHONPATH=/tmp/tfcells-site${PYTHONPATH:+:$PYTHONPATH}
fi
# nvcc and compute-sanitizer live in the toolkit's bin/, which may not be on the PATH.
for dir in /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  [[ -d $dir ]] && PATH="$PATH:$dir"
done
export PATH

# --- probe --------------------------------------------------------------------------------
probe() {
  echo "date: $(date -u)  host: $(uname -srm)  cores: $(nproc)"
  echo "--- nvidia-smi"
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>/dev/null
  echo "--- nvcc";  nvcc --version || echo "nvcc: NOT FOUND"
  echo "--- cmake"; cmake --version | head -1 || echo "cmake: NOT FOUND"
  echo "--- ninja"; ninja --version 2>/dev/null || echo "ninja: not found (make is used)"
  echo "--- compute-sanitizer"
  if command -v compute-sanitizer; then compute-sanitizer --version | tail -1
  else echo "compute-sanitizer: not found (the memcheck stage will fail)"; fi
  echo "--- python"
  "$python" - <<'EOF'
import importlib, os, sys, sysconfig
print(sys.executable, sys.version.split()[0])
inc = sysconfig.get_paths()["include"]
headers = os.path.exists(os.path.join(inc, "Python.h"))
print(f"Python headers: {inc} ({'found' if headers else 'MISSING: the build needs Python.h'})")
missing = [] if headers else ["Python.h"]
for name in ("pybind11", "scipy_openblas32", "numpy", "pytest", "torch", "cupy", "matplotlib",
             "tensorflow"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: not importable ({type(e).__name__}: {e})")
        if name in ("pybind11", "scipy_openblas32", "numpy", "pytest"):
            missing.append(name)
try:
    import torch
    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"GPU available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
        a = torch.ones(64, 64, device="cuda")
        (a @ a).sum().item()  # loads cuBLAS, if it was not yet
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "libcublas" in line})
        print("libcublas loaded by PyTorch:", *libs or ["none"])
except ImportError:
    pass
sys.exit(f"missing for the build or the tests: {', '.join(missing)}" if missing else 0)
EOF
  local rc=$?
  command -v nvcc > /dev/null && command -v cmake > /dev/null && return $rc
  echo "nvcc or cmake missing"; return 1
}
export -f probe
export python
# The LATER argument of each stage: what the stages after it need at least (build 150, gpu 10,
# tests 60 + 30, memcheck 40, bench 60, profile 60, bench-tensor-cores 60 s); a stage that runs
# short leaves its time to them.
stage probe 40 410 "$out/probe.txt" bash -c probe
probe_ok=$?

# --- build --------------------------------------------------------------------------------
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
arch=${arch:-90}  # no GPU to ask (a rehearsal): Hopper
generator=$(command -v ninja > /dev/null && echo Ninja || echo "Unix Makefiles")
build() {
  cmake -S . -B build/gpu -G "$generator" -DSKBUILD_PROJECT_VERSION=0.1.0 \
    -DTFCELLS_BUILD_TF_OPS=OFF -DTFCELLS_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    -DPython_EXECUTABLE="$python" && cmake --build build/gpu -j "$(nproc)"
}
export -f build
export generator arch
stage build 330 260 "$out/build.log" bash -c build
build_ok=$?
((probe_ok == 0)) || echo "(the probe failed: see probe.txt)"

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TFCELLS_CUDA_MODULE_DIR="$PWD/build/gpu"
export PYTHONUNBUFFERED=1 TFCELLS_REQUIRE_GPU=1

if ((build_ok != 0)); then
  for name in gpu tests-first tests-rest memcheck bench; do note "$name: not run (build failed)"; done
  note "total: $SECONDS s"
  exit 1
fi

# --- what the kernels will run on -----------------------------------------------------------
stage gpu 20 250 "$out/tests.log" "$python" -c '
import sys
sys.path.insert(0, "build/gpu")
import _tfcells_cuda as m
print("CUDA versions:", m.cuda_versions())
try:
    import torch  # its cuBLAS, as in the tests
except ImportError:
    pass
count = m.device_count()  # raises, with the CUDA error, on a broken set-up
print("GPUs:", count)
if count == 0:
    sys.exit("no GPU: every GPU test below fails (TFCELLS_REQUIRE_GPU=1)")
print("cuBLAS used by tfcells:", m.cublas_library())
'

# --- tests ----------------------------------------------------------------------------------
pytest_args=(-q -rfE -p no:cacheprovider --durations=10 -o faulthandler_timeout=120)
if "$python" -c "import xdist" 2> /dev/null; then
  pytest_args+=(-n 4)  # the comparisons are small calls, mostly host-bound: 4 processes
fi
first="random_shapes or empty_dimensions or larger or matches_cudnn or two_streams"
stage tests-first 170 190 "$out/tests.log" "$python" -m pytest "${pytest_args[@]}" \
  tests/test_cuda.py -k "$first"
stage tests-rest 120 160 "$out/tests.log" "$python" -m pytest "${pytest_args[@]}" \
  tests/test_cuda.py tests/test_gpu_bench.py -k "not ($first)"

# --- compute-sanitizer ----------------------------------------------------------------------
if command -v compute-sanitizer > /dev/null; then
  stage memcheck 90 120 "$out/memcheck.log" compute-sanitizer --tool memcheck \
    --error-exitcode 9 --print-limit 100 "$python" tools/memcheck_driver.py
else
  note "memcheck: FAILED, compute-sanitizer not found (looked on PATH and in /usr/local/cuda)"
  failed=1
fi

# --- the GPU suite against cuDNN ------------------------------------------------------------
stage bench 150 120 "$out/bench.md" "$python" -m benchmarks --device gpu --no-progress \
  --json "$out/gpu.json" "$@"

# --- where a step's time goes, and whole-call CUDA graphs on and off (tools/gpu_profile.py) --
stage profile 120 60 "$out/profile.txt" "$python" tools/gpu_profile.py

# --- the same on tensor cores: TF32, float16, bfloat16 (tables appended to bench.md) ---------
# On the H200 (2026-12-04) each took 30-55 s; there the step is bound by its launches, not by
# its GEMMs, so these are the numbers that show work on the time loop's launches.
tensor_cores() {
  local rc=0
  for flags in "--tf32" "--dtype float16" "--dtype bfloat16"; do
    echo; echo "=== python -m benchmarks --device gpu $flags"
    # shellcheck disable=SC2086  # two words each
    "$python" -m benchmarks --device gpu --no-progress $flags || rc=1
  done
  return $rc
}
export -f tensor_cores
stage bench-tensor-cores 180 0 "$out/bench.md" bash -c tensor_cores

note "total: $SECONDS s of ${budget} s"
exit $failed
