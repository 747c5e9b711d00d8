"""`python -m triattn_mlx.generate` in a subprocess, on the real test model."""

import json
import re
import subprocess
import sys

import pytest

from support import prose_text, smollm2_gguf


def run(*args, stdin=None, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "triattn_mlx.generate", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory, real_stats):
    path = tmp_path_factory.mktemp("stats") / "smollm2.safetensors"
    real_stats.save(path)
    return str(path)


def test_chat_prompt_answers_and_prints_statistics(real_model_dir, stats_file):
    r = run("--model", str(real_model_dir), "--prompt", "What is the capital of France?",
            "--budget", "256", "--stats", stats_file, "-m", "20")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    for line in ("Prompt: ", "Generation: ", "Peak memory: ", "KV cache: ", "Prune rounds: "):
        assert line in r.stdout
    assert "calibrating" not in r.stderr  # stats were given


@pytest.mark.parametrize("quantize", [[], ["--kv-bits", "4", "--kv-group-size", "32"]])
def test_long_prompt_is_compressed_and_reported(real_model_dir, quantize):
    prompt = prose_text()[:3000]
    r = run("--model", str(real_model_dir), "--prompt", "-", "--ignore-chat-template",
            "--budget", "64", "--window", "16", "--divide-length", "16", "--prefill-step-size", "128",
            "-m", "40", *quantize, stdin=prompt)
    assert r.returncode == 0, r.stderr
    assert "estimating query centers" not in r.stderr  # --stats auto found the shipped SmolLM2 stats
    kept, seen = map(int, re.search(r"KV cache: (\d+) of (\d+) tokens", r.stdout).groups())
    assert kept < 64 + 16 and seen > 600
    sizes = re.search(r"tokens kept per head \(budget 64, triattention\), ([\d.]+) MB vs ([\d.]+) MB", r.stdout)
    kv_mb, full_mb = map(float, sizes.groups())
    assert kv_mb < full_mb / (20 if quantize else 4)  # 4-bit codes + scales vs float32
    assert int(re.search(r"Prune rounds: (\d+)", r.stdout).group(1)) > 0


@pytest.mark.parametrize("method", ["streamingllm", "snapkv", "h2o", "rkv"])
def test_every_baseline_runs_through_mlx_lm_generate(real_model_dir, method):
    """--method: the baselines run where users run things, mlx-lm's own generate path
    (which evaluates every cache's state during prefill), pruning as they go."""
    r = run("--model", str(real_model_dir), "--prompt", "-", "--ignore-chat-template", "--method", method,
            "--budget", "64", "--window", "16", "--divide-length", "16", "--prefill-step-size", "128",
            "--prompt-mode", "chunked", "-m", "24", stdin=prose_text()[:2000])  # evicting while it reads
    assert r.returncode == 0, r.stderr
    assert re.search(rf"KV cache: \d+ of \d+ tokens kept per head \(budget 64, {method}\)", r.stdout)
    assert int(re.search(r"Prune rounds: (\d+)", r.stdout).group(1)) >= 4  # 462 prompt tokens, 128 a chunk
    assert re.search(r"Generation: 24 tokens", r.stdout)


def test_without_matching_stats_auto_self_calibrates_with_a_notice(real_model_dir, tmp_path):
    # The same weights under another rope_theta: no shipped stats match this model.
    folder = tmp_path / "other-theta"
    folder.mkdir()
    for f in real_model_dir.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((real_model_dir / "config.json").read_text())
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(dict(config, rope_theta=50000.0)))
    r = run("--model", str(folder), "--prompt", "What is the capital of France?", "--budget", "256", "-m", "8")
    assert r.returncode == 0, r.stderr
    assert "no shipped calibration stats match this model: estimating query centers" in r.stderr
    assert "KV cache: " in r.stdout


def test_no_compress_uses_a_full_cache(real_model_dir):
    r = run("--model", str(real_model_dir), "--prompt", "Hello", "--no-compress", "-m", "5")
    assert r.returncode == 0, r.stderr
    assert re.search(r"KV cache: full, \d+ tokens", r.stdout)


def test_gguf_file_as_model(stats_file):
    r = run("--model", str(smollm2_gguf()), "--prompt", "What is the capital of France?",
            "--stats", stats_file, "--budget", "256", "-m", "12")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "model not found: /no/such/model"),
    (["--budget", "100", "--window", "128"], "budget (100) must be larger than window (128)"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--max-kv-size", "512"], "--max-kv-size is replaced by --budget"),
    (["--kv-bits", "7"], "kv bits must be one of 2, 3, 4, 5, 6, 8"),
    (["--observe-pool", "6"], "observe_pool must be odd"),
    (["--observe-redundancy", "-1"], "observe_redundancy must be a number >= 0"),
    (["--method", "snapkv", "--observe-redundancy", "1"], "--method snapkv does not read them"),
    (["--stats", "/no/such/stats.safetensors"], "stats file not found"),
])
def test_bad_input_exits_2_with_one_line(real_model_dir, args, message):
    base = {"--model": str(real_model_dir), "--prompt": "hi"}
    for flag in list(base):
        if flag in args:
            del base[flag]
    r = run(*[x for kv in base.items() for x in kv], *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_stats_for_another_model_exit_2(real_model_dir, tmp_path):
    from conftest import tiny_llama

    from triattn_mlx import calibrate

    path = tmp_path / "tiny.safetensors"
    calibrate(tiny_llama(), list(range(50))).save(path)
    r = run("--model", str(real_model_dir), "--prompt", "hi", "--stats", str(path))
    assert r.returncode == 2
    assert "stats do not match the model: num_layers is 2 in the stats file but 30 in the model" in r.stderr
    assert "Traceback" not in r.stderr


def test_python_load_opens_a_gguf_file():
    import triattn_mlx

    model, tokenizer = triattn_mlx.load(smollm2_gguf())
    assert len(model.layers) == 30 and tokenizer.encode("Hello")
    with pytest.raises(FileNotFoundError, match="model not found"):
        triattn_mlx.load("./no/such/folder")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read stats file"),
    ("nan", "holds NaN or infinite values"),
    ("head_dim", "head_dim is 32 in the stats file but 64 in the model"),
])
def test_damaged_stats_files_exit_2(real_model_dir, stats_file, tmp_path, damage, message):
    from triattn_mlx import load_stats

    path = tmp_path / f"{damage}.safetensors"
    if damage == "truncate":
        path.write_bytes(open(stats_file, "rb").read()[:1000])
    else:
        stats = load_stats(stats_file)
        if damage == "nan":
            stats.q_abs_mean[3, 2, 1] = float("nan")
        else:
            stats.q_mean, stats.q_abs_mean = stats.q_mean[..., :16], stats.q_abs_mean[..., :16]
            stats.metadata["head_dim"] = 32
        stats.save(path)
    r = run("--model", str(real_model_dir), "--prompt", "hi", "--stats", str(path))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_prompts_file_generates_each_prompt_as_alone(real_model_dir, stats_file, tmp_path):
    """--prompts-file: the prompts are generated as one batch (one of them long enough to be
    pruned during prefill); each reply equals the same prompt run alone with --prompt."""
    words = prose_text().split()
    prompts = ["What is the capital of France?", " ".join(words[:400]) + " Summarize this.",
               "Name three colors.\\nAnswer briefly."]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n\n")
    common = ["--model", str(real_model_dir), "--stats", stats_file, "-m", "12", "--budget", "128",
              "--window", "32", "--divide-length", "32", "--prefill-step-size", "128"]
    r = run(*common, "--prompts-file", str(path))
    assert r.returncode == 0, r.stderr
    replies = re.findall(r"Prompt \d+: (\d+) tokens\n(.*?)\nKV cache: (\d+) of (\d+)", r.stdout, re.S)
    assert len(replies) == 3
    assert int(replies[1][3]) > int(replies[1][2])  # the long prompt was pruned
    for prompt, (_, text, _, _) in zip(prompts, replies):
        alone = run(*common, "--prompt", prompt, "--verbose", "False")
        assert alone.returncode == 0, alone.stderr
        assert alone.stdout.strip() == text.strip()


@pytest.mark.parametrize("content,extra,message", [
    ("", [], "holds no prompt"),
    ("hi\n", ["--kv-bits", "4"], "not batched"),
    ("hi\n", ["--method", "h2o"], "cannot batch --method h2o"),
])
def test_bad_prompts_file_exits_2(real_model_dir, tmp_path, content, extra, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    r = run("--model", str(real_model_dir), "--prompts-file", str(path), *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
