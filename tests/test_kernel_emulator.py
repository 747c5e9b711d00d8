"""The score kernel's shared body, run on CPU threads (tests/emulator/score_kernel.cpp):
the logic the CUDA twin runs on an NVIDIA GPU and the Metal kernel on a Mac, checked on
every machine with a C++20 compiler against a float64 reference, plain and quantized keys."""

import shutil
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).parent / "emulator" / "score_kernel.cpp"


def compiler():
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the kernel emulator")
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"], input="#include <barrier>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} has no C++20 <barrier>: {probe.stderr.strip()[:200]}")
    return cxx


def test_shared_kernel_body_matches_float64_reference_on_cpu_threads(tmp_path):
    binary = tmp_path / "score_kernel"
    build = subprocess.run([compiler(), "-std=c++20", "-O1", "-pthread", str(SOURCE), "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok  ") == SOURCE.read_text().count("ok &= run_case<")
