"""Calibration CLI, conversion of the reference stats, shipped stats, stats from a hub repo."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx_lm.utils import _get_classes

from triattn_mlx import StatsError, calibrate, load_stats
from triattn_mlx.convert import convert, read_torch_stats
from triattn_mlx.loading import STATS_DIR, resolve_stats, shipped_stats

CONFIGS = STATS_DIR / "configs"
UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "upstream-stats"
SHIPPED = {  # shipped stats file -> model config it was converted for
    "qwen3-8b": "qwen3_8b", "deepseek-r1-distill-llama-8b": "ds_llama8b",
    "deepseek-r1-distill-qwen-7b": "ds_qwen7b", "gpt-oss-120b": "gpt_oss_120b_stats",
}


def model_from_config(name):
    """The real architecture with lazy random weights: nothing is materialized."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_stats_validate_against_their_model_and_only_it(name):
    model = model_from_config(name)
    stats = load_stats(STATS_DIR / f"{name}.safetensors", model)
    assert stats.metadata["source"] and "converted" in stats.metadata["source"]
    assert shipped_stats(model).metadata["model_name"] == stats.metadata["model_name"]  # --stats auto
    for other in SHIPPED:
        if other != name:
            with pytest.raises(StatsError, match="stats do not match the model"):
                load_stats(STATS_DIR / f"{other}.safetensors", model)


CALIBRATED = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct",
              "gemma-3-270m"]  # calibrated here (stats/README.md); configs from their GGUFs


@pytest.mark.parametrize("name", [*SHIPPED, *CALIBRATED])
def test_each_model_matches_exactly_one_shipped_file(name):
    """--stats auto takes the first file that validates: no two may fit one model."""
    model = model_from_config(name)
    matching = []
    for path in sorted(STATS_DIR.glob("*.safetensors")):
        try:
            load_stats(path, model)
            matching.append(path.stem)
        except StatsError:
            pass
    assert matching == [name]
    assert shipped_stats(model).metadata == load_stats(STATS_DIR / f"{name}.safetensors").metadata


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="reference stats (../shared/upstream-stats) not present")
@pytest.mark.parametrize("name", SHIPPED)
def test_conversion_reproduces_the_shipped_files(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    converted = convert(UPSTREAM / f"{SHIPPED[name]}.pt", config)
    shipped = load_stats(STATS_DIR / f"{name}.safetensors")
    np.testing.assert_allclose(converted.q_mean, shipped.q_mean, rtol=1e-6)
    np.testing.assert_allclose(converted.q_abs_mean, shipped.q_abs_mean, rtol=1e-6)
    raw = read_torch_stats(UPSTREAM / f"{SHIPPED[name]}.pt")["stats"]["layer03_head05"]
    np.testing.assert_array_equal(converted.q_mean[3, 5].real.astype(np.float32), raw["q_mean_real"])


def test_shipped_stats_for_the_test_model_are_found_automatically(real_model, tmp_path, monkeypatch):
    stats = shipped_stats(real_model[0])
    assert stats.metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert stats.metadata["tokens_used"] == 4096
    # TRIATTN_STATS_DIR folders come first
    own = calibrate(real_model[0], list(range(2, 200)), source="mine")
    own.save(tmp_path / "mine.safetensors")
    monkeypatch.setenv("TRIATTN_STATS_DIR", str(tmp_path))
    assert shipped_stats(real_model[0]).metadata["source"] == "mine"


def test_converter_rejects_what_is_not_a_reference_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StatsError, match="not a readable reference stats file"):
        convert(bad, json.loads((CONFIGS / "qwen3-8b.json").read_text()))
    r = subprocess.run([sys.executable, "-m", "triattn_mlx.convert", str(bad), "--config",
                        str(CONFIGS / "qwen3-8b.json"), "--output", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr


def test_stats_from_a_hub_repo_id_offline(tmp_path, monkeypatch):
    """A local folder laid out like the Hugging Face cache stands in for the hub."""
    snapshot = tmp_path / "hub" / "models--someone--qwen3-stats" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.copy(STATS_DIR / "qwen3-8b.safetensors", snapshot / "qwen3-8b.safetensors")
    (tmp_path / "hub" / "models--someone--qwen3-stats" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--qwen3-stats" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    stats = resolve_stats("someone/qwen3-stats", model_from_config("qwen3-8b"))
    assert stats.metadata["num_layers"] == 36
    with pytest.raises(StatsError, match="match this model"):
        resolve_stats("someone/qwen3-stats", model_from_config("gpt-oss-120b"))
    with pytest.raises(StatsError, match="cannot fetch stats"):
        resolve_stats("someone/not-there", model_from_config("qwen3-8b"))


def run_calibrate(*args):
    return subprocess.run([sys.executable, "-m", "triattn_mlx.calibrate", *args],
                          capture_output=True, text=True, timeout=300)


def test_calibrate_cli_writes_valid_stats_and_reports(tmp_path, real_model, real_model_dir):
    text = tmp_path / "a.txt"
    text.write_text(Path(json.__file__).read_text())
    out, png = tmp_path / "s.safetensors", tmp_path / "r.png"
    r = run_calibrate("--model", str(real_model_dir), "--output", str(out), "--text", str(text),
                      "--num-tokens", "300", "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "R > 0.95" in r.stdout and "calibrating" in r.stderr  # report and progress bar
    stats = load_stats(out, real_model[0])
    assert stats.metadata["tokens_used"] == 300 and stats.metadata["source"] == str(text)
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--text", "/no/such.txt"], "text file not found: /no/such.txt"),
    (["--output", "x.bin"], "--output must end in .safetensors"),
    (["--num-tokens", "1"], "--num-tokens must be >= 2"),
])
def test_calibrate_cli_bad_input(tmp_path, real_model_dir, args, message):
    base = ["--model", str(real_model_dir), "--output", str(tmp_path / "s.safetensors")]
    if "--output" in args:
        base = base[:2]
    r = run_calibrate(*base, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_calibrate_cli_unknown_model(tmp_path):
    r = run_calibrate("--model", str(tmp_path / "missing"), "--output", str(tmp_path / "s.safetensors"))
    assert r.returncode == 2 and "model not found" in r.stderr
