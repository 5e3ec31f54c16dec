"""Makes one ISA level's kernels safe to link beside the other levels' (cmake/cpu_levels.cmake).

Every translation unit that uses an inline function or a template outside the level's
namespace (std::min, std::function's helpers, ...) emits a weak copy of it, and the linker keeps
one copy for the whole library: possibly the AVX-512 one, then called from the AVX2 or generic
code on a CPU without AVX-512. Renaming this object's weak functions (suffix: the level) keeps
its copies its own. It also refuses static initialisers: they run at load on every CPU.

usage: isolate_level_object.py --nm NM --objcopy OBJCOPY --objdump OBJDUMP --level ID
                               [--allow-constructors] IN.o OUT.o
"""

import argparse
import subprocess
import sys


def main():
    p = argparse.ArgumentParser()
    for tool in ("nm", "objcopy", "objdump"):
        p.add_argument("--" + tool, required=True)
    p.add_argument("--level", required=True)
    p.add_argument("--allow-constructors", action="store_true",
                   help="sanitizer builds: ASan registers each object's globals at load")
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()

    headers = subprocess.run([a.objdump, "-h", a.input], check=True, capture_output=True,
                             text=True).stdout
    sections = {line.split()[1] for line in headers.splitlines()
                if line.split() and line.split()[0].isdigit()}
    constructors = sections & {".init_array", ".ctors", ".preinit_array"}
    if constructors and not a.allow_constructors:
        sys.exit(f"{a.input}: a static initialiser ({', '.join(sorted(constructors))}) in code "
                 f"compiled for ISA level {a.level}; it would run at load on every CPU. Move "
                 "it to code compiled once (csrc/core/cpu/cpu_rnn.cc) or make it constant.")

    symbols = subprocess.run([a.nm, "-P", "--defined-only", a.input], check=True,
                             capture_output=True, text=True).stdout
    # Weak functions, and the signatures of the COMDAT groups that hold constructors and
    # destructors (type n: the group of C1/C2 is named by C5, D1/D2 by D5). A group keeps its
    # signature's name: left as it is, the linker would keep one group of that name for the
    # whole library and drop this level's renamed copies with the others, leaving calls to them
    # unresolved (seen: a std::string constructor from a literal, called through address 0).
    fields = [line.split() for line in symbols.splitlines()]
    renamed = [f[0] for f in fields
               if len(f) >= 2 and (f[1] == "W" or (f[1] == "n" and f[0].startswith("_Z")))]
    renames = "".join(f"{name} {name}.tfcells_{a.level}\n" for name in renamed)
    rename_file = a.output + ".renames"
    with open(rename_file, "w") as f:
        f.write(renames)
    subprocess.run([a.objcopy, "--redefine-syms=" + rename_file, a.input, a.output], check=True)


if __name__ == "__main__":
    main()
