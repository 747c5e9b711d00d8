"""The Metal source of the score kernel, exactly as MLX generates it, syntax-checked with
clang on a machine without Apple's Metal compiler.

    python -m triattn_mlx.msl_check [--dump DIR]

mx.fast.metal_kernel wraps a kernel's source in a generated signature (inputs, shapes and
the thread-position attributes the source names, in the address spaces it picks) and an
explicit template instantiation. The kernel cannot run without Metal, but exporting a
function that calls it records it, source included, on MLX's CPU and CUDA builds too
(since MLX 0.32, ml-explore/mlx#3650). capture() exports a launch of every instantiation
the package runs (checked_launches) and reads the source back from the export callback:
the text Metal would compile after MLX's preamble. (The kernel call's verbose=True prints
the same text on C++ stdout; export_function itself takes no verbose flag.) check() then
compiles it with clang in two steps:

1. preprocess (the kernel's own macros: prologue, load and key headers; Metal 3.1's
   predefined macros);
2. syntax-check as C++14 (MSL 3 is C++14-based) for arm64 against metal/metal_stdlib_shim.h
   (Metal's scalar and vector types, address spaces and the builtins used here, declared
   with Metal's names and signatures), every template instantiated, no host headers
   (-nostdinc), no exceptions or RTTI.
Between the two, metal_to_clang checks every [[attribute]] against the names Metal knows
(clang would only warn) and that each explicit instantiation's host_name is its kernel's
name, then drops those attributes (Metal accepts them there, C++ does not), and makes
threadgroup variables static (clang refuses automatic variables in an address space).

It catches, in every instantiation checked: misspelled or undeclared builtins, types,
macros and names (a name MLX did not add to the signature, e.g. a misspelled
thread_position_in_grid); unknown attributes; wrong argument counts, and argument types
where the shim is as strict as Metal (address spaces: a device pointer cast or passed as a
thread or constant one; as_type between types of different sizes; an int passed to sqrt);
double; C++ beyond C++14; anything else clang's front end rejects (syntax, const
violations, missing returns, uninitialized variables).
It cannot catch: wrong numbers (the emulator, the GPU parity tests and the self-test do);
Metal-compiler semantics and limits (threadgroup memory over 32 KiB, register pressure,
Metal's own overload rules where the shim is looser: its simd_* and min/max are templates
for any T, bfloat is __fp16-like); anything in MLX's preamble (the shim stands in for it);
run-time failures (pipeline creation, launch limits, out-of-bounds reads). The self-test
on first use (kernels.self_test) catches compile errors and wrong numbers where the kernel
really runs.
"""

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx

from . import kernels

SHIM = kernels.SOURCES / "metal_stdlib_shim.h"
METAL_DEFINES = ["-D__METAL_VERSION__=310", "-D__HAVE_BFLOAT__"]  # what Metal 3.1 predefines, as kernels may test
CLANG_FLAGS = ["-std=c++14", "--target=arm64-apple-macos13", "-nostdinc", "-nostdinc++", "-fno-exceptions",
               "-fno-rtti", "-Wall", "-Wno-unknown-attributes", "-Werror=return-type", "-Werror=uninitialized",
               "-Werror=c++17-extensions", "-Werror=c++20-extensions", "-ferror-limit=20"]

# Attribute names Metal accepts in these kernels: function and argument attributes, the
# thread-position attributes mx.fast.metal_kernel may add, and standard C++ ones.
METAL_ATTRIBUTES = {
    "kernel", "host_name", "buffer", "texture", "sampler", "threadgroup", "stage_in",
    "max_total_threads_per_threadgroup", "visible", "user",
    "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup", "grid_origin", "grid_size", "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup", "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup",
    "thread_execution_width", "thread_index_in_quadgroup", "thread_index_in_simdgroup",
    "thread_index_in_threadgroup", "thread_position_in_grid", "thread_position_in_threadgroup",
    "threadgroup_position_in_grid", "threadgroups_per_grid", "threads_per_grid",
    "threads_per_simdgroup", "threads_per_threadgroup",
    "maybe_unused", "fallthrough", "likely", "unlikely", "nodiscard",
}


def clang():
    """The clang command: clang++ on PATH (Debian: apt-get install clang), else the clang
    inside the `ziglang` wheel (the test extras install it, so CI needs no system package),
    else None. A list of arguments."""
    for name in ("clang++", "clang", *(f"clang++-{v}" for v in range(25, 13, -1))):
        path = shutil.which(name)
        if path:
            return [path]
    if importlib.util.find_spec("ziglang") is not None:
        return [sys.executable, "-m", "ziglang", "clang"]
    return None


def checked_launches():
    """The instantiations checked: every dtype, head_dim and pair layout, the lanes per key
    kernels picks, plain keys with G = 1 and 4 query heads per KV head and 1 and 2 key
    blocks per pass, quantized keys with every bits and group size at G = 4 and 2 blocks
    per pass. (G and ROWS are only loop bounds and array sizes: the other values the
    launches take would cost time and check nothing new.)"""
    return (kernels.example_launches(storages=("plain",))
            + kernels.example_launches(groups=(4,), rows=(2,), storages=("quantized",)))


def capture(sources=kernels.SOURCES, launches=None):
    """{kernel name: the Metal source MLX generates} for `launches` (default: checked_launches()),
    with the kernel built from the files in `sources`."""
    found = {}

    def record(entry):
        if entry.get("type") == "primitive" and entry.get("name") == "CustomKernel":
            name, source = entry["arguments"][:2]
            found[name] = source

    launches = checked_launches() if launches is None else launches
    made = {storage: mx.fast.metal_kernel(**kernels.kernel_spec("metal", storage, sources))
            for storage in {launch.storage for launch in launches}}

    def launch_all(*inputs):  # one export for all: inputs flattened in launch order
        outputs, i = [], 0
        for launch in launches:
            n = len(launch.inputs)
            outputs += made[launch.storage](inputs=list(inputs[i:i + n]), **launch.config)
            i += n
        return outputs

    mx.export_function(record, launch_all, *[x for launch in launches for x in launch.inputs])
    return found


class Result(NamedTuple):
    ok: bool
    kernels: int  # instantiations checked
    message: str  # clang's errors, or a one-line summary


def check(generated, sources=kernels.SOURCES, compiler=None, shim=SHIM):
    """Syntax-check generated Metal sources ({name: source}, from capture) with clang."""
    compiler = compiler or clang()
    if compiler is None:
        return Result(False, 0, "no clang: apt-get install clang, or pip install ziglang")
    # Sources that share a header (one per key storage) go in one translation unit: the
    # header once, then each generated kernel and its instantiation, exactly as generated.
    headers = [kernels.kernel_spec("metal", storage, sources)["header"] for storage in ("plain", "quantized")]
    units = {}
    for name, source in generated.items():
        header = next((h for h in headers if source.startswith(h)), None)
        if header is None:
            return Result(False, 0, f"{name}: the generated source does not start with a kernel header")
        units.setdefault(header, []).append(source[len(header):])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, (header, generated_kernels) in enumerate(units.items()):
            paths.append(Path(tmp) / f"triattention_score_{i}.metal")
            paths[-1].write_text(header + "\n".join(generated_kernels))
        with ThreadPoolExecutor(len(paths)) as pool:
            errors = [e for found in pool.map(lambda p: _compile(compiler, p, shim), paths) for e in found]
    if errors:
        return Result(False, len(generated), "\n".join(errors))
    return Result(True, len(generated), f"{len(generated)} instantiations, {len(units)} units: no errors")


def _compile(compiler, path, shim):
    """clang's errors for one unit ([] when there are none)."""
    expanded = subprocess.run([*compiler, "-E", "-x", "c++", "-nostdinc", "-nostdinc++", *METAL_DEFINES, str(path)],
                              capture_output=True, text=True)
    if expanded.returncode != 0:
        return [expanded.stderr.strip()]
    text, problems = metal_to_clang(expanded.stdout)
    if problems:
        return [f"{path.name}: {p}" for p in problems]
    checked = path.with_suffix(".ii")
    checked.write_text(text)
    run = subprocess.run([*compiler, "-fsyntax-only", "-x", "c++", *CLANG_FLAGS, "-include", str(shim),
                          str(checked)], capture_output=True, text=True)
    return [run.stderr.strip()] if run.returncode != 0 else []


INSTANTIATION = re.compile(r"^template\s*((?:\[\[[^\]]*\]\]\s*)+)(decltype\((\w+)<)", re.M)


def metal_to_clang(text):
    """Preprocessed Metal -> what clang's C++ front end accepts, and the problems found on
    the way: threadgroup variables made static; [[attributes]] checked against Metal's
    names; an explicit instantiation's attributes (a Metal extension), after checking that
    its host_name is the kernel's own name (what MLX looks the kernel up by), dropped."""
    problems = []
    unknown = sorted({a for a in re.findall(r"\[\[\s*(\w+)", text)} - METAL_ATTRIBUTES)
    if unknown:
        problems.append(f"attributes Metal does not know: {', '.join(unknown)}")
    for attributes, _, name in INSTANTIATION.findall(text):
        host = re.search(r'host_name\("([^"]*)"\)', attributes)
        if host is None or host.group(1) != name:
            problems.append(f"{name} is instantiated with host_name {host and host.group(1)!r}")
    text = INSTANTIATION.sub(r"template \2", text)
    text = re.sub(r"(^|[;{}])(\s*)threadgroup\b", r"\1\2static threadgroup", text, flags=re.M)
    return text, problems


def run(sources=kernels.SOURCES, compiler=None):
    """capture + check: the whole pipeline, as the tests and the doctor run it."""
    return check(capture(sources), sources, compiler)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Syntax-check the Metal source of the score kernel with clang.")
    parser.add_argument("--dump", metavar="DIR", help="also write each generated source to DIR/<name>.metal")
    args = parser.parse_args(argv)
    generated = capture()
    if args.dump:
        Path(args.dump).mkdir(parents=True, exist_ok=True)
        for name, source in generated.items():
            (Path(args.dump) / f"{name}.metal").write_text(source)
    result = check(generated)
    print(result.message)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
