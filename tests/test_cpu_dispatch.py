"""Run-time CPU dispatch: the CPU kernels are compiled once per ISA level and the best level
this machine runs is chosen at load (TFCELLS_CPU_ISA caps it). The value checks run under every
level this machine supports, each in its own process (the level is chosen at load)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import tfcells
from tfcells import _tfcells_core as core

TESTS = os.path.dirname(os.path.abspath(__file__))
BUILT = core.cpu_isas_built()
RUNNABLE = core.cpu_isas()

# A representative set of op and layer value checks: every cell and layout against float64
# references, the parallel paths (batch shards, split steps), the NumPy module with and without
# dropout against the op, the step GEMM's row and column remainders, the layers against Keras.
# The core self-test covers each level in depth (finite differences, every gradient mask).
VALUE_TESTS = [
    "test_ops.py::test_values_and_gradients_float32",
    "test_ops.py::test_parallel_paths",
    "test_ops.py::test_core_module_matches_op",
    "test_ops.py::test_core_module_with_dropout_matches_op",
    "test_step_gemm.py::test_products_match_numpy",
    "test_layers.py::test_matches_keras_values_and_gradients",
    "test_reduced_precision.py::test_16bit_is_the_float32_pass_rounded",
    "test_cpu_dispatch.py::test_build_info_reports_the_level",
]


def run_python(args, level, timeout=900):
    env = dict(os.environ, TFCELLS_CPU_ISA=level)
    return subprocess.run([sys.executable, *args], env=env, cwd=TESTS, capture_output=True,
                          text=True, timeout=timeout)


def _intel_cpu():
    with open("/proc/cpuinfo") as f:
        return any(line.split(":", 1)[1].strip() == "GenuineIntel"
                   for line in f if line.startswith("vendor_id"))


def test_build_info_reports_the_level():
    info = tfcells.build_info()
    assert info["cpu_isas"] == RUNNABLE
    assert RUNNABLE and set(RUNNABLE) <= set(BUILT)
    assert RUNNABLE == [level for level in BUILT if level in RUNNABLE]  # lowest first
    # The level asked for, else the best this machine runs.
    assert info["cpu_isa"] == (os.environ.get("TFCELLS_CPU_ISA") or RUNNABLE[-1])
    # bfloat16 calls multiply bfloat16 pairs on AMX tiles, and with AVX512_BF16's dot product
    # off Intel's CPUs (where it is no faster than float32's FMAs).
    pairs = info["cpu_isa"] == "amx" or (info["cpu_isa"] == "avx512-bf16" and not _intel_cpu())
    assert info["cpu_bf16_products"] == pairs


@pytest.mark.parametrize("level", BUILT)
def test_values_under_every_level(level):
    if level not in RUNNABLE:
        pytest.skip(f"this machine cannot run the {level} kernels (it runs {RUNNABLE})")
    result = run_python(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *VALUE_TESTS],
                        level)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)
    assert "skipped" not in result.stdout.splitlines()[-1]


def test_unknown_level_is_a_clear_error():
    result = run_python(["-c", "import tfcells"], "x86-64-v9", timeout=300)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: tfcells: TFCELLS_CPU_ISA=x86-64-v9 is not a CPU "
                              "level of this build"), message
    assert "valid choices: " + ", ".join(BUILT) in message
    assert "this machine runs: " + ", ".join(RUNNABLE) in message


def test_unsupported_level_is_a_clear_error():
    missing = [level for level in BUILT if level not in RUNNABLE]
    if not missing:
        pytest.skip(f"this machine runs every level of the build ({BUILT})")
    result = run_python(["-c", "import tfcells"], missing[-1], timeout=300)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"ImportError: tfcells: TFCELLS_CPU_ISA={missing[-1]}: this "
                              "machine lacks "), message
    assert "this machine runs: " + ", ".join(RUNNABLE) in message


# --- nothing compiled for a higher level is reachable from generic code --------------------
# Level of a function by its name: the level's namespace (tfcells::isa_x86_64_v3::...) or the
# suffix cmake/isolate_level_object.py gives the weak functions of a level's objects.
LEVEL_TAG = re.compile(r"isa_(x86_64_v4|x86_64_v3|x86_64|avx512_bf16|amx|native|generic)")
# The first byte of an instruction after the prefixes that may precede VEX/EVEX: in 64-bit
# mode c4/c5 always start a VEX instruction (AVX, AVX2, FMA, ...) and 62 an EVEX one (AVX-512).
PREFIXES = {"67", "26", "2e", "36", "3e", "64", "65"}
VEX, EVEX = {"c4": "VEX", "c5": "VEX"}, {"62": "EVEX"}
RULES = {  # level -> encodings its functions may not contain
    None: {**VEX, **EVEX},  # generic code: baseline x86-64
    "x86_64": {**VEX, **EVEX},
    "x86_64_v3": EVEX,
}


def offending_functions(disassembly, rules):
    """Functions holding instructions their level may not use (rules: level -> encodings)."""
    bad, function, forbidden = {}, None, {}
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
            tag = LEVEL_TAG.search(function)
            forbidden = rules.get(tag.group(1) if tag else None, {})
            continue
        parts = line.split("\t")
        if len(parts) < 3 or not forbidden:
            continue
        for byte in parts[1].split():
            if byte not in PREFIXES:
                if byte in forbidden:
                    bad.setdefault(function, f"{forbidden[byte]}: {parts[2].strip()}")
                break
    return bad


def build_tree_files(*names):
    """Paths of these files in the build tree (skips the test when it is gone)."""
    from tfcells import _build_info

    paths = [os.path.join(_build_info.BUILD_DIR, name) for name in names]
    if not all(os.path.exists(path) for path in paths):
        pytest.skip(f"the build tree {_build_info.BUILD_DIR} is gone")
    return paths


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_generic_code_has_no_higher_level_instructions():
    """Disassembles the op library as linked (every level of the core, the dispatcher, the
    bindings, every std:: function the linker kept) and the static libraries behind the NumPy
    module (pybind11 strips the module itself): outside the level namespaces no VEX or EVEX
    instruction, none in the x86-64 level, no EVEX in x86-64-v3. A linker-merged inline
    function compiled for AVX-512 and kept for generic code would show here. The build tree's
    copies are read: the installed libraries are stripped of the local symbols this needs."""
    for library in build_tree_files("_tfcells_ops.so", "libtfcells_core.a",
                                    "libtfcells_bench.a"):
        disassembly = subprocess.run(["objdump", "-d", "-w", library], capture_output=True,
                                     text=True, check=True).stdout
        bad = offending_functions(disassembly, RULES)
        assert not bad, f"{library}: " + "; ".join(f"{f} ({i})" for f, i in list(bad.items())[:10])
        # The check sees what it looks for: the levels above x86-64 do use VEX.
        if "x86-64-v3" in BUILT:
            assert offending_functions(disassembly, {"x86_64_v3": VEX}), library


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils)")
def test_every_level_symbol_is_defined():
    """The build renames each level's weak functions and the COMDAT groups that hold them
    (cmake/isolate_level_object.py). A group left with its old name is dropped by the linker in
    favour of another level's, and the renamed copy it held is then missing: an undefined weak
    symbol, called through address 0 (seen with a std::string constructor under ASan)."""
    (library,) = build_tree_files("_tfcells_ops.so")
    undefined = subprocess.run(["nm", "--undefined-only", library], capture_output=True,
                               text=True, check=True).stdout
    missing = [line.split()[-1] for line in undefined.splitlines() if ".tfcells_isa_" in line]
    assert not missing, f"{library}: undefined level symbols: {missing[:5]}"
