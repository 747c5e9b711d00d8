"""Compression settings: one frozen object, validated where it is made, passed everywhere.

The CLI flags that set it are defined here too, so generate, server and the benchmarks
spell each setting once.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

# per_head: one token set per KV head for all layers (the reference's default); per_layer_per_head:
# each layer selects its own; auto: per_layer_per_head at budgets up to PER_LAYER_BUDGET, per_head
# above. Measured on Qwen2.5-Coder-0.5B-Instruct (docs/RESULTS.md, 0.7): layer by layer wins at
# 128 (HumanEval 49/72 against 40, KL on prose 0.277 against 0.314) and loses needles from 256 up
# (a date at 6.25% of a 4k prompt, a number's tail at 12.5%) and KL from 512 up (0.142 against 0.107).
PRUNING_MODES = ("auto", "per_head", "per_layer_per_head")
PER_LAYER_BUDGET = 128
# How a prompt (tokens arriving several per call) is compressed:
#   whole: read it whole (holding up to prefill_limit tokens), then select once, when its
#          last token arrives, with the prompt's last queries voting (observe);
#   chunked: compress it as it is read, chunk by chunk (the reference's behaviour);
#   keep: never evict prompt tokens; only generated tokens are compressed.
PROMPT_MODES = ("whole", "chunked", "keep")
# Which rounds the newest queries vote in (observe): "prompt", the round that ends a prompt
# (its last queries); "all", every round, generated tokens' included (as SnapKV's do).
OBSERVE_ROUNDS = ("prompt", "all")
# What fills coverage's quotas: "score", the round's own score; "distinct", each key's
# dissimilarity to the other keys (-mean_similarity), so that every stretch of a document
# keeps what is unlike the rest of it, whatever the question of the moment asks
SEGMENT_FILLS = ("score", "distinct")
# prompt_mode "whole" holds at most prefill_limit tokens while reading; by default
# max(4 x budget, PREFILL_LIMIT_FLOOR): prompts that long are selected once, at their end,
# with the question's queries voting (a needle read before an earlier round can be lost).
PREFILL_LIMIT_FLOOR = 8192
# "triattention": the calibrated trigonometric score (TRIATTENTION.md). The others are the
# baselines, scored in the same cache and selected by the same code (baselines.py).
METHODS = ("triattention", "streamingllm", "snapkv", "h2o", "rkv", "key_norm", "random")
# What the server changes for chats (conversations carry the cache into a next question):
# in the round that ends a prompt, 8 stretches of it each keep their most distinct keys (half
# the budget in all), so that what the first question does not ask about survives for the
# next (docs/RESULTS.md 0.10)
CHAT_DEFAULTS = dict(segments=8, segment_rounds="prompt", segment_fill="distinct")
KV_BITS = (2, 3, 4, 5, 6, 8)
KV_GROUP_SIZES = (32, 64, 128)


def _check_int(name, value, low):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Settings:
    budget: int = 2048  # tokens each KV head keeps after a prune round
    window: int = 128  # most recent tokens, always kept (counted in the budget)
    divide_length: int = 128  # prune when budget + divide_length tokens are held
    sinks: int = 0  # first positions, always kept (counted in the budget)
    pruning_mode: str = "auto"  # PRUNING_MODES; `selection` is the one in force
    method: str = "triattention"
    kv_bits: int | None = None  # store kept tokens quantized (mlx-lm's QuantizedKVCache layout)
    kv_group_size: int = 64
    prompt_mode: str = "whole"
    prefill_limit: int | None = None  # "whole": tokens held at most while reading (None: 4 x budget, at least 8192)
    observe: int = 32  # last prompt queries whose attention votes at the prompt's end (0: none)
    # their z-scored attention's weight beside the method's z-scored score: at 1.0 a 4k prompt at
    # budget 512 lost a needle's last digit (Qwen2.5-Coder-0.5B); 2.0 kept every needle tried
    observe_weight: float = 2.0
    # that sum max-pooled along the sequence over this many tokens (odd; 1: off), as SnapKV pools
    # its observation, so that a needle's neighbours share its vote: at 11, a 4k prompt at budget
    # 256 kept a 7-digit number whose tail the unpooled sum lost (Qwen2.5-Coder-0.5B)
    observe_pool: int = 11
    observe_rounds: str = "prompt"  # OBSERVE_ROUNDS
    # weight of each key's mean similarity to the others (z-scored; R-KV's redundancy less its
    # newest-similar exception) taken off that sum where the queries vote, so that keys unlike
    # the rest (a fact the question does not ask about) win over running prose (0: off). A
    # chat's follow-up question about another part of a document was answered 7/11 times at
    # 25% budgets against 3/11, 1/11 at 12.5% as without; the continuation of a document read
    # whole lost some fidelity (KL +13% at budget 1024) (docs/RESULTS.md 0.9). The server's
    # default from 0.9 to 0.10; it now fills coverage's quotas with distinct keys instead
    observe_redundancy: float = 0.0
    # coverage: the positions that may be evicted cut into `segments` equal stretches, each
    # keeping its best tokens up to segment_share x its equal part of the budget (0: off), in
    # the rounds segment_rounds names (OBSERVE_ROUNDS: "prompt", only the round that ends a
    # prompt). Off by default: with it a follow-up question about another needle of a 4k
    # document was answered more often (3/5 against 1/5 at budget 1024), of an 8k one less
    # often (0/3 against 1/3 at 2048) (Qwen2.5-Coder-0.5B, docs/RESULTS.md 0.8)
    segments: int = 0
    segment_share: float = 0.5
    segment_rounds: str = "all"
    # SEGMENT_FILLS: with "distinct" in the prompt's round (8 segments), a follow-up question
    # about another needle of a 4k document was answered 4/5 times at budget 512 against 1/5
    # (Qwen2.5-Coder-0.5B, docs/RESULTS.md 0.10)
    segment_fill: str = "score"

    @property
    def selection(self):
        """The pruning mode in force: pruning_mode, with "auto" settled by the budget."""
        if self.pruning_mode != "auto":
            return self.pruning_mode
        return "per_layer_per_head" if self.budget <= PER_LAYER_BUDGET else "per_head"

    def coverage(self, ending):
        """(segments, segment_share, segment_fill) for a round (`ending`: it ends a prompt);
        (0, 0.0, "score"): none."""
        if self.segments and (ending or self.segment_rounds == "all"):
            return self.segments, self.segment_share, self.segment_fill
        return 0, 0.0, "score"

    @property
    def reading_limit(self):
        """Tokens a row may hold while a prompt is read before a round compresses it."""
        if self.prompt_mode == "chunked":
            return self.budget + self.divide_length
        if self.prompt_mode == "keep":
            return None  # nothing to evict while reading
        return self.prefill_limit or max(4 * self.budget, PREFILL_LIMIT_FLOOR)

    def __post_init__(self):
        for name, low in (("budget", 1), ("window", 0), ("divide_length", 1), ("sinks", 0)):
            _check_int(name, getattr(self, name), low)
        if self.budget <= self.window + self.sinks:
            raise ValueError(
                f"budget ({self.budget}) must be larger than window ({self.window}) + sinks "
                f"({self.sinks}): those tokens are always kept and count in the budget"
            )
        _check_choice("pruning_mode", self.pruning_mode, PRUNING_MODES)
        _check_choice("method", self.method, METHODS)
        if self.kv_bits is not None and self.kv_bits not in KV_BITS:
            raise ValueError(f"kv bits must be one of {', '.join(map(str, KV_BITS))}, got {self.kv_bits!r}")
        _check_choice("prompt_mode", self.prompt_mode, PROMPT_MODES)
        if self.prefill_limit is not None:
            _check_int("prefill_limit", self.prefill_limit, self.budget + self.divide_length)
        _check_int("observe", self.observe, 0)
        _check_int("observe_pool", self.observe_pool, 1)
        _check_choice("observe_rounds", self.observe_rounds, OBSERVE_ROUNDS)
        if self.observe_pool % 2 == 0:
            raise ValueError(f"observe_pool must be odd (a window centred on each token), got {self.observe_pool}")
        _check_int("segments", self.segments, 0)
        _check_choice("segment_rounds", self.segment_rounds, OBSERVE_ROUNDS)
        _check_choice("segment_fill", self.segment_fill, SEGMENT_FILLS)
        if not isinstance(self.segment_share, (int, float)) or not 0 <= self.segment_share <= 1:
            raise ValueError(f"segment_share must be a number from 0 to 1, got {self.segment_share!r}")
        for name in ("observe_weight", "observe_redundancy"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.kv_group_size not in KV_GROUP_SIZES:
            raise ValueError(f"kv group size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, "
                             f"got {self.kv_group_size!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_list(self):
        """The settings as strings, for a cache's meta_state (mlx-lm saves str lists)."""
        return [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, items):
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = dict(item.split("=", 1) for item in items)
        parse = {str: str, float: float}
        return cls(**{k: (None if v == "None" else parse.get(kinds[k], int)(v))
                      for k, v in values.items() if k in kinds})


def settings_of(settings=None, **fields):
    """`settings` (a Settings; an int is a budget, as mlx-lm's make_prompt_cache takes
    max_kv_size; None: the defaults) with `fields` replaced."""
    if settings is None:
        return Settings(**fields)
    if isinstance(settings, (int, np.integer)) and not isinstance(settings, bool):
        return Settings(budget=int(settings), **fields)
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a triattn_mlx.Settings, got {type(settings).__name__}")
    return settings.replace(**fields) if fields else settings


def add_arguments(parser, stats_fallback, **defaults):
    """The compression flags of generate and server (mlx-lm's --kv-bits/--kv-group-size are
    read too: they select quantized storage), defaulting to Settings() with `defaults`
    replaced (an entry point's own choice for its use)."""
    defaults = Settings(**defaults)
    parser.set_defaults(compression_defaults=defaults)  # from_args tells a flag given from a default
    group = parser.add_argument_group("TriAttention KV compression")
    group.add_argument("--budget", type=int, default=defaults.budget,
                       help=f"KV tokens each KV head keeps (default: {defaults.budget})")
    group.add_argument("--window", type=int, default=defaults.window,
                       help=f"recent tokens always kept (default: {defaults.window})")
    group.add_argument("--divide-length", type=int, default=defaults.divide_length,
                       help=f"prune when budget + this many tokens are cached (default: {defaults.divide_length})")
    group.add_argument("--sinks", type=int, default=defaults.sinks,
                       help=f"first positions always kept (default: {defaults.sinks})")
    group.add_argument("--pruning-mode", choices=PRUNING_MODES, default=defaults.pruning_mode,
                       help=f"auto (default): per_layer_per_head at budgets up to {PER_LAYER_BUDGET}, "
                            "per_head above; per_head: one token set per KV head for all layers; "
                            "per_layer_per_head: each layer selects its own")
    group.add_argument("--method", choices=METHODS, default=defaults.method,
                       help="how cached keys are scored: triattention (default) or a baseline "
                            "(streamingllm, snapkv, h2o, rkv, key_norm, random)")
    group.add_argument("--prompt-mode", choices=PROMPT_MODES, default=defaults.prompt_mode,
                       help="whole (default): read the prompt whole (up to --prefill-limit tokens), then "
                            "keep what its last queries attend to and what the method scores highest; "
                            "chunked: compress while reading; keep: never evict the prompt, compress "
                            "generated tokens only")
    group.add_argument("--prefill-limit", type=int, default=None,
                       help=f"whole: most tokens held while a prompt is read (default: 4 x budget, at least "
                            f"{PREFILL_LIMIT_FLOOR}); "
                            "longer prompts are compressed in rounds as they are read")
    group.add_argument("--observe", type=int, default=defaults.observe,
                       help=f"last prompt queries whose attention votes at its end "
                            f"(default: {defaults.observe}; 0: off)")
    group.add_argument("--observe-weight", type=float, default=defaults.observe_weight,
                       help=f"weight of their attention beside the method's score "
                            f"(default: {defaults.observe_weight:g})")
    group.add_argument("--observe-pool", type=int, default=defaults.observe_pool,
                       help="max-pool their combined score over this many neighbouring tokens, odd "
                            f"(default: {defaults.observe_pool}; 1: off)")
    group.add_argument("--observe-redundancy", type=float, default=defaults.observe_redundancy,
                       help="where the queries vote, take this weight of each key's mean similarity to the "
                            "others off the score, so that keys unlike the rest are kept "
                            f"(default: {defaults.observe_redundancy:g}; 0: off)")
    group.add_argument("--observe-rounds", choices=OBSERVE_ROUNDS, default=defaults.observe_rounds,
                       help="prompt (default): the prompt's last queries vote in the round that ends it; "
                            "all: the newest queries vote in every round, while generating too")
    group.add_argument("--segments", type=int, default=defaults.segments,
                       help="coverage: cut the evictable positions into this many stretches, each keeping "
                            f"its best tokens up to its quota (default: {defaults.segments or '0, off'})")
    group.add_argument("--segment-share", type=float, default=defaults.segment_share,
                       help=f"share of the budget the stretches' quotas take together (default: "
                            f"{defaults.segment_share:g})")
    group.add_argument("--segment-rounds", choices=OBSERVE_ROUNDS, default=defaults.segment_rounds,
                       help=f"all: coverage in every round; prompt: only in the round that ends a prompt "
                            f"(default: {defaults.segment_rounds})")
    group.add_argument("--segment-fill", choices=SEGMENT_FILLS, default=defaults.segment_fill,
                       help="what fills the stretches' quotas: score, the round's score; distinct: the keys "
                            f"least like the others, which a later question may ask about (default: {defaults.segment_fill})")
    group.add_argument("--stats", default="auto",
                       help="calibration stats: a .safetensors file, a Hugging Face repo id, or "
                            f"'auto' (shipped stats matching the model, else {stats_fallback})")
    return group


# Flags that set how the prompt's last queries vote beside TriAttention's score: the baselines
# score without that vote (SnapKV and R-KV observe the newest queries themselves)
QUERY_VOTE_FLAGS = ("observe", "observe_weight", "observe_pool", "observe_rounds", "observe_redundancy")


def from_args(args):
    """Settings from parsed CLI flags (ValueError with the flag's meaning if invalid, or if
    a flag was given that the chosen method does not read)."""
    defaults = getattr(args, "compression_defaults", Settings())
    if args.method != "triattention":
        given = [name for name in QUERY_VOTE_FLAGS if getattr(args, name) != getattr(defaults, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} set how the prompt's queries vote beside TriAttention's score; "
                             f"--method {args.method} does not read them (drop {flags} or use --method "
                             "triattention)")
    return Settings(budget=args.budget, window=args.window, divide_length=args.divide_length,
                    sinks=args.sinks, pruning_mode=args.pruning_mode, method=args.method,
                    kv_bits=getattr(args, "kv_bits", None), kv_group_size=getattr(args, "kv_group_size", 64),
                    prompt_mode=args.prompt_mode, prefill_limit=args.prefill_limit, observe=args.observe,
                    observe_weight=args.observe_weight, observe_pool=args.observe_pool,
                    observe_rounds=args.observe_rounds, observe_redundancy=args.observe_redundancy,
                    segments=args.segments, segment_share=args.segment_share, segment_rounds=args.segment_rounds,
                    segment_fill=args.segment_fill)
