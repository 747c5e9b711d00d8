"""What runs on this machine, and whether it works: one block to paste into a bug report.

    python -m triattn_mlx.doctor [--model PATH] [--all]

Sections: the system (platform, chip, MLX and mlx-lm versions, the scoring backend); the
Metal source check (msl_check: clang against a shim of Metal's library; skipped on a Mac,
where the self-test compiles the real thing, and where there is no clang); the fused
kernel's self-test for each configuration (kernels.self_test: compiled and compared with
the MLX-op path; not applicable on the CPU); the scoring bandwidth over a [1, 8, 16384, 128]
float16 key block next to a copy of the same bytes; and a short generation with
compression on (a random-weight llama built here and calibrated on random tokens, or
--model), which must prune. Exit status 1 when a check failed.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter

import mlx.core as mx
import numpy as np

import triattn_mlx  # noqa: F401  (first: preloads OpenBLAS on Linux before mlx loads)

from . import kernels, msl_check

BANDWIDTH_SHAPE = (1, 8, 16384, 128)  # [B, H_kv, N, D] float16 keys, scored for 32 query heads
BUDGET, PROMPT_TOKENS, NEW_TOKENS = 256, 640, 64


def system():
    import mlx_lm

    from . import __version__

    device = mx.default_device()
    try:
        device_name = mx.device_info().get("device_name", "?")
    except Exception:  # noqa: BLE001  (older MLX)
        device_name = "?"
    return [
        f"platform: {platform.platform()} ({platform.machine()}), Python {platform.python_version()}",
        f"chip: {chip()}",
        f"MLX {mx.__version__} (default device {device}: {device_name}), mlx-lm {mlx_lm.__version__}, "
        f"triattn-mlx {__version__}",
        f"scoring backend: {describe_backend(kernels.backend())}",
    ]


def chip():
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    gpus = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    parts = [cpu or platform.processor() or "unknown CPU"]
    if gpus:
        parts.append("GPU " + ", ".join(sorted(set(gpus.splitlines()))) + f" (x{len(gpus.splitlines())})")
    return "; ".join(parts)


def _run(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe_backend(kind):
    if kind == "metal":
        return "metal (fused kernel through mx.fast.metal_kernel)"
    if kind == "cuda":
        return "cuda (fused kernel's CUDA twin through mx.fast.cuda_kernel)"
    why = "TRIATTN_KERNEL=mlx" if os.environ.get("TRIATTN_KERNEL") == "mlx" else "no Metal or CUDA GPU in use"
    return f"mlx (MLX-op path: {why})"


def metal_source_check():
    """(lines, ok) of msl_check; ok is None when it was skipped."""
    if kernels.backend() == "metal":
        return ["skipped: on Metal the self-test below compiles the real source"], None
    compiler = msl_check.clang()
    if compiler is None:
        return ["skipped: no clang (apt-get install clang, or pip install ziglang)"], None
    try:
        generated = msl_check.capture()
    except Exception as e:  # noqa: BLE001  (an MLX that cannot export Metal kernels without Metal)
        return [f"skipped: MLX could not export the Metal kernel here ({type(e).__name__}: {e})"], None
    start = time.perf_counter()
    result = msl_check.check(generated, compiler=compiler)
    version = (_run([*compiler, "--version"]) or "").splitlines()[:1]
    lines = [f"{'ok' if result.ok else 'FAILED'}: {result.kernels} instantiations with "
             f"{version[0] if version else ' '.join(compiler)} ({time.perf_counter() - start:.1f} s)"]
    if not result.ok:
        lines += result.message.splitlines()[:40]
    return lines, result.ok


def self_tests(everything=False):
    """(lines, ok) of the kernel self-test per configuration; ok is None off the GPU."""
    kind = kernels.backend()
    if kind == "mlx":
        return ["not applicable: MLX-op path (the fused kernel runs on Metal or CUDA only)"], None
    launches = msl_check.checked_launches() if everything else [
        launch for launch in kernels.example_launches(groups=(4,), rows=(2,), bits=(4,), group_sizes=(64,))
        if _common(dict(launch.config["template"]), launch.storage)]
    start = time.perf_counter()
    tally, failures = Counter(), []
    for launch in launches:
        t = dict(launch.config["template"])
        group = (launch.storage, _name(t["T"]))
        reason = kernels.self_test(kind, launch.storage, launch.config)
        tally[group + ("ok" if reason is None else "failed",)] += 1
        if reason is not None:
            failures.append(f"  FAILED {kernels.describe(launch.storage, launch.config['template'])}: {reason}")
    scope = ("every checked instantiation" if everything
             else "what common models launch: float16/bfloat16 keys, head_dim 64/128, half-style RoPE, "
                  "G=4 ROWS=2; 4-bit keys in groups of 64 at head_dim 128 (--all: every checked instantiation)")
    lines = [f"{kind}, fused vs MLX ops within {kernels.SELF_TEST_TOLERANCE:g} x max |score|, "
             f"{len(launches)} configurations in {time.perf_counter() - start:.1f} s ({scope}):"]
    for storage, dtype in dict.fromkeys((s, d) for s, d, _ in tally):
        ok, failed = tally[(storage, dtype, "ok")], tally[(storage, dtype, "failed")]
        lines.append(f"  {storage:9} {dtype:8} {ok}/{ok + failed} ok")
    if len(failures) > 12:
        failures = failures[:12] + [f"  ... and {len(failures) - 12} more"]
    return lines + failures, not failures


def _common(template, storage):
    """An instantiation most models launch (each one compiles on first use: NVRTC takes
    seconds apiece, so the default self-test checks these)."""
    if template["T"] not in (mx.float16, mx.bfloat16) or not template["HALF"]:
        return False
    return template["D"] in (64, 128) if storage == "plain" else template["D"] == 128


def _name(dtype):
    return str(dtype).replace("mlx.core.", "")


def timed(fn, repeats):
    fn()  # warm up: compiles, allocates
    mx.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bandwidth():
    """GB/s of scoring (fused on a GPU, MLX ops elsewhere) next to a copy of the same bytes
    (x + 0: read + write, as bench.kernels measures it). The CPU scores an eighth of the
    block (2048 keys per head), to stay quick."""
    from .scoring import triattention_scores

    gpu = kernels.backend() != "mlx"
    B, n_kv, N, D = BANDWIDTH_SHAPE if gpu else (*BANDWIDTH_SHAPE[:2], BANDWIDTH_SHAPE[2] // 8, BANDWIDTH_SHAPE[3])
    keys = mx.random.normal((B, n_kv, N, D), key=mx.random.key(0)).astype(mx.float16)
    w = mx.random.normal((4 * n_kv, D), key=mx.random.key(1))
    c = mx.random.normal((4 * n_kv, D // 2), key=mx.random.key(2))
    pairs = mx.array(kernels.pair_layout("half", D))
    mx.eval(keys, w, c)
    per_eval, repeats = (8, 20) if gpu else (1, 2)  # several launches per evaluation: the kernel's own time
    if gpu and kernels.can_fuse(keys, "half"):
        packed = kernels.fused_weights(w, c, pairs)
        path = f"fused kernel ({kernels.backend()})"
        seconds = timed(lambda: mx.eval([kernels.fused_scores(keys, packed, "half") for _ in range(per_eval)]), repeats)
        if not kernels.can_fuse(keys, "half"):
            path = "MLX-op path (the fused kernel failed its self-test)"
    else:
        path = "MLX-op path" + (" (the fused kernel is off for these keys)" if gpu else "")
        seconds = timed(lambda: mx.eval([triattention_scores(keys, w, c, pairs) for _ in range(per_eval)]), repeats)
    score = per_eval * keys.nbytes / seconds / 1e9
    copy_seconds = timed(lambda: mx.eval([keys + 0 for _ in range(per_eval)]), repeats)
    copy = per_eval * 2 * keys.nbytes / copy_seconds / 1e9  # read + write
    return [f"{path}: {_rate(score)} of keys read (float16 keys {[B, n_kv, N, D]}, {keys.nbytes / 2**20:.0f} MiB, "
            f"32 query heads: {seconds * 1e3 / per_eval:.2f} ms)",
            f"copy of the same bytes: {_rate(copy)} (read + write); scoring at {score / copy:.0%} of copy"]


def _rate(gigabytes_per_second):
    return f"{gigabytes_per_second:.1f} GB/s" if gigabytes_per_second >= 1 else f"{gigabytes_per_second * 1e3:.1f} MB/s"


def byte_tokenizer():
    """A byte-level tokenizer built here (256 tokens, no end-of-sequence token: generation
    runs its full length), for the random-weight model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def random_llama(dtype):
    """A 2-layer llama with random weights: 4 query / 2 KV heads of head_dim 128 (what
    common models use, and a fused head_dim, so a GPU scores it with the kernel)."""
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=512, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256, rope_theta=10000.0, tie_word_embeddings=True)))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def generation(model_path=None):
    """(lines, ok): generate NEW_TOKENS over a prompt longer than the budget, with plain and
    4-bit kept keys; ok when every run pruned."""
    from mlx_lm.generate import stream_generate

    from . import calibrate, make_prompt_cache

    rng = np.random.default_rng(0)
    if model_path is None:
        dtype = mx.float16 if kernels.backend() != "mlx" else mx.float32
        model, tokenizer = random_llama(dtype), byte_tokenizer()
        start = time.perf_counter()
        stats = calibrate(model, rng.integers(0, 256, 512), source="random tokens")
        lines = [f"model: random-weight llama (2 layers, 4 query / 2 KV heads, head_dim 128, {_name(dtype)}), "
                 f"calibrated on 512 random tokens in {time.perf_counter() - start:.1f} s"]
        prompt = rng.integers(0, 256, PROMPT_TOKENS).tolist()
    else:
        from .corpus import prose_text
        from .loading import load, shipped_stats

        model, tokenizer = load(model_path)
        stats = shipped_stats(model)
        lines = [f"model: {model_path} ({'shipped stats' if stats is not None else 'stats from the prompt itself'})"]
        stats = "self" if stats is None else stats
        prompt = tokenizer.encode(prose_text())[:4 * BUDGET]
    ok = True
    for kv_bits in (None, 4):
        cache = make_prompt_cache(model, budget=BUDGET, stats=stats, kv_bits=kv_bits)
        launched = Counter(kernels.fused_launches)
        start, response = time.perf_counter(), None
        try:
            for response in stream_generate(model, tokenizer, mx.array(prompt), max_tokens=NEW_TOKENS,
                                            prompt_cache=cache):
                pass
        except RuntimeError as error:
            if kv_bits is None or "No implementation" not in str(error):
                raise
            # mlx-lm's attention over quantized keys (mx.quantized_matmul) lacks this shape here
            lines.append(f"{kv_bits}-bit keys: not run: MLX on this backend cannot compute mlx-lm's quantized "
                         f"attention ({str(error).splitlines()[0]})")
            continue
        seconds = time.perf_counter() - start
        ours = [c for c in cache if hasattr(c, "prune_rounds")]
        seen = max(c.offset for c in ours)
        kept = max(c.size() for c in ours)
        held = sum(c.nbytes for c in ours)
        full = sum(c.nbytes / max(c.size(), 1) * c.offset for c in ours)  # every token seen, same storage
        rounds = max(c.prune_rounds for c in ours)
        fused = sum((Counter(kernels.fused_launches) - launched).values())
        pruned = rounds > 0 and kept < seen
        ok &= pruned
        keys = "plain keys" if kv_bits is None else f"{kv_bits}-bit keys"
        lines += [
            f"{keys}: prompt {len(prompt)} tokens, {response.generation_tokens} generated in {seconds:.1f} s "
            f"({response.generation_tps:.0f} tok/s); budget {BUDGET}",
            f"  {'pruned' if pruned else 'FAILED: no pruning'}: prune rounds {rounds}, {kept} of {seen} tokens "
            f"kept per head, KV {held / 2**20:.2f} MiB held vs {full / 2**20:.2f} MiB for every token seen; "
            f"scored by {f'the fused kernel ({fused} launches)' if fused else 'MLX ops'}",
        ]
    return lines, ok


def main(argv=None):
    parser = argparse.ArgumentParser(description="What runs here, and whether it works (paste the output "
                                                 "into a bug report).")
    parser.add_argument("--model", help="also generate with this model (folder, repo id or .gguf) "
                                        "instead of the random-weight test model")
    parser.add_argument("--all", action="store_true", help="self-test every instantiation msl_check covers")
    args = parser.parse_args(argv)

    failed = []

    def section(title, run):
        print(f"== {title}", flush=True)
        try:
            result = run()
        except Exception as e:  # noqa: BLE001  (a crash is a result too)
            result = [f"FAILED: {type(e).__name__}: {e}"], False
        lines, ok = result if isinstance(result, tuple) else (result, None)
        for line in lines:
            print(line, flush=True)
        if ok is False:
            failed.append(title)

    print("```\ntriattn-mlx doctor", flush=True)
    section("System", system)
    section("Metal source check (clang, metal/metal_stdlib_shim.h)", metal_source_check)
    section("Fused kernel self-test", lambda: self_tests(args.all))
    section("Scoring bandwidth", bandwidth)
    section("Generation with compression", lambda: generation(args.model))
    print(f"== Result: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}\n```", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
