"""`python -m triattn_mlx.generate`: mlx_lm.generate with a compressed KV cache.

mlx-lm's own CLI does the work (flags, model loading, chat template, sampling, streaming,
statistics). Three names of its module are swapped for the duration of the call, here
only: `setup_arg_parser` (adds the compression flags), `load` (adds .gguf files, then
`compress(model)`: every cache mlx-lm makes for the model is compressed) and
`load_prompt_cache` (reads compressed caches from --prompt-cache-file). After the text,
what compression did is printed under mlx-lm's statistics.
"""

import contextlib
import importlib
import os
import sys

import mlx.core as mx
from mlx_lm.utils import sharded_load

from . import settings as settings_flags
from .loading import load, model_location, resolve_stats
from .methods import batchable
from .model_info import wait_for_ranks
from .prompt_cache import CacheFactory, attach, cache_report, compress, load_prompt_cache, model_caches

# The module, not the function mlx_lm/__init__ exports under the same name.
mlx_generate = importlib.import_module("mlx_lm.generate")
_mlx_arg_parser = mlx_generate.setup_arg_parser
REPLACED = ("setup_arg_parser", "load", "load_prompt_cache")  # names of mlx_lm.generate, swapped in Run.patched


def setup_arg_parser():
    parser = _mlx_arg_parser()
    parser.description = "Generate text with a compressed KV cache (mlx_lm.generate + --budget)"
    group = settings_flags.add_arguments(parser, stats_fallback="estimate them from the prompt")
    group.add_argument("--no-compress", action="store_true", help="mlx-lm's full KV cache instead (for comparison)")
    parser.add_argument("--pipeline", action="store_true",
                        help="under mlx.launch: split the model by pipeline (layers per process) instead of "
                             "tensor parallelism (heads per process)")
    parser.add_argument("--prompts-file", default=None,
                        help="generate for every line of this file at once, batched as mlx_lm's "
                             "batch_generate does, each sequence with its own compressed cache")
    return parser


def check_args(args):
    """Refuse what cannot work here, before the model is loaded. Returns the Settings."""
    if args.max_kv_size is not None:
        raise ValueError("--max-kv-size is replaced by --budget (a compressed cache keeps the best "
                         "--budget tokens per head instead of the most recent ones)")
    if args.prompt is not None and args.prompt != "-" and not args.prompt.strip():
        raise ValueError("the prompt is empty: pass --prompt TEXT or --prompt - to read stdin")
    if args.no_compress:
        return None
    refuse_draft_model(args)
    settings = settings_flags.from_args(args)
    if args.prompts_file is not None:
        if args.kv_bits is not None:
            raise ValueError("--prompts-file cannot be combined with --kv-bits: quantized caches are not batched")
        if args.prompt_cache_file is not None:
            raise ValueError("--prompts-file cannot be combined with --prompt-cache-file")
        if not batchable(settings.method, None):
            raise ValueError(f"--prompts-file cannot batch --method {settings.method}: its scorer reads the "
                             "model's live queries")
        read_prompts(args.prompts_file)
    return settings


def refuse_draft_model(args):
    if args.draft_model is not None:
        raise ValueError("--draft-model is not supported with compression (speculative decoding "
                         "rewinds the cache past evicted tokens)")


def stats_for(model, args, settings, log):
    """The stats named by --stats; with 'auto' and none shipped, 'self' and a notice."""
    if settings.method != "triattention":
        return None
    stats = resolve_stats(args.stats, model)
    if stats is None:
        if args.prompts_file is not None:
            raise ValueError("no shipped calibration stats match this model, and self-calibrated caches cannot be "
                             "batched: make stats with python -m triattn_mlx.calibrate and pass --stats")
        log("[triattn] no shipped calibration stats match this model: estimating query centers "
            "from the prompt's own queries (make reusable stats with python -m triattn_mlx.calibrate)")
        stats = "self"
    return stats


def format_report(report):
    mb = 1024**2
    if report["tokens_kept"] is None:
        return f"KV cache: full, {report['tokens_seen']} tokens, {report['kv_bytes'] / mb:.1f} MB"
    return (
        f"KV cache: {report['tokens_kept']} of {report['tokens_seen']} tokens kept per head "
        f"(budget {report['budget']}, {report['method']}), {report['kv_bytes'] / mb:.1f} MB vs "
        f"{report['full_kv_bytes'] / mb:.1f} MB for a full cache\n"
        f"Prune rounds: {report['prune_rounds']}"
    )


def read_prompts(path):
    """The non-empty lines of `path` ('\\n' in a line stands for a newline, as in --prompt)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line)")
    return prompts


class Run:
    """One CLI run: loads and compresses the model, remembers the caches it used."""

    def __init__(self, args, settings):
        self.args, self.settings = args, settings
        self.model = self.loaded = None

    def load(self, path, *args, **kwargs):
        group = mx.distributed.init()
        if group.size() > 1:  # under mlx.launch: mlx-lm's sharded_load, rank 0 prints
            model, *rest = sharded_load(model_location(path), **{"pipeline_group" if self.args.pipeline else
                                                                "tensor_group": group},
                                        return_config=kwargs.get("return_config", False),
                                        tokenizer_config=kwargs.get("tokenizer_config"))
            if group.rank() != 0:
                sys.stdout = open(os.devnull, "w")
        else:
            model, *rest = load(path, *args, **kwargs)
        if self.settings is None:  # --no-compress: mlx-lm's own caches, remembered for the report
            model.make_cache = CacheFactory(lambda: model_caches(model))
        else:
            log = lambda m: print(m, file=sys.stderr)  # noqa: E731
            stats = stats_for(model, self.args, self.settings, log)
            compress(model, self.settings, stats=stats)
        self.model = model
        if self.loaded is not None:  # --prompt-cache-file was read first: its caches observe through this model
            attach(self.loaded, model)
        return (model, *rest)

    def load_prompt_cache(self, *args, **kwargs):
        result = load_prompt_cache(*args, **kwargs)
        self.loaded = result[0] if isinstance(result, tuple) else result
        return result

    def caches(self):
        """The prompt cache the generation used: loaded from a file, or made by mlx-lm."""
        if self.loaded is not None:
            return self.loaded
        made = getattr(self.model, "make_cache", None)
        return getattr(made, "last", None)

    @contextlib.contextmanager
    def patched(self):
        original = {n: getattr(mlx_generate, n) for n in REPLACED}
        mlx_generate.setup_arg_parser = setup_arg_parser
        mlx_generate.load, mlx_generate.load_prompt_cache = self.load, self.load_prompt_cache
        try:
            yield
        finally:
            for name, value in original.items():
                setattr(mlx_generate, name, value)


def generate_batch(args, settings):
    """--prompts-file: every prompt at once through mlx-lm's batch_generate; each sequence's
    compressed cache keeps what it would keep alone."""
    from mlx_lm.sample_utils import make_sampler

    prompts = read_prompts(args.prompts_file)
    run = Run(args, settings)
    model, tokenizer = run.load(args.model)
    use_template = not args.ignore_chat_template and tokenizer.has_chat_template
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    tokens = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True)
              if use_template else tokenizer.encode(p) for p in prompts]
    result = mlx_generate.batch_generate(
        model, tokenizer, tokens, max_tokens=args.max_tokens, return_prompt_caches=True,
        sampler=make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k),
        prefill_step_size=args.prefill_step_size)
    for i, (text, cache) in enumerate(zip(result.texts, result.caches)):
        print(f"==========\nPrompt {i + 1}: {len(tokens[i])} tokens\n{text}")
        if args.verbose:
            print(format_report(cache_report(cache)))
    print("==========")
    if args.verbose:
        stats = result.stats
        print(f"Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens / max(stats.prompt_time, 1e-9):.1f} "
              "tokens-per-sec")
        print(f"Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tokens-per-sec")
        print(f"Peak memory: {stats.peak_memory:.3f} GB")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = setup_arg_parser().parse_args(argv)
    try:
        settings = check_args(args)
        if args.prompts_file is not None:
            return generate_batch(args, settings)
        run = Run(args, settings)
        saved_argv, sys.argv = sys.argv, [sys.argv[0], *argv]
        try:
            with run.patched():
                mlx_generate.main()
        finally:
            sys.argv = saved_argv
        wait_for_ranks(mx.distributed.init())
        caches = run.caches()
        if args.verbose and caches is not None:
            print(format_report(cache_report(caches)))
    except (ValueError, OSError) as e:  # StatsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
