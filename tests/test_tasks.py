"""Task data, prompts, scoring and the sandbox (support/tasks.py), and the task runner
(bench/tasks.py) on the real test model."""

import json
import re
import socket
import threading

import pytest

from support import tasks


@pytest.fixture(scope="module")
def tokenizer(real_model):
    return real_model[1]


# -- needle in a haystack ------------------------------------------------------------------

@pytest.mark.parametrize("context", [300, 512, 777, 2048, 4096])
def test_haystack_is_exactly_the_context(tokenizer, context):
    for i, depth in enumerate((0.0, 0.37, 1.0)):
        needle = tasks.make_needle(tasks.NEEDLE_KINDS[i], seed=context)
        hay = tasks.haystack(tokenizer, context, depth, needle, start=i)
        assert len(hay.tokens) == context
        # the tokens are the chat template's, as mlx-lm would encode the prompt string
        user = tasks.niah_user_text(hay.document, needle.question)
        assert hay.tokens == tasks.chat_tokens(tokenizer, user)
        text = tokenizer.decode(hay.tokens)
        assert text.count(needle.sentence) == 1
        assert text.index("</document>") < text.rindex(needle.question)  # the question after the document


def test_haystack_fits_where_the_cut_lands_after_whitespace(tokenizer):
    # here the count jumps from 310 to 312 tokens at the end of a paragraph ("words.\n\nI")
    hay = tasks.haystack(tokenizer, 311, 0.5, tasks.make_needle("city", 311), start=311)
    assert len(hay.tokens) == 311


def test_needle_at_the_requested_depth_on_a_sentence_boundary(tokenizer):
    needle = tasks.make_needle("number", 1)
    for depth in (0.1, 0.25, 0.5, 0.75, 0.9):
        hay = tasks.haystack(tokenizer, 2048, depth, needle)
        assert abs(hay.needle_depth - depth) < 0.03, (depth, hay.needle_depth)
        at = hay.document.index(needle.sentence)
        assert re.search(r"[.!?][\"')\]]?\s+$", hay.document[:at]), hay.document[at - 40 : at]
    assert tasks.haystack(tokenizer, 1024, 0.0, needle).document.startswith(needle.sentence)
    assert tasks.haystack(tokenizer, 1024, 1.0, needle).document.endswith(needle.sentence)
    with pytest.raises(ValueError, match="depth"):
        tasks.haystack(tokenizer, 1024, 1.5, needle)


def test_haystack_plants_other_needles_not_asked_about(tokenizer):
    """A follow-up's document: the needle asked about and others, each once, each at its
    depth, in exactly `context` tokens; only the first needle's question is asked."""
    asked, other = tasks.make_needle("city", 5), tasks.make_needle("number", 5)
    for depth, other_depth in ((0.7, 0.3), (0.1, 0.5), (0.0, 1.0)):
        hay = tasks.haystack(tokenizer, 1024, depth, asked, start=2, others=[(other_depth, other)])
        assert len(hay.tokens) == 1024
        assert hay.tokens == tasks.chat_tokens(tokenizer, tasks.niah_user_text(hay.document, asked.question))
        text = tokenizer.decode(hay.tokens)
        assert text.count(asked.sentence) == 1 and text.count(other.sentence) == 1
        assert other.question not in text
        assert abs(hay.needle_depth - depth) < 0.03
        at = hay.document.index(other.sentence)
        other_at = len(tokenizer.encode(hay.document[:at], add_special_tokens=False)) / hay.document_tokens
        assert abs(other_at - other_depth) < 0.03, (other_depth, other_at)
        assert hay.other_depths == (other_at,)
    alone = tasks.haystack(tokenizer, 1024, 0.7, asked, start=2)
    assert alone.tokens == tasks.haystack(tokenizer, 1024, 0.7, asked, start=2, others=()).tokens


def test_follow_up_prompt_extends_the_first_turn(tokenizer):
    """The second turn's prompt repeats the first prompt and the reply, so a cache carried
    on from the first turn reads only the new tokens."""
    needle = tasks.make_needle("code", 1)
    hay = tasks.haystack(tokenizer, 400, 0.5, needle)
    user = tasks.niah_user_text(hay.document, needle.question)
    turn = tasks.follow_up_tokens(tokenizer, user, "ABC-1234", "Where does Noor live?")
    assert turn[: len(hay.tokens)] == hay.tokens
    rest = tokenizer.decode(turn[len(hay.tokens):])
    assert rest.index("ABC-1234") < rest.index("Where does Noor live?")


def test_needles_are_deterministic_varied_and_absent_from_the_essays(tokenizer):
    assert tasks.make_needle("code", 7) == tasks.make_needle("code", 7)
    assert tasks.haystack(tokenizer, 600, 0.5, tasks.make_needle("date", 3)).tokens == \
        tasks.haystack(tokenizer, 600, 0.5, tasks.make_needle("date", 3)).tokens
    corpus = tasks.haystack_text().lower()
    assert len(tasks.essays()) == 48
    for kind in tasks.NEEDLE_KINDS:
        values = {tasks.make_needle(kind, seed).answer for seed in range(40)}
        assert len(values) > 5, kind
        assert not [v for v in values if v.lower() in corpus], kind


@pytest.mark.parametrize("kind, reply, correct, partial", [
    ("number", "The special magic number is 8005154.", True, 1.0),
    ("number", "It is 8,005,154", True, 1.0),
    ("number", "80", False, 2 / 7),
    ("number", "8005155", False, 6 / 7),
    ("number", "80051540", False, 1.0),  # a longer number is not the value (its 7 digits are in place)
    ("number", "I don't know.", False, 0.0),
    ("passphrase", 'The passphrase is "KAMIKAKA".', True, 1.0),
    ("passphrase", "kamikaze", False, 0.75),
    ("city", "Hobart", True, 1.0),
    ("city", "Apple is in Paris", False, 0.0),
    ("date", "September 26, 2090", True, 1.0),
    ("date", "It is scheduled for 26 Sept. 2090.", True, 1.0),
    ("date", "2090-09-26", True, 1.0),
    ("date", "September 27, 2090", False, 2 / 3),
    ("code", "The code is vgx-4432", True, 1.0),
    ("code", "VGX-4433", False, 7 / 8),
])
def test_needle_scores(kind, reply, correct, partial):
    needle = tasks.make_needle(kind, 1)  # 8005154 / kamikaka / Hobart / September 26, 2090 / VGX-4432
    score = tasks.score_needle(needle, reply)
    assert score["correct"] is correct
    assert score["partial"] == pytest.approx(partial)


def test_needle_values_used_by_the_score_cases():
    assert [tasks.make_needle(k, 1).answer for k in tasks.NEEDLE_KINDS] == \
        ["8005154", "kamikaka", "Hobart", "September 26, 2090", "VGX-4432"]


# -- GSM8K ---------------------------------------------------------------------------------

def test_gsm8k_problems_and_prompt(tokenizer):
    problems = tasks.gsm8k_problems()
    assert len(problems) == 100 and len({p["id"] for p in problems}) == 100
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p["answer"]) for p in problems)
    first = next(p for p in problems if p["id"] == 473)
    assert first["answer"] == "10" and "remoras" in first["question"]
    text = tokenizer.decode(tasks.gsm8k_prompt(tokenizer, first))
    assert first["question"] in text and "The answer is" in text and text.endswith("assistant\n")


@pytest.mark.parametrize("reply, expected", [
    ("3 + 4 = 7 apples.\nThe answer is 7.", "7"),
    ("The answer is $1,234.50.", "1234.50"),
    ("She pays 5 * 3 = 15.\n#### 15", "15"),
    ("So the total is \\boxed{42}.", "42"),
    ("The answer is: -3", "-3"),
    ("The answer is **18**.", "18"),
    ("The answer is 10. Check: 10 + 20 = 30.", "10"),  # the answer line wins over later numbers
    ("He has 5 apples and then 3 more, 8 in all", "8"),  # no answer line: the last number
    ("I cannot solve this.", None),
])
def test_gsm8k_answer_extraction(reply, expected):
    assert tasks.extract_gsm8k_answer(reply) == expected


def test_gsm8k_comparison_and_stop_rule():
    assert tasks.gsm8k_correct("1234.50", "1234.5") and tasks.gsm8k_correct("72.0", "72")
    assert not tasks.gsm8k_correct("71", "72") and not tasks.gsm8k_correct(None, "72")
    assert not tasks.gsm8k_answer_complete("The answer is 3")  # "3" may go on: "35"
    assert not tasks.gsm8k_answer_complete("The answer is 3.")  # or "3.5"
    assert not tasks.gsm8k_answer_complete("So the answer is 3 times larger.\n")
    assert tasks.gsm8k_answer_complete("The answer is 3.5.\n") and tasks.gsm8k_answer_complete("The answer is **42**\n")


# -- HumanEval -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def problem():
    problems = tasks.humaneval_problems()
    assert len(problems) == 164
    return problems[0]  # has_close_elements, needs `from typing import List`


BODY = """    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
"""


def test_humaneval_correct_solution_passes(problem):
    reply = ("Here is the function:\n\n```python\ndef has_close_elements(numbers: List[float], threshold: float)"
             f" -> bool:\n{BODY}```\n\nIt compares every pair.")
    program = tasks.extract_code(reply, problem)
    assert program.startswith("from typing import List")
    result = tasks.check_humaneval(problem, program)
    assert result["passed"], result["output"]
    assert tasks.check_humaneval(problem, tasks.extract_code(BODY, problem))["passed"]  # a raw completion


def test_humaneval_wrong_solution_fails(problem):
    result = tasks.check_humaneval(problem, problem["prompt"] + "    return False\n")
    assert not result["passed"] and result["status"] == "failed" and "AssertionError" in result["output"]


def test_humaneval_infinite_loop_times_out(problem):
    result = tasks.check_humaneval(problem, problem["prompt"] + "    while True:\n        pass\n", timeout=1.5)
    assert result["status"] == "timeout" and not result["passed"]


@pytest.fixture
def listener():
    """A TCP server on this machine's loopback: reachable from here, not from the sandbox."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_humaneval_code_cannot_reach_the_network(problem, listener):
    socket.create_connection(("127.0.0.1", listener), timeout=5).close()  # the server is there
    program = (f"import socket\nsocket.create_connection(('127.0.0.1', {listener}), timeout=5)\n"
               + problem["prompt"] + BODY)
    result = tasks.check_humaneval(problem, program)
    assert not result["passed"] and "network access is disabled" in result["output"]


def test_sandbox_network_namespace_holds_without_the_socket_guard(listener):
    if not tasks.network_namespace_prefix():
        pytest.skip("no network namespace here (unshare unavailable): only the socket guard applies")
    # _socket is below the guard: only the namespace stops it
    program = f"import _socket\ns = _socket.socket()\ns.settimeout(5)\ns.connect(('127.0.0.1', {listener}))\n"
    result = tasks.run_program(program)
    assert result["status"] == "failed", result


def test_extract_code_picks_the_block_with_the_function(problem):
    reply = ("```python\nprint('usage')\n```\n\n```python\ndef has_close_elements(numbers, threshold):\n"
             "    return True\n```")
    assert "return True" in tasks.extract_code(reply, problem)
    assert tasks.code_block_complete(reply) and not tasks.code_block_complete("```python\ndef f():\n")


# -- the runner ----------------------------------------------------------------------------

def test_triattention_without_stats_is_skipped_with_one_line(capsys):
    from bench import tasks as bench

    methods, skipped = bench.runnable(["full", "triattention", "snapkv", "rotating"], stats=None)
    assert methods == ["full", "snapkv", "rotating"] and set(skipped) == {"triattention"}
    assert "skipping TriAttention (per_head)" in capsys.readouterr().out


def test_every_method_builds_the_cache_it_names(real_model):
    import mlx_lm.models.cache as mlx_cache

    from bench import tasks as bench
    from triattn_mlx.cache import TriAttentionKVCache
    from triattn_mlx.loading import shipped_stats

    model = real_model[0]
    real_stats = shipped_stats(model)
    full = bench.method_caches(model, "full", None, real_stats)
    assert {type(c) for c in full} == {mlx_cache.KVCache}
    # mlx-lm's make_prompt_cache(max_kv_size=) gives this llama model full caches: the row must not
    rotating = bench.method_caches(model, "rotating", 128, real_stats)
    assert all(isinstance(c, mlx_cache.RotatingKVCache) and c.max_size == 128 and c.keep == 4 for c in rotating)
    assert bench.mlx_ignores_max_kv_size(model)
    for method, options in bench.TRIATTENTION.items():
        caches = bench.method_caches(model, method, 128, real_stats)
        assert all(isinstance(c, TriAttentionKVCache) for c in caches)
        mode, prompt_mode = options["pruning_mode"], options.get("prompt_mode", "whole")
        assert {(c.settings.budget, c.settings.window, c.settings.pruning_mode, c.settings.prompt_mode)
                for c in caches} == {(128, 64, mode, prompt_mode)}
        assert (caches[0].group is not None) == (caches[0].settings.selection == "per_head")
    for method, options in bench.BASELINES.items():  # like for like: the same cache and settings, another score
        caches = bench.method_caches(model, method, 128, real_stats)
        assert {(c.settings.method, c.settings.pruning_mode, c.settings.window) for c in caches} == {
            (options["method"], options["pruning_mode"], 64)}
        assert (caches[0].group is not None) == (options["pruning_mode"] == "per_head")
        bench.cleanup(model)
    assert bench.method_caches(model, "triattention", 1024, real_stats)[0].settings.window == 128  # the default


def test_niah_runner_end_to_end(real_model, tmp_path, monkeypatch):
    """SmolLM2-135M, one 512-token haystack, two methods, through the command line. The 135M
    model finds this needle (a 7-digit number at 50%) with full attention; harder needles
    it can miss, so only this one is asserted answered."""
    from bench import tasks as bench

    monkeypatch.setattr(bench.triattn_mlx, "load", lambda path: real_model)  # loaded once per session

    bench.main(["niah", "--quick", "--contexts", "512", "--depths", "0.5", "--budgets", "0.25",
                "--methods", "full", "triattention", "--output", str(tmp_path), "--name", "run"])
    result = json.loads((tmp_path / "run.json").read_text())
    assert (tmp_path / "run.png").is_file()
    assert result["task"] == "niah" and result["sizes"]["contexts"] == [512]
    assert [r["method"] for r in result["rows"]] == ["full", "triattention"]
    full, tri = result["rows"]
    assert full["budget"] is None and tri["budget"] == 128 and tri["budget_given"] == 0.25
    for row in result["rows"]:
        assert {"output", "correct", "partial", "seconds", "prompt_tps", "finish", "kv_bytes"} <= set(row)
        assert row["context"] == 512 and row["kind"] == "number" and abs(row["needle_depth"] - 0.5) < 0.05
    assert result["items"][0]["prompt_tokens"] == 512
    assert tri["tokens_kept"] <= 128 + 128  # pruned (budget + divide_length at most)
    assert full["correct"], full["output"]
    summary = {s["method"]: s for s in result["summary"]}
    assert summary["triattention"]["full_accuracy_same_items"] == 1.0
    assert {(c["method"], c["depth"]) for c in result["by_cell"]} == {("full", 0.5), ("triattention", 0.5)}


def test_niah_follow_up_through_the_carried_cache(real_model, tmp_path, monkeypatch):
    """--follow-up: the first question asks about another needle, and the needle scored is
    asked in a second chat turn through the same caches. With full attention the carried
    cache must answer as a fresh prefill of the whole conversation does (the slow reference);
    the compressed cache stays within its budget across both turns."""
    import mlx_lm.models.cache as mlx_cache
    from bench import tasks as bench

    model, tokenizer = real_model
    monkeypatch.setattr(bench.triattn_mlx, "load", lambda path: real_model)
    bench.main(["niah", "--contexts", "512", "--depths", "0.5", "--budgets", "0.25", "--max-tokens", "12",
                "--follow-up", "--methods", "full", "triattention", "--output", str(tmp_path), "--name", "fu"])
    result = json.loads((tmp_path / "fu.json").read_text())
    full, tri = result["rows"]
    for row in result["rows"]:
        assert row["first_depth"] == 0.9 and row["first_kind"] != row["kind"] and row["first_output"]
        assert {"first_correct", "correct", "partial"} <= set(row)
    assert tri["tokens_kept"] <= 128 + 128

    item = bench.niah_items(tokenizer, dict(contexts=[512], depths=[0.5], needles=1, follow_up=True))[0]
    turn = tasks.follow_up_tokens(tokenizer, item["_user_text"], full["first_output"], item["question"])
    fresh = bench.generate(model, tokenizer, turn, mlx_cache.make_prompt_cache(model), 12, 2048,
                           lambda text: bench.niah_found(item, text))
    assert full["output"] == fresh["output"]


def test_batched_runs_give_what_one_at_a_time_gives(real_model, tmp_path, monkeypatch):
    """--batch: gsm8k items generated together through mlx-lm's batch_generate, each with its
    own cache, reply what each gives alone (greedy, the same caches); a method whose cache
    cannot be batched is dropped with its reason, the others go on."""
    from bench import tasks as bench

    monkeypatch.setattr(bench.triattn_mlx, "load", lambda path: real_model)
    common = ["gsm8k", "--limit", "2", "--budgets", "64", "--max-tokens", "12", "--output", str(tmp_path)]
    bench.main(common + ["--methods", "full", "triattention", "h2o", "--batch", "2", "--name", "batched"])
    bench.main(common + ["--methods", "full", "triattention", "--name", "alone"])
    batched, alone = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("batched", "alone"))
    assert "H2O" in batched["skipped"] and "cannot be batched" in batched["skipped"]["H2O"]
    assert [(r["method"], r["item"]) for r in batched["rows"]] == [(m, i["id"]) for m in ("full", "triattention")
                                                                   for i in batched["items"]]
    assert all(r["batch"] == 2 and r["generated_tokens"] <= 12 for r in batched["rows"])
    tri = [r for r in batched["rows"] if r["method"] == "triattention"]
    assert all(r["tokens_kept"] <= 64 + 128 for r in tri)  # each prompt was compressed at its end
    one = {(r["method"], r["item"]): r["output"] for r in alone["rows"]}
    for r in batched["rows"]:  # the alone run stops early once an answer line ends: compare its length
        reference = one[(r["method"], r["item"])]
        assert r["output"][: len(reference)] == reference


def test_batch_is_refused_for_niah_and_below_one():
    from bench import tasks as bench

    for argv in (["niah", "--batch", "2"], ["gsm8k", "--batch", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
