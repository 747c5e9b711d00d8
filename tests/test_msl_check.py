"""The Metal source MLX generates for the score kernel, syntax-checked with clang against a
shim of Metal's standard library (triattn_mlx/msl_check.py): every instantiation the
package launches passes, and a copy of the sources with one mistake fails, through the
same pipeline (capture by export, clang)."""

import os
import shutil

import mlx.core as mx
import pytest

from triattn_mlx import kernels, msl_check


@pytest.fixture(scope="module")
def compiler():
    command = msl_check.clang()
    if command is None:
        # The test extras install ziglang (a clang): in CI a missing compiler is a failure.
        assert not os.environ.get("CI"), "no clang in CI: the test extras should have installed ziglang"
        pytest.skip("no clang to check the Metal source with (apt-get install clang, or pip install ziglang)")
    return command


def test_every_launched_instantiation_passes(compiler):
    launches = msl_check.checked_launches()
    generated = msl_check.capture(launches=launches)
    assert len(generated) == len(launches)  # one kernel per instantiation, none merged
    result = msl_check.check(generated, compiler=compiler)
    assert result.ok, result.message
    assert result.kernels == len(launches)
    templates = {tuple(launch.config["template"]) for launch in launches}
    for storage, dims in [("plain", ("T", "D", "HALF", "SUB")), ("quantized", ("T", "D", "HALF", "BITS", "GS"))]:
        seen = {tuple(dict(t)[d] for d in dims) for t in templates if (dict(t).get("BITS") is not None)
                == (storage == "quantized")}
        # every dtype x head_dim x pair layout (x bits x group size), at kernels' lanes per key
        assert len(seen) == (18 if storage == "plain" else 3 * 2 * 3 * (2 + 3 + 3)), storage


def test_capture_is_the_source_metal_kernel_prints(capfd):
    """The export callback's source is the text kernel(..., verbose=True) prints."""
    launch = kernels.example_launches(groups=(4,), rows=(2,), storages=("quantized",))[0]
    kernel = mx.fast.metal_kernel(**kernels.kernel_spec("metal", "quantized"))
    (generated,) = msl_check.capture(launches=[launch]).values()
    capfd.readouterr()
    mx.export_function(lambda entry: None, lambda *x: kernel(inputs=list(x), verbose=True, **launch.config),
                       *launch.inputs)
    printed = capfd.readouterr().out
    assert generated.strip() in printed


# A plain and a quantized instantiation of each pair layout: enough to reach every line.
def few_launches():
    launches = kernels.example_launches(groups=(4,), rows=(2,), group_sizes=(64,), bits=(4,))
    return [launch for launch in launches
            if dict(launch.config["template"])["D"] == 128 and dict(launch.config["template"])["T"] == mx.bfloat16]


MISTAKES = {
    # file, text, replaced by, what clang (or the pipeline) says
    "misspelled_shuffle": ("prologue.metal", "simd_shuffle_xor(", "simd_shufle_xor(", "simd_shufle_xor"),
    "misspelled_barrier": ("prologue.metal", "threadgroup_barrier(", "threadgroup_barier(", "threadgroup_barier"),
    "misspelled_memory_flag": ("prologue.metal", "mem_flags::mem_threadgroup", "mem_flags::mem_threadgrp",
                               "mem_threadgrp"),
    "misspelled_thread_attribute": ("prologue.metal", "thread_position_in_grid.y", "thread_position_in_gird.y",
                                    "thread_position_in_gird"),  # MLX adds no argument for it
    "cuda_spelling_of_sqrt": ("prologue.metal", "metal::sqrt", "sqrtf", "sqrtf"),
    "address_space_dropped": ("loads.metal.h", "const device uint4*", "const uint4*", "is not allowed"),
    "as_type_between_sizes": ("loads.metal.h", "as_type<half>((ushort)h)", "as_type<half>(h)", "sizes differ"),
    "double": ("loads.metal.h", "return as_type<float>(u);", "return (double)as_type<float>(u);", "double"),
    "int_to_sqrt": ("triattention_score.body", "SQRT(re[r][p] * re[r][p] + im[r][p] * im[r][p])", "SQRT(p)",
                    "ambiguous"),
    "cxx17": ("triattention_score.body", "if (HALF) {", "if constexpr (HALF) {", "C++17"),
}


@pytest.mark.parametrize("mistake", ["none", *MISTAKES])
def test_a_mistake_in_the_metal_sources_fails_the_check(compiler, tmp_path, mistake):
    sources = tmp_path / "metal"
    shutil.copytree(kernels.SOURCES, sources)
    if mistake != "none":
        name, text, replacement, expected = MISTAKES[mistake]
        original = (sources / name).read_text()
        assert text in original
        (sources / name).write_text(original.replace(text, replacement))
    result = msl_check.check(msl_check.capture(sources, few_launches()), sources, compiler)
    if mistake == "none":
        assert result.ok, result.message
    else:
        assert not result.ok
        assert expected in result.message, result.message


def test_unknown_attributes_and_wrong_host_names_are_reported():
    text = ('[[kernel]] void k(uint3 p [[thread_positon_in_grid]]) {}\n'
            'template [[host_name("other")]] [[kernel]] decltype(k<1>) k<1>;\n')
    converted, problems = msl_check.metal_to_clang(text)
    assert any("thread_positon_in_grid" in p for p in problems)
    assert any("host_name 'other'" in p for p in problems)
    assert "template decltype(k<1>) k<1>;" in converted
