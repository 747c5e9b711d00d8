"""`python -m triattn_mlx.server` on the real test model, over HTTP on 127.0.0.1.

Reuse is checked against a replay through mlx-lm's public API: one compressed cache
carried across the turns, which is what mlx-lm's prompt cache must amount to when a turn
extends the stored history."""

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from mlx_lm.generate import stream_generate

from triattn_mlx import Settings, make_prompt_cache
from triattn_mlx.corpus import prose_text
from triattn_mlx.loading import shipped_stats
from triattn_mlx.server import compression_parser
from triattn_mlx.settings import CHAT_DEFAULTS, from_args

BUDGET = 256  # the server's budget in these tests
PREFILL_STEP = 2048  # mlx_lm.server's default --prefill-step-size


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, port, log):
        self.port, self.log = port, log

    def request(self, method, path, body=None, raw=None, timeout=300):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
        conn.close()
        return response.status, text

    def chat(self, messages, **options):
        status, text = self.request("POST", "/v1/chat/completions",
                                    {"messages": messages, "temperature": 0.0, **options})
        assert status == 200, text
        return json.loads(text)

    def stream_chat(self, messages, **options):
        """(content, seconds to the first content chunk, usage) of a streamed reply."""
        body = {"messages": messages, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, **options}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode())
        response = conn.getresponse()
        assert response.status == 200
        content, first, usage, done = "", None, None, False
        for _ in range(100_000):  # bounded: one line per token at most, plus keepalives
            line = response.readline().decode()
            if not line:
                break
            if not line.startswith("data: "):
                continue
            if line.strip() == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                first = first or time.perf_counter() - start
                content += choice["delta"].get("content") or ""
        conn.close()
        assert done, "the stream did not end with [DONE]"
        return content, first, usage



@contextlib.contextmanager
def running_server(model_dir, home, *flags):
    """triattn_mlx.server in a subprocess on a free port, with an empty hub cache (nothing
    to download), stopped on exit."""
    port = free_port()
    log_path = home / f"server-{port}.log"
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "triattn_mlx.server", "--model", str(model_dir),
             "--port", str(port), "--budget", str(BUDGET), "--max-tokens", "32", *flags],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    srv = Server(port, log_path)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            try:
                if srv.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not come up in 180 s")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(real_model_dir, tmp_path_factory):
    with running_server(real_model_dir, tmp_path_factory.mktemp("hf-home")) as srv:
        yield srv


@pytest.fixture(scope="module")
def replay(real_model):
    """Greedy replies computed in-process: a cache carried across turns like the server's."""
    model, tokenizer = real_model
    stats = shipped_stats(model)
    assert stats is not None, "the shipped SmolLM2 stats should match the test model"

    class Replay:
        def __init__(self, budget=BUDGET):
            self.budget, self.cache, self.history = budget, None, []

        def reply(self, messages, max_tokens):
            """The reply, carrying the cache on when the prompt extends the history (as
            mlx-lm's prompt cache does), else from a fresh cache."""
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            continued = self.cache is not None and prompt[: len(self.history)] == self.history
            if not continued:
                self.cache, self.history = make_prompt_cache(model, self.budget, stats=stats, **CHAT_DEFAULTS), []
            prefix = len(self.history)
            text, tokens = "", []
            for r in stream_generate(model, tokenizer, prompt[prefix:], max_tokens=max_tokens,
                                     prompt_cache=self.cache, prefill_step_size=PREFILL_STEP):
                text += r.text
                tokens.append(r.token)
                if r.finish_reason is not None:
                    break
            self.history = prompt + tokens
            self.continued = continued
            return prompt, text

    return Replay


def test_models_and_chat_answer_like_mlx_lm_server(server, real_model_dir):
    status, text = server.request("GET", "/v1/models")
    assert status == 200
    models = json.loads(text)
    assert models["object"] == "list"
    assert str(real_model_dir.resolve()) in [m["id"] for m in models["data"]]

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = server.chat(messages, max_tokens=12)
    assert reply["object"] == "chat.completion"
    content = reply["choices"][0]["message"]["content"]
    assert content.strip() and reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] <= 12

    streamed, _, usage = server.stream_chat(messages, max_tokens=12)
    assert streamed == content
    assert usage["completion_tokens"] == reply["usage"]["completion_tokens"]


def prose_turns(tokenizer, n_turns, tokens_per_turn):
    ids = tokenizer.encode(prose_text())
    return [tokenizer.decode(ids[i * tokens_per_turn : (i + 1) * tokens_per_turn])
            + "\n\nSummarize the text above in one sentence." for i in range(n_turns)]


def test_conversation_reuses_the_compressed_cache(server, replay, real_model):
    """Three turns of ~400-token documents (budget 256: every turn evicts). Each turn that
    extends the stored history continues from its compressed cache (cached_tokens), answers
    as one cache carried across the turns does, and reads its prompt faster than a fresh
    prefill of the whole history."""
    tokenizer = real_model[1]
    ids = tokenizer.encode(prose_text())
    turns = [tokenizer.decode(ids[i * 400 : (i + 1) * 400]) + "\n\nSummarize the text above in one sentence."
             for i in range(3)]
    reference, messages, rows = replay(), [], []
    for i, text in enumerate(turns):
        messages.append({"role": "user", "content": text})
        content, seconds, usage = server.stream_chat(messages, max_tokens=24)
        prompt, expected = reference.reply(messages, 24)
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        rows.append(dict(turn=i + 1, prompt_tokens=len(prompt), cached_tokens=cached, seconds=seconds,
                         continued=reference.continued))
        assert usage["prompt_tokens"] == len(prompt)
        if reference.continued:
            assert cached > 0 and content == expected, f"turn {i + 1}: reuse changed the reply"
        messages.append({"role": "assistant", "content": content})
    fresh_content, fresh_seconds, usage = server.stream_chat(
        [{"role": "system", "content": "Answer briefly."}] + messages[:-1], max_tokens=24)
    # diverges after the chat template's opening (SmolLM2's template starts every prompt with its system turn)
    assert usage.get("prompt_tokens_details", {}).get("cached_tokens", 0) < 8
    for row in rows:
        print(row)
    print(f"fresh prefill of the whole history ({usage['prompt_tokens']} tokens): {fresh_seconds:.2f} s")
    assert sum(row["continued"] for row in rows[1:]) >= 1, "no turn continued the stored history"
    for row in rows[1:]:
        if row["continued"]:
            assert row["cached_tokens"] >= rows[row["turn"] - 2]["prompt_tokens"], row
            assert row["seconds"] < fresh_seconds / 2, row


def test_concurrent_clients(server, replay):
    prompts = [[{"role": "user", "content": f"Client {c}, question {q}: name a {w}."}]
               for c in range(4) for q, w in enumerate(("color", "fruit", "city"))]
    expected = [replay().reply(p, 8)[1] for p in prompts]
    replies = [None] * len(prompts)

    def client(c):
        for q in range(3):
            i = 3 * c + q
            replies[i] = server.chat(prompts[i], max_tokens=8)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    assert replies == expected


@pytest.mark.parametrize("body,status,message", [
    (b'{"messages": [', 400, "Invalid JSON"),
    (b'[1, 2]', 400, "JSON dictionary"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400, "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400, "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": "no-such-org/no-such-model"}', 404, ""),
])
def test_bad_requests_get_a_status_and_the_server_keeps_serving(server, body, status, message):
    got, text = server.request("POST", "/v1/chat/completions", raw=body)
    assert got == status, text
    assert message in text
    assert server.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)["choices"]


def test_client_disconnecting_mid_stream(server):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story."}],
            "stream": True, "max_tokens": 4000, "temperature": 0.0}
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        received = b""
        for _ in range(1000):  # until the first token arrives
            received += sock.recv(4096)
            if b"data: {" in received:
                break
        assert b"200 OK" in received
    start = time.perf_counter()
    reply = server.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert reply["choices"][0]["message"]["content"]
    # 4000 tokens take minutes here: the abandoned request must have stopped early.
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("args,message", [
    (["--budget", "100"], "budget (100) must be larger than window"),
    (["--kv-bits", "4", "--kv-group-size", "48"], "kv group size must be one of 32, 64, 128"),
    (["--method", "snap"], "invalid choice: 'snap'"),
    (["--stats", "/no/such/stats.safetensors"], "stats file not found"),
    (["--draft-model", "x"], "--draft-model is not supported"),
    (["--model", "/no/such/model"], "model not found"),
])
def test_cli_refuses_bad_flags_with_one_line(real_model_dir, args, message):
    argv = [sys.executable, "-m", "triattn_mlx.server", "--model", str(real_model_dir),
            "--port", str(free_port()), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_server_defaults_to_the_chat_settings():
    """The server's flags default to Settings() with CHAT_DEFAULTS (a conversation asks
    again); a flag still overrides them; the library keeps its own defaults."""
    served = from_args(compression_parser().parse_args([]))
    assert served == Settings(**CHAT_DEFAULTS) != Settings()
    assert (served.segments, served.segment_rounds, served.segment_fill) == (8, "prompt", "distinct")
    library = ["--segments", "0", "--segment-rounds", "all", "--segment-fill", "score"]
    assert from_args(compression_parser().parse_args(library)) == Settings()


def test_query_vote_flags_are_refused_for_the_baselines():
    """A baseline does not read the prompt's vote: its flags, given, are an error rather than
    ignored; left at the server's defaults they are not."""
    assert from_args(compression_parser().parse_args(["--method", "snapkv"])).method == "snapkv"
    for flags in (["--observe-redundancy", "2"], ["--observe", "8"], ["--observe-rounds", "all"]):
        with pytest.raises(ValueError, match="--method rkv does not read them"):
            from_args(compression_parser().parse_args(["--method", "rkv", *flags]))
    assert Settings().observe_redundancy == 0.0


def test_help_lists_both_sets_of_flags():
    result = subprocess.run([sys.executable, "-m", "triattn_mlx.server", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--budget", "--pruning-mode", "--method", "--kv-bits", "--prompt-cache-size", "--port"):
        assert flag in result.stdout


def test_models_without_shipped_stats_are_calibrated_once_with_a_warning(caplog):
    """No silent fallback: a model no shipped stats match gets centers calibrated on
    built-in text when it loads, with a warning; its caches are TriAttention caches."""
    import logging

    from conftest import tiny_llama

    from triattn_mlx import TriAttentionKVCache, compress
    from triattn_mlx.server import server_stats

    class Tokenizer:
        def encode(self, text):
            return [ord(c) % 128 for c in text]

    model = tiny_llama()
    with caplog.at_level(logging.WARNING):
        stats = server_stats(model, Tokenizer(), Settings(budget=256), "auto")
    assert "no shipped stats match this model: calibrating" in caplog.text
    assert stats.metadata["source"] == "triattn_mlx built-in text" and stats.metadata["tokens_used"] == 2048
    assert server_stats(model, Tokenizer(), Settings(method="snapkv"), "auto") is None  # needs none
    compress(model, budget=256, stats=stats)
    from mlx_lm.models.cache import make_prompt_cache as mlx_make_prompt_cache

    cache = mlx_make_prompt_cache(model)  # what every mlx-lm path calls
    assert all(isinstance(c, TriAttentionKVCache) for c in cache) and cache[0].settings.budget == 256


def test_mlx_lm_prompt_cache_reuses_compressed_caches_safely():
    """mlx-lm's own LRU prompt cache, with --kv-bits caches: a stored cache is continued when
    the prompt extends its history (a copy: the stored one stays as it was); before any
    eviction it is trimmed back like a KVCache; after eviction mlx-lm is told it cannot be
    trimmed (as its RotatingKVCache once it wraps), so a prompt diverging inside it is
    recomputed instead of continuing from a wrong state."""
    import mlx.core as mx
    import numpy as np
    from conftest import tiny_llama
    from mlx_lm.models.cache import LRUPromptCache

    from triattn_mlx import QuantizedTriAttentionKVCache, calibrate

    model = tiny_llama(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
    stats = calibrate(model, np.random.default_rng(1).integers(0, 128, 200))
    store = LRUPromptCache(max_size=4)
    tokens = np.random.default_rng(0).integers(0, 128, 200).tolist()

    short = make_prompt_cache(model, 64, stats=stats, window=16, divide_length=16, kv_bits=8)
    model(mx.array(tokens[:50])[None], cache=short)  # 50 < 64 + 16: nothing evicted yet
    store.insert_cache("m", tokens[:50], short)
    reused, rest = store.fetch_nearest_cache("m", tokens[:40] + [1, 2])  # diverges 10 tokens back
    assert reused[0].offset == 40 and rest == [1, 2] and short[0].offset == 50

    cache = make_prompt_cache(model, 64, stats=stats, window=16, divide_length=16, kv_bits=8, prompt_mode="chunked")
    assert isinstance(cache[0], QuantizedTriAttentionKVCache)
    for start in range(0, 200, 50):
        model(mx.array(tokens[start : start + 50])[None], cache=cache)
    assert cache[0].prune_rounds > 0 and not cache[0].is_trimmable()
    store.insert_cache("m", tokens, cache)
    extended = tokens + [7, 8, 9]
    reused, rest = store.fetch_nearest_cache("m", extended)
    assert rest == [7, 8, 9] and reused[0].offset == 200 and reused[0] is not cache[0]
    again, _ = store.fetch_nearest_cache("m", extended)
    a = model(mx.array(rest)[None], cache=reused)
    b = model(mx.array(rest)[None], cache=again)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert cache[0].offset == 200  # the stored cache is untouched
    diverged = tokens[:196] + [1, 2, 3]  # inside what the stored cache stands for
    reused, rest = store.fetch_nearest_cache("m", diverged)
    assert reused is not None and reused[0].offset <= 50 and rest == diverged[reused[0].offset :]


def test_server_with_a_baseline_method(real_model_dir, tmp_path):
    """--method h2o: served one request at a time (its caches cannot share a batch)."""
    with running_server(real_model_dir, tmp_path, "--method", "h2o") as srv:
        reply = srv.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
        assert "Paris" in reply["choices"][0]["message"]["content"]
        long = prose_text()[:2500] + "\n\nSummarize the text above."
        assert srv.chat([{"role": "user", "content": long}], max_tokens=8)["choices"][0]["message"]["content"]
    log = srv.log.read_text()
    assert "Traceback" not in log


@pytest.mark.slow
def test_eight_clients_batched_vs_serial(real_model_dir, tmp_path, capsys):
    """8 concurrent clients, ~600-token prompts (pruned: budget 512 + divide 128), 48 tokens
    each: the default server batches them; --decode-concurrency 1 --prompt-concurrency 1
    serves them one at a time. Same replies, total throughput of each."""
    from mlx_lm import load

    _, tokenizer = load(str(real_model_dir))
    ids = tokenizer.encode(prose_text())
    prompts = [[{"role": "user", "content": tokenizer.decode(ids[i * 600 : (i + 1) * 600])
                 + "\n\nSummarize the text above."}] for i in range(8)]
    results = {}
    for name, flags in (("batched", ()), ("serial", ("--decode-concurrency", "1", "--prompt-concurrency", "1"))):
        with running_server(real_model_dir, tmp_path, *flags) as srv:
            srv.chat([{"role": "user", "content": "Hi."}], max_tokens=2)  # warm up
            replies = [None] * len(prompts)

            def client(i):
                replies[i] = srv.chat(prompts[i], max_tokens=48, temperature=0.0)

            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=1200)
            seconds = time.perf_counter() - start
            assert all(r is not None for r in replies)
            tokens = sum(r["usage"]["completion_tokens"] for r in replies)
            prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
            results[name] = dict(seconds=seconds, completion_tokens=tokens, prompt_tokens=prompt_tokens,
                                 texts=[r["choices"][0]["message"]["content"] for r in replies])
    with capsys.disabled():
        for name, r in results.items():
            print(f"\n{name}: 8 clients, {r['prompt_tokens']} prompt + {r['completion_tokens']} generated tokens "
                  f"in {r['seconds']:.1f} s: {(r['prompt_tokens'] + r['completion_tokens']) / r['seconds']:.0f} tok/s "
                  f"total, {r['completion_tokens'] / r['seconds']:.1f} generated tok/s")
    assert results["batched"]["texts"] == results["serial"]["texts"]
    assert results["batched"]["seconds"] < results["serial"]["seconds"]
