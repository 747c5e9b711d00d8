"""`python -m triattn_mlx.doctor` on this machine: every section, a clean exit when all
checks pass, a failing exit when one does; its self-test section as a GPU would show it."""

import mlx.core as mx
import pytest

from triattn_mlx import doctor, kernels, msl_check

SECTIONS = ["== System", "== Metal source check", "== Fused kernel self-test", "== Scoring bandwidth",
            "== Generation with compression", "== Result:"]


def test_doctor_reports_every_section_and_passes_here(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for title in SECTIONS:
        assert title in out, out
    assert out.startswith("```\ntriattn-mlx doctor") and out.rstrip().endswith("```")
    assert f"MLX {mx.__version__}" in out and "scoring backend: " + kernels.backend() in out
    if kernels.backend() == "mlx":
        assert "not applicable: MLX-op path" in out
    if msl_check.clang() is not None and kernels.backend() != "metal":
        assert f"ok: {len(msl_check.checked_launches())} instantiations" in out
    assert "B/s of keys read" in out and "copy of the same bytes" in out
    assert out.count("  pruned: ") == 2  # plain and 4-bit keys
    assert "== Result: all checks passed" in out


def test_doctor_exits_nonzero_when_a_check_fails(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "metal_source_check", lambda: (["FAILED: 1 instantiations", "error: x"], False))
    monkeypatch.setattr(doctor, "bandwidth", lambda: ["skipped in this test"])
    monkeypatch.setattr(doctor, "generation", lambda model=None: (["skipped in this test"], None))

    def crash():
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "system", crash)
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "FAILED: RuntimeError: boom" in out
    assert "== Result: FAILED: System, Metal source check (clang" in out


def test_self_test_section_on_a_gpu_names_each_failing_configuration(monkeypatch):
    """Forced: backend 'metal', a stand-in kernel that is right except for bfloat16 keys."""
    monkeypatch.setattr(kernels, "backend", lambda: "metal")

    def factory(kind, storage):
        def kernel(inputs, **config):
            *k, packed = inputs
            if storage == "quantized":
                k = [k[0], k[1].astype(mx.float32), k[2].astype(mx.float32)]
            scores = kernels.ops_scores(kernels.Launch(storage, [*k, packed], config))
            return [scores * 2 if dict(config["template"])["T"] == mx.bfloat16 else scores]
        return kernel

    monkeypatch.setattr(kernels, "_kernel", factory)
    lines, ok = doctor.self_tests()
    text = "\n".join(lines)
    assert ok is False
    # the default: float16 / bfloat16 keys at head_dim 64 and 128 (plain), 128 (4-bit)
    assert "plain     float16  2/2 ok" in text and "plain     bfloat16 0/2 ok" in text
    assert "quantized float16  1/1 ok" in text and "quantized bfloat16 0/1 ok" in text
    failures = [line for line in lines if line.startswith("  FAILED")]
    assert len(failures) == 3 and all("T=bfloat16" in f and "max |fused - MLX ops|" in f for f in failures)
    lines, ok = doctor.self_tests(everything=True)  # --all: every instantiation msl_check covers
    text = "\n".join(lines)
    assert "quantized float32" in text and not ok and lines[-1].startswith("  ... and ")


@pytest.mark.parametrize("kind", ["metal", "cuda", "mlx"])
def test_backend_is_described(kind):
    assert doctor.describe_backend(kind).startswith(kind)
