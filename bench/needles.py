"""The needle run in one command: both models, both contexts, every method, the targets checked.

    python -m bench.needles [--follow-up] [--methods full triattention-auto ...] [--name NAME]
                            [--output results/cpu]

Runs bench.tasks' niah task on the three sets the needle target names, at budgets 25% and
12.5% of the context, with full attention as the ceiling:
  Qwen2.5-Coder-0.5B-Instruct, 4k tokens, needles at depths 10 / 30 / 50 / 70 / 90%;
  Qwen2.5-Coder-0.5B-Instruct, 8k tokens, depths 10 / 50 / 90%;
  Qwen2.5-Coder-1.5B-Instruct, 4k tokens, depths 10 / 30 / 50 / 70 / 90%.
Every row goes to one JSON (+ a PNG heat map: depth x set, a panel per method and budget),
and the targets are checked for each TriAttention row against every baseline row:
  at 25%: every depth of every set at least 95% of full attention's accuracy there, and
          the mean level with or ahead of every baseline's;
  at 12.5%: the mean ahead of every baseline's.
Each check is printed as met / NOT MET with its figures (a benchmark reports; it exits 0
either way). --follow-up asks a chat's second question instead (bench.tasks --follow-up).

Time on 2 CPU cores (float32 0.5B, Q4_K_M 1.5B dequantized), measured: --follow-up with
every method (the default), 60 min with nothing else running; one question, 61 min without
H2O, the cores shared with other jobs for part of it (docs/RESULTS.md 0.10). H2O reads the
model's live queries, so it prefills on its own (the others share one full-attention
prefill per item).
"""

import argparse
import sys
import time
from pathlib import Path

import bench.tasks as tasks_bench  # first: imports triattn_mlx (the OpenBLAS preload) before mlx
import triattn_mlx
from bench.common import RESULTS, plot, write_json
from triattn_mlx.loading import resolve_stats

SETS = (  # (label, model, context, depths)
    ("0.5B 4k", "qwen2.5-coder-0.5b", 4096, (0.1, 0.3, 0.5, 0.7, 0.9)),
    ("0.5B 8k", "qwen2.5-coder-0.5b", 8192, (0.1, 0.5, 0.9)),
    ("1.5B 4k", "qwen2.5-coder-1.5b", 4096, (0.1, 0.3, 0.5, 0.7, 0.9)),
)
BUDGETS = (0.25, 0.125)
METHODS = ("full", "triattention-auto", "triattention-chat", "snapkv", "rkv", "h2o", "streamingllm")
BASELINES = ("snapkv", "rkv", "h2o", "streamingllm")
SHARE_OF_FULL = 0.95  # at 25%: each depth at least this share of full attention's accuracy


def accuracy(rows):
    return sum(r["correct"] for r in rows) / len(rows) if rows else None


def targets(rows):
    """The needle targets, for every TriAttention method in `rows` (tagged with "set"):
    a list of {target, method, met, detail}."""
    def of(method, budget=None, **where):
        return [r for r in rows if r["method"] == method and (method == "full" or r["budget_given"] == budget)
                and all(r[k] == v for k, v in where.items())]

    ran = {r["method"] for r in rows}
    baselines = [b for b in BASELINES if b in ran]
    checks = []
    for method in sorted(m for m in ran if m.startswith("triattention")):
        short = []  # cells under 95% of full attention at 25%
        for cell in sorted({(r["set"], r["depth"]) for r in of(method, 0.25)}):
            where = dict(set=cell[0], depth=cell[1])
            mine, full = accuracy(of(method, 0.25, **where)), accuracy(of("full", **where))
            if full is not None and mine < SHARE_OF_FULL * full:
                short.append(f"{cell[0]} depth {cell[1]:g}: {mine:.2f} against full {full:.2f}")
        if of(method, 0.25):
            checks.append(dict(target=f"25%: every depth at least {SHARE_OF_FULL:.0%} of full attention",
                               method=method, met=not short, detail="; ".join(short) or "every depth"))
        for budget, ahead in ((0.25, False), (0.125, True)):
            mine = accuracy(of(method, budget))
            if mine is None:
                continue
            for baseline in baselines:
                theirs = accuracy(of(baseline, budget))
                if theirs is None:
                    continue
                met = mine > theirs if ahead else mine >= theirs
                checks.append(dict(target=f"{budget * 100:g}%: mean {'ahead of' if ahead else 'level with or ahead of'} "
                                          f"{baseline}", method=method, met=met,
                                   detail=f"{mine:.3f} against {theirs:.3f} ({len(of(method, budget))} items)"))
    return checks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(tasks_bench.METHODS), default=list(METHODS))
    parser.add_argument("--follow-up", action="store_true", help="score a chat's second question (bench.tasks)")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer tokens at most (default: 24)")
    parser.add_argument("--output", default=str(RESULTS / "cpu"))
    parser.add_argument("--name", help="results file name (default: needles[-follow-up])")
    args = parser.parse_args(argv)
    if "full" not in args.methods:
        parser.error("full attention is the ceiling the targets compare with: keep 'full' in --methods")
    return args


def main(argv=None):
    args = parse_args(argv)
    name = args.name or "needles" + ("-follow-up" if args.follow_up else "")
    folder, start = Path(args.output), time.perf_counter()
    header = dict(command="python -m bench.needles " + " ".join(argv if argv is not None else sys.argv[1:]),
                  sets=[dict(set=s, model=m, context=c, depths=list(d)) for s, m, c, d in SETS],
                  budgets=list(BUDGETS), methods={m: tasks_bench.METHODS[m] for m in args.methods})
    rows, loaded = [], {}
    for label, model_name, context, depths in SETS:
        if model_name not in loaded:
            loaded.clear()  # one model in memory at a time
            model, tokenizer = triattn_mlx.load(str(tasks_bench.resolve_model(model_name)))
            loaded[model_name] = model, tokenizer, resolve_stats("auto", model) or "self"
        model, tokenizer, stats = loaded[model_name]
        sizes = dict(contexts=[context], depths=list(depths), budgets=list(BUDGETS), needles=1,
                     max_tokens=args.max_tokens, **({"follow_up": True} if args.follow_up else {}))
        print(f"{label}: {model_name}, {context} tokens, depths {', '.join(f'{d:g}' for d in depths)}")
        result = tasks_bench.run_task("niah", model, tokenizer, stats, sizes, args.methods)
        rows += [dict(r, set=label, item=f"{label}: {r['item']}") for r in result["rows"]]
        write_json(name, {**header, "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows}, folder)
    checks = targets(rows)
    result = dict(rows=rows, summary=tasks_bench.summarize(rows), by_set=tasks_bench.summarize(rows, ("set",)),
                  targets=checks)
    write_json(name, {**header, "wall_seconds": round(time.perf_counter() - start, 1), **result}, folder)
    by_cell = [dict(s, context=s.pop("set")) for s in tasks_bench.summarize(rows, ("set", "depth"))]
    with plot(name, folder) as (fig, _):
        fig.clf()
        tasks_bench.draw_niah(fig, {"by_cell": by_cell, "summary": result["summary"]},
                              "needles" + (" (follow-up questions)" if args.follow_up else ""))
    for s in result["summary"]:
        print(f"{s['label']:50s} {tasks_bench.budget_label(s['budget']):12s} {round(s['accuracy'] * s['items'])}"
              f"/{s['items']}")
    for c in checks:
        print(f"{'met    ' if c['met'] else 'NOT MET'} {tasks_bench.METHODS[c['method']]}: {c['target']}: {c['detail']}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
