"""`python -m triattn_mlx.server`: mlx_lm.server with every KV cache it makes compressed.

mlx-lm's own server does the work: HTTP, the model provider, the prompt cache that reuses
caches across chat turns, batching of concurrent requests, streaming, every flag, and the
distributed branch (under mlx.launch rank 0 serves HTTP and the other ranks follow). Two
of its names are replaced while it runs (MLX_LM_NAMES lists every name relied on;
tests/test_mlx_lm_contract.py fails, naming it, if an mlx-lm release changes one):
- `ModelProvider`, by a subclass whose `load` compresses the model it loads
  (`compress(model)`: mlx-lm makes every cache through model.make_cache), opens .gguf
  files (as converted folders), and marks the model not batchable for methods whose
  caches cannot share a batch. It loads the default model at once, so a bad --model or
  --stats is a clean error before the server starts;
- `scan_cache_dir`: `/v1/models` fails in mlx-lm when no Hugging Face cache folder
  exists (a user of .gguf files may have none); this answers with no cached repos.
Reuse across turns is mlx-lm's: a compressed cache stands for its whole token history and
is trimmable (as mlx-lm's RotatingKVCache) until it evicts, so a next turn that extends
the history continues from it, and one that diverges inside it starts from a shorter
stored prefix (mlx-lm keeps those for caches it cannot trim) or from scratch.
"""

import argparse
import logging
import sys

import mlx_lm.server as mlx_server

from . import settings as settings_flags
from .corpus import default_calibration_text
from .loading import model_location, resolve_stats
from .methods import batchable
from .prompt_cache import CacheFactory, compress
from .stats import calibrate

CALIBRATION_TOKENS = 2048  # built-in text used when no shipped stats match the model

# (module, name, what it must be): the mlx-lm surface this module relies on
MLX_LM_NAMES = [
    ("mlx_lm.server", "ModelProvider", "class: __init__(cli_args); load(model_path, adapter_path, "
                                       "draft_model_path) -> (model, tokenizer); attributes is_batchable, draft_model"),
    ("mlx_lm.server", "main", "function: parses sys.argv, builds ModelProvider(args), serves"),
    ("mlx_lm.server", "scan_cache_dir", "function: huggingface_hub's, read by /v1/models"),
    ("mlx_lm.models.cache", "make_prompt_cache", "function: returns model.make_cache() when the model has one"),
]


class CompressedModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider, compressing each model it loads."""

    def __init__(self, cli_args, *, settings, stats_spec):
        if cli_args.draft_model is not None:
            raise ValueError("--draft-model is not supported with compression (speculative decoding "
                             "rewinds the cache past evicted tokens)")
        if cli_args.model is not None:
            cli_args.model = model_location(cli_args.model)
        super().__init__(cli_args)
        self.settings = settings.replace(kv_bits=cli_args.kv_bits, kv_group_size=cli_args.kv_group_size)
        self.stats_spec = stats_spec
        self.load_default()

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        if model_path != "default_model":  # a request naming a model: a folder, repo id or .gguf
            model_path = model_location(model_path)
        model, tokenizer = super().load(model_path, adapter_path, draft_model_path)
        if not isinstance(getattr(model, "make_cache", None), CacheFactory):
            stats = server_stats(model, tokenizer, self.settings, self.stats_spec)
            compress(model, self.settings, stats=stats)
            self.is_batchable = self.is_batchable and batchable(self.settings.method, stats)
        return model, tokenizer


def server_stats(model, tokenizer, settings, spec):
    """Given or shipped stats, else a calibration on built-in text when the model loads,
    with a warning (never a silent fallback). None for methods that need no stats."""
    if settings.method != "triattention":
        return None
    stats = resolve_stats(spec, model)
    if stats is None:
        logging.warning(f"[triattn] no shipped stats match this model: calibrating on "
                        f"{CALIBRATION_TOKENS} tokens of built-in text (make reusable stats "
                        "with python -m triattn_mlx.calibrate and pass --stats)")
        tokens = tokenizer.encode(default_calibration_text())[:CALIBRATION_TOKENS]
        stats = calibrate(model, tokens, source="triattn_mlx built-in text")
    return stats


def scan_cache_dir():
    """huggingface_hub's scan_cache_dir, empty when the hub cache folder does not exist yet."""
    from huggingface_hub import scan_cache_dir as scan
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan()
    except CacheNotFound:
        return argparse.Namespace(repos=frozenset())


def compression_parser():
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    settings_flags.add_arguments(parser, stats_fallback="calibrate once on built-in text",
                                 **settings_flags.CHAT_DEFAULTS)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = compression_parser()
    if "-h" in argv or "--help" in argv:
        print("python -m triattn_mlx.server: mlx_lm.server with compressed KV caches.\n")
        print(parser.format_help())
        print("mlx_lm.server options:")
    args, rest = parser.parse_known_args(argv)
    saved = sys.argv, mlx_server.ModelProvider, mlx_server.scan_cache_dir
    try:
        settings = settings_flags.from_args(args)

        def provider(cli_args):
            return CompressedModelProvider(cli_args, settings=settings, stats_spec=args.stats)

        sys.argv = [sys.argv[0], *rest]
        mlx_server.ModelProvider, mlx_server.scan_cache_dir = provider, scan_cache_dir
        mlx_server.main()
    except (ValueError, OSError) as e:  # StatsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv, mlx_server.ModelProvider, mlx_server.scan_cache_dir = saved


if __name__ == "__main__":
    main()
