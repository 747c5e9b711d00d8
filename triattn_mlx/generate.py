"""`python -m triattn_mlx.generate`: mlx_lm.generate with a TriAttention KV cache.

mlx-lm's own CLI does the work (flags, model loading, chat template, sampling, streaming,
statistics); three of its module functions are swapped for the duration of the call:
the argument parser (adds the TriAttention flags), `load` (adds .gguf files) and
`generate` (builds the compressed cache, then reports what compression did).
"""

import contextlib
import importlib
import sys

from .cache import PRUNING_MODES, cache_report, check_quantization, check_sizes, make_prompt_cache
from .loading import load, resolve_stats

# The module, not the function mlx_lm/__init__ exports under the same name.
mlx_generate = importlib.import_module("mlx_lm.generate")
_mlx_arg_parser = mlx_generate.setup_arg_parser

DEFAULT_BUDGET = 2048


def add_triattention_args(parser, fallback="estimate them from the prompt", no_compress=True):
    group = parser.add_argument_group("TriAttention KV compression")
    group.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                       help=f"KV tokens kept per head (default: {DEFAULT_BUDGET})")
    group.add_argument("--window", type=int, default=128, help="recent tokens always kept (default: 128)")
    group.add_argument("--divide-length", type=int, default=128,
                       help="prune when budget + this many tokens are cached (default: 128)")
    group.add_argument("--sinks", type=int, default=0, help="first positions always kept (default: 0)")
    group.add_argument("--pruning-mode", choices=PRUNING_MODES, default="per_head",
                       help="per_head: one token set per KV head for all layers (default); "
                            "per_layer_per_head: each layer selects its own")
    group.add_argument("--stats", default="auto",
                       help="calibration stats: a .safetensors file, a Hugging Face repo id, or "
                            f"'auto' (shipped stats matching the model, else {fallback})")
    if no_compress:
        group.add_argument("--no-compress", action="store_true",
                           help="use mlx-lm's full KV cache instead (for comparison)")
    return parser


def setup_arg_parser():
    parser = add_triattention_args(_mlx_arg_parser())
    parser.description = "Generate text with a TriAttention-compressed KV cache (mlx_lm.generate + --budget)"
    parser.add_argument("--prompts-file", default=None,
                        help="generate for every line of this file at once, batched as mlx_lm's "
                             "batch_generate does, each sequence with its own compressed cache")
    return parser


def refuse_draft_model(args):
    if args.draft_model is not None:
        raise ValueError("--draft-model is not supported with compression (speculative decoding "
                         "rewinds the cache past evicted tokens)")


def check_args(args):
    """Refuse what cannot work here, before the model is loaded."""
    if args.max_kv_size is not None:
        raise ValueError("--max-kv-size is replaced by --budget (TriAttention keeps the best "
                         "--budget tokens per head instead of the most recent ones)")
    if not args.no_compress:
        refuse_draft_model(args)
    if args.prompt is not None and args.prompt != "-" and not args.prompt.strip():
        raise ValueError("the prompt is empty: pass --prompt TEXT or --prompt - to read stdin")
    if not args.no_compress:
        make_prompt_cache_options(args)  # validates the sizes
    if args.prompts_file is not None:
        if args.kv_bits is not None:
            raise ValueError("--prompts-file cannot be combined with --kv-bits: quantized caches are not batched")
        if args.prompt_cache_file is not None:
            raise ValueError("--prompts-file cannot be combined with --prompt-cache-file")
        read_prompts(args.prompts_file)


def make_prompt_cache_options(args):
    check_sizes(args.budget, args.window, args.divide_length, args.sinks)
    if args.kv_bits is not None:
        check_quantization(args.kv_bits, args.kv_group_size)
    return dict(budget=args.budget, window=args.window, divide_length=args.divide_length,
                sinks=args.sinks, pruning_mode=args.pruning_mode, measure_prune_time=True,
                kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)


def build_cache(model, args, log=print):
    """The prompt cache for this run: full (--no-compress) or TriAttention."""
    if args.no_compress:
        from mlx_lm.models.cache import make_prompt_cache as full_cache

        return full_cache(model)
    stats = resolve_stats(args.stats, model)
    if stats is None:
        log("[triattn] no shipped calibration stats match this model: estimating query centers "
            "from the prompt's own queries (make reusable stats with python -m triattn_mlx.calibrate)")
        stats = "self"
    return make_prompt_cache(model, stats=stats, **make_prompt_cache_options(args))


def format_report(report):
    mb = 1024**2
    if report["tokens_kept"] is None:
        return (f"KV cache: full, {report['tokens_seen']} tokens, {report['kv_bytes'] / mb:.1f} MB")
    return (
        f"KV cache: {report['tokens_kept']} of {report['tokens_seen']} tokens kept per head "
        f"(budget {report['budget']}), {report['kv_bytes'] / mb:.1f} MB vs "
        f"{report['full_kv_bytes'] / mb:.1f} MB for a full cache\n"
        f"Prune rounds: {report['prune_rounds']}, {report['prune_seconds']:.3f} s in total"
    )


def read_prompts(path):
    """The non-empty lines of `path` ('\\n' in a line stands for a newline, as in --prompt)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line)")
    return prompts


def generate_batch(args):
    """--prompts-file: every prompt at once through mlx-lm's batch_generate, each with its own
    compressed cache (BatchTriAttentionKVCache keeps what each would keep alone)."""
    from mlx_lm.sample_utils import make_sampler

    prompts = read_prompts(args.prompts_file)
    model, tokenizer = load(args.model)
    if args.no_compress:
        caches = [build_cache(model, args) for _ in prompts]
    else:
        stats = resolve_stats(args.stats, model)
        if stats is None:
            raise ValueError("no shipped calibration stats match this model, and self-calibrated caches cannot be "
                             "batched: make stats with python -m triattn_mlx.calibrate and pass --stats")
        caches = [make_prompt_cache(model, stats=stats, **make_prompt_cache_options(args)) for _ in prompts]
    use_template = not args.ignore_chat_template and tokenizer.has_chat_template
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    tokens = [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True)
              if use_template else tokenizer.encode(p) for p in prompts]
    result = mlx_generate.batch_generate(
        model, tokenizer, tokens, prompt_caches=caches, max_tokens=args.max_tokens, return_prompt_caches=True,
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


@contextlib.contextmanager
def patched_mlx_generate(args):
    original = mlx_generate.setup_arg_parser, mlx_generate.load, mlx_generate.generate
    generate_text = original[2]

    def generate(model, tokenizer, prompt, prompt_cache=None, verbose=False, **kwargs):
        if prompt_cache is None:
            prompt_cache = build_cache(model, args, log=lambda m: print(m, file=sys.stderr))
        text = generate_text(model, tokenizer, prompt, prompt_cache=prompt_cache, verbose=verbose, **kwargs)
        if verbose:
            print(format_report(cache_report(prompt_cache)))
        return text

    mlx_generate.setup_arg_parser, mlx_generate.load, mlx_generate.generate = setup_arg_parser, load, generate
    try:
        yield
    finally:
        mlx_generate.setup_arg_parser, mlx_generate.load, mlx_generate.generate = original


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.prompts_file is not None:
            return generate_batch(args)
        saved_argv = sys.argv
        sys.argv = [sys.argv[0], *argv]
        try:
            with patched_mlx_generate(args):
                mlx_generate.main()
        finally:
            sys.argv = saved_argv
    except (ValueError, OSError) as e:  # StatsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
