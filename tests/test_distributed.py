"""Compressed caches under mlx.launch: two local processes over the ring backend
(127.0.0.1, CPU), a model split by mlx-lm's sharded_load, greedy tokens compared with one
process holding the whole model, with the same settings and compression pruning."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models import qwen2, qwen3
from mlx_lm.utils import save_config, save_model

from triattn_mlx import calibrate

JOB = Path(__file__).parent / "distributed" / "job.py"
CONFIG = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
              max_position_embeddings=4096, tie_word_embeddings=True)


def model_folder(tmp_path, kind, real_model_dir):
    """A random-weight qwen3 / qwen2 model (vocabulary and tokenizer of the test model)
    written as an mlx-lm folder, with stats calibrated on it."""
    module = {"qwen3": qwen3, "qwen2": qwen2}[kind]
    vocab = json.loads((real_model_dir / "config.json").read_text())["vocab_size"]
    config = dict(CONFIG, model_type=kind, vocab_size=vocab)
    mx.random.seed(3)
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    folder = tmp_path / kind
    folder.mkdir()
    save_model(folder, model)
    save_config(config, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, folder / name)
    stats = folder / "stats.safetensors"
    calibrate(model, [(5 * i + 1) % 500 for i in range(256)]).save(stats)
    return folder, stats


def run(folder, stats, out, *flags, ranks=2):
    command = [sys.executable, str(JOB), str(folder), str(out), "--stats", str(stats), *flags]
    if ranks > 1:
        command = ["mlx.launch", "--backend", "ring", "-n", str(ranks), "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("kind, flags", [
    ("qwen3", ()),  # tensor parallelism: each rank holds one of the two KV heads of every layer
    ("qwen3", ("--pruning-mode", "per_layer_per_head", "--prompt-mode", "chunked")),
    ("qwen2", ("--pipeline", "--pruning-mode", "per_layer_per_head")),  # each rank holds 2 of the 4 layers
])
def test_two_processes_generate_what_one_does(tmp_path, real_model_dir, kind, flags):
    folder, stats = model_folder(tmp_path, kind, real_model_dir)
    (single,) = run(folder, stats, tmp_path / "single", "--single", *flags, ranks=1)
    ranks = run(folder, stats, tmp_path / "ranks", *flags)
    assert single["prune_rounds"] > 2  # compression acted
    for rank in ranks:
        assert rank["tokens"] == single["tokens"], rank
        assert rank["prune_rounds"] == single["prune_rounds"]  # in lockstep
    if "--pipeline" in flags:
        assert [r["layers"] for r in ranks] == [2, 2]
        assert sum(r["kv_bytes"] for r in ranks) == single["kv_bytes"]
    else:  # every layer on each rank, half the KV heads: half the bytes
        assert [r["kv_heads"] for r in ranks] == [1, 1]
        assert all(2 * r["kv_bytes"] == single["kv_bytes"] for r in ranks)


def test_pipeline_per_head_selects_per_rank(tmp_path, real_model_dir):
    """per_head pruning under pipeline parallelism averages the scores of each rank's own
    layers (a collective inside the pipelined forward pass could deadlock): it runs, stays
    bounded and in lockstep, and may choose other tokens than one process does."""
    folder, stats = model_folder(tmp_path, "qwen2", real_model_dir)
    ranks = run(folder, stats, tmp_path / "ranks", "--pipeline")
    assert ranks[0]["tokens"] == ranks[1]["tokens"] and ranks[0]["prune_rounds"] == ranks[1]["prune_rounds"] > 2


def test_heads_that_do_not_divide_are_refused(tmp_path, real_model_dir):
    folder, stats = model_folder(tmp_path, "qwen3", real_model_dir)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_key_value_heads=1, num_attention_heads=4)))
    command = ["mlx.launch", "--backend", "ring", "-n", "2", "--", sys.executable, str(JOB), str(folder),
               str(tmp_path / "x"), "--stats", str(stats)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr  # (mlx.launch reports a failed rank but exits 0)
    assert "exited with code 1" in output and not list(tmp_path.glob("x.*.json"))
    assert "do not divide evenly over the processes" in output


def launch(*command):
    return ["mlx.launch", "--backend", "ring", "-n", "2", "--", sys.executable, *command]


def test_generate_cli_under_mlx_launch_prints_once_what_one_process_prints(tmp_path, real_model_dir):
    folder, stats = model_folder(tmp_path, "qwen3", real_model_dir)
    prompt = " ".join(f"word{i % 50}" for i in range(200))
    command = ["-m", "triattn_mlx.generate", "--model", str(folder), "--stats", str(stats), "--prompt", prompt,
               "--ignore-chat-template", "--budget", "96", "--window", "16", "--divide-length", "16", "-m", "12",
               "--prefill-step-size", "64", "--temp", "0"]
    single = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300)
    ranks = subprocess.run(launch(*command), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0 and ranks.returncode == 0, single.stderr[-2000:] + ranks.stderr[-2000:]
    assert "exited with code" not in ranks.stdout + ranks.stderr
    assert ranks.stdout.count("==========") == 2  # rank 0 alone prints
    text = single.stdout.split("==========")[1]
    assert text.strip() and ranks.stdout.split("==========")[1] == text
    kept = re.search(r"KV cache: (\d+) of (\d+) tokens", ranks.stdout)
    assert kept and int(kept.group(1)) < 96 + 16 < int(kept.group(2))


def test_server_under_mlx_launch_answers(tmp_path, real_model_dir):
    """mlx-lm's distributed server branch: rank 0 serves HTTP and shares each request with
    rank 1; the compressed caches live on both."""
    folder, stats = model_folder(tmp_path, "qwen3", real_model_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(launch("-m", "triattn_mlx.server", "--model", str(folder), "--stats", str(stats),
                                   "--port", str(port), "--budget", "96", "--window", "16", "--divide-length", "16",
                                   "--max-tokens", "8"), stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"),
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}],
                           "max_tokens": 8, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            reply = json.loads(r.read())
        assert reply["usage"]["prompt_tokens"] > 96 + 16 and reply["usage"]["completion_tokens"] == 8
        assert reply["choices"][0]["message"]["content"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
