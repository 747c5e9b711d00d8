"""`python -m triattn_mlx.server`: mlx_lm.server with every KV cache it makes compressed.

mlx-lm's own server does the work (HTTP handler, model provider, prompt cache, streaming,
every flag). Four of its pieces are swapped, all here:
- `make_prompt_cache`: TriAttention caches, with stats resolved once per loaded model;
- `load`: adds .gguf files, and resolves the model's stats right after loading it;
- the prompt cache (`CompressedPromptCache`): a stored cache stands for its whole token
  history though it holds only `budget` tokens. A request extending that history continues
  from it; one that diverges inside it reuses it only if trimming the divergent tail
  succeeds (the tail is still cached), else it is recomputed. Caches made with different
  compression settings are never mixed.
- the handler (`CompressedAPIHandler`): validates the per-request `kv_budget` field and
  max_tokens against the model's context, and answers GET /v1/triattention/cache with the
  measured state of the stored caches.
- the response generator (`CompressedResponseGenerator`): concurrent requests with the
  server's settings are batched by mlx-lm's BatchGenerator (BatchTriAttentionKVCache); a
  request with its own kv_budget is served alone.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import sys

import mlx_lm.server as mlx_server

from .cache import cache_report, check_quantization, check_sizes, make_prompt_cache
from .corpus import default_calibration_text
from .generate import add_triattention_args, refuse_draft_model
from .loading import load, resolve_stats
from .stats import calibrate

CALIBRATION_TOKENS = 2048  # built-in text used when no shipped stats match the model


@dataclasses.dataclass(frozen=True)
class Settings:
    budget: int
    window: int
    divide_length: int
    sinks: int
    pruning_mode: str
    kv_bits: int = None
    kv_group_size: int = 64

    def check(self):
        check_sizes(self.budget, self.window, self.divide_length, self.sinks)
        if self.kv_bits is not None:
            check_quantization(self.kv_bits, self.kv_group_size)
        return self


class Compression:
    """The server's compression settings, the current request's, and stats per model."""

    def __init__(self, args):
        self.default = Settings(args.budget, args.window, args.divide_length, args.sinks,
                                args.pruning_mode).check()
        self.current = self.default
        self.stats_spec = args.stats
        self._stats = {}  # id(model) -> Stats

    def quantize(self, bits, group_size):
        """mlx_lm.server's --kv-bits / --kv-group-size: store the kept tokens quantized."""
        self.default = self.current = dataclasses.replace(self.default, kv_bits=bits, kv_group_size=group_size).check()

    def settings_for(self, kv_budget):
        """Settings for a request's `kv_budget` (None: the server's); ValueError if invalid."""
        if kv_budget is None:
            return self.default
        return dataclasses.replace(self.default, budget=kv_budget).check()

    def prepare(self, model, tokenizer):
        """Resolve the model's stats once, when it is loaded: shipped/given stats, else a
        calibration on built-in text (never a silent fallback)."""
        stats = resolve_stats(self.stats_spec, model)
        if stats is None:
            logging.warning(f"[triattn] no shipped stats match this model: calibrating on "
                            f"{CALIBRATION_TOKENS} tokens of built-in text (make reusable stats "
                            "with python -m triattn_mlx.calibrate and pass --stats)")
            tokens = tokenizer.encode(default_calibration_text())[:CALIBRATION_TOKENS]
            stats = calibrate(model, tokens, source="triattn_mlx built-in text")
        self._stats = {id(model): stats}

    def make_cache(self, model, *args, **kwargs):
        s = self.current
        return make_prompt_cache(model, s.budget, stats=self._stats[id(model)], window=s.window,
                                 divide_length=s.divide_length, sinks=s.sinks,
                                 pruning_mode=s.pruning_mode, kv_bits=s.kv_bits,
                                 kv_group_size=s.kv_group_size)


def _trims_fully(cache, n):
    """Whether every layer can drop its newest n tokens: a compressed cache only while they
    are still held (trimmable_tokens), mlx-lm's caches while it holds n tokens."""
    return all(c.is_trimmable() and n <= min(c.offset, getattr(c, "trimmable_tokens", c.offset)) for c in cache)


class CompressedPromptCache(mlx_server.LRUPromptCache):
    """mlx-lm's LRU prompt cache, keyed also by compression settings, reusing a longer
    stored cache only when trimming it back to the common prefix succeeds."""

    def __init__(self, compression, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compression = compression

    def _key(self, model):
        return (model, self.compression.current)

    def fetch_nearest_cache(self, model, tokens):
        result = self._trie.search(self._key(model), tokens)
        shorter = len(result.shorter) if result.shorter is not None else 0
        longer = result.exact
        prefix = len(tokens) - 1  # at least one token must be run to get the next logits
        if longer is None and result.longer is not None and result.common_prefix > shorter:
            longer, prefix = result.longer, min(prefix, result.common_prefix)
        if longer is not None and prefix > 0:
            stored = self._trie.get(result.model, longer).prompt_cache
            n = len(longer) - prefix
            if _trims_fully(stored, n):  # checked before copying: a copy of a long cache is not free
                cache = copy.deepcopy(stored)
                if all(c.trim(n) == n for c in cache):
                    return cache, tokens[prefix:]
            logging.info(f"[triattn] prompt diverges {n} tokens back, inside evicted history: recomputing")
        if shorter > 0:
            return copy.deepcopy(self._trie.get(result.model, result.shorter).prompt_cache), tokens[shorter:]
        return None, tokens

    def insert_cache(self, model, tokens, prompt_cache, **kwargs):
        super().insert_cache(self._key(model), tokens, prompt_cache, **kwargs)
        logging.info("[triattn] " + json.dumps(cache_report(prompt_cache)))

    def reports(self):
        """cache_report of every stored cache (read from the HTTP threads: a snapshot)."""
        out = []
        for lru in list(self._lru._lrus.values()):
            for key, tokens in list(lru):
                with contextlib.suppress(KeyError, ValueError, AttributeError):
                    out.append(cache_report(self._trie.get(key, tokens).prompt_cache))
        return out


class CompressedResponseGenerator(mlx_server.ResponseGenerator):
    """Requests with the server's compression settings are batched (mlx-lm's BatchGenerator,
    through BatchTriAttentionKVCache); a request with its own kv_budget is served alone
    (its cache could not share a batch with the others')."""

    def generate(self, request, generation_args, progress_callback=None):
        generation_args.settings = getattr(request, "settings", None)
        return super().generate(request, generation_args, progress_callback)

    def _is_batchable(self, args):
        settings = getattr(args, "settings", None)
        return super()._is_batchable(args) and settings in (None, self.prompt_cache.compression.default)

    def _serve_single(self, request, stream):
        compression = self.prompt_cache.compression
        compression.current = getattr(request[1], "settings", compression.default)
        try:
            super()._serve_single(request, stream)
        finally:
            compression.current = compression.default


class CompressedAPIHandler(mlx_server.APIHandler):
    def validate_model_parameters(self):
        super().validate_model_parameters()
        compression = self.response_generator.prompt_cache.compression
        kv_budget = self.body.get("kv_budget")
        if kv_budget is not None and (not isinstance(kv_budget, int) or isinstance(kv_budget, bool)):
            raise ValueError("kv_budget must be of type int")
        try:
            self.settings = compression.settings_for(kv_budget)
        except ValueError as e:
            raise ValueError(f"kv_budget: {e}") from None
        limit = self._context_length()
        if limit is not None and self.max_tokens > limit:
            raise ValueError(f"max_tokens must be at most {limit} (the model's context length)")

    def _context_length(self):
        model = self.response_generator.model_provider.model
        args = getattr(model, "args", None)
        return getattr(args, "max_position_embeddings", None)

    def handle_chat_completions(self):
        request = super().handle_chat_completions()
        request.settings = self.settings
        return request

    def handle_text_completions(self):
        request = super().handle_text_completions()
        request.settings = self.settings
        return request

    def do_GET(self):
        if self.path != "/v1/triattention/cache":
            return super().do_GET()
        prompt_cache = self.response_generator.prompt_cache
        reports = prompt_cache.reports()
        body = {"settings": dataclasses.asdict(prompt_cache.compression.default), "caches": reports,
                "kv_bytes": sum(r["kv_bytes"] for r in reports)}
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())


def scan_cache_dir():
    """huggingface_hub's scan_cache_dir, empty when the hub cache folder does not exist yet
    (mlx_lm.server's /v1/models fails there otherwise)."""
    from huggingface_hub import scan_cache_dir as scan
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan()
    except CacheNotFound:
        return argparse.Namespace(repos=frozenset())


def run(host, port, model_provider, compression):
    """mlx_lm.server.run with the compressed prompt cache, generator and handler. The
    model is loaded before the server starts, so a bad --model or --stats is a clean error."""
    args = model_provider.cli_args
    refuse_draft_model(args)  # before the model is loaded
    if args.kv_bits is not None:
        compression.quantize(args.kv_bits, args.kv_group_size)
    model_provider.load_default()
    prompt_cache = CompressedPromptCache(compression, args.prompt_cache_size)
    generator = CompressedResponseGenerator(model_provider, prompt_cache)
    mlx_server._run_http_server(host, port, generator, handler_class=CompressedAPIHandler)


@contextlib.contextmanager
def patched_mlx_server(compression):
    names = ("run", "load", "make_prompt_cache", "scan_cache_dir")
    original = {n: getattr(mlx_server, n) for n in names}

    def load_model(path, *args, **kwargs):
        model, tokenizer, *rest = load(path, *args, **kwargs)
        compression.prepare(model, tokenizer)
        return (model, tokenizer, *rest)

    def run_server(host, port, model_provider):
        run(host, port, model_provider, compression)

    mlx_server.run, mlx_server.load, mlx_server.make_prompt_cache = run_server, load_model, compression.make_cache
    mlx_server.scan_cache_dir = scan_cache_dir
    try:
        yield
    finally:
        for n, f in original.items():
            setattr(mlx_server, n, f)


def triattention_parser():
    parser = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS)
    add_triattention_args(parser, fallback="calibrate once on built-in text", no_compress=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = triattention_parser()
    if "-h" in argv or "--help" in argv:
        print("python -m triattn_mlx.server: mlx_lm.server with a TriAttention KV cache.\n"
              "TriAttention options (requests may also send \"kv_budget\": N):")
        print(parser.format_help())
        print("mlx_lm.server options:")
    args, rest = parser.parse_known_args(argv)
    try:
        compression = Compression(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    saved_argv = sys.argv
    sys.argv = [sys.argv[0], *rest]
    try:
        with patched_mlx_server(compression):
            mlx_server.main()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":
    main()
