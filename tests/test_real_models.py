"""The offline real models from their GGUF files (support/models.py): converted weights
against the gguf package's dequantization, tokenizers, greedy answers, perplexity.

Qwen2.5-Coder-0.5B-Instruct and SmolLM2 run in the default suite (seconds once fetched and
converted); Qwen2.5-Coder-1.5B-Instruct, Gemma-3-270M and the quantized-model answers are
`slow` (pytest -m slow)."""

import glob
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf_helpers import mlx_dequantized, sentencepiece_reference

from support import MODELS, gguf_path, model_dir
from triattn_mlx.corpus import code_text, prose_text
from triattn_mlx.gguf import _transform, build_config, mlx_name
from triattn_mlx.gguf_format import affine_codes, dequantize, read_gguf

# Plain English, written for these tests (not in any model's calibration text).
PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century. The first machines had no "
    "pedals: riders pushed themselves along with their feet, as children do on balance bikes today. "
    "Pedals fixed to the front wheel came in the 1860s, and the high-wheeled bicycles that followed "
    "were fast but dangerous, because a rider sat far above the ground. The safety bicycle of the "
    "1880s, with two wheels of equal size and a chain driving the rear one, made cycling practical "
    "for almost everyone. Within a few years, millions of people rode bicycles to work, and "
    "cyclists' clubs campaigned for the smooth roads that motorists would later use.")
QUESTIONS = [("What is the capital of France?", "Paris"), ("What is the chemical symbol for gold?", "Au"),
             ("How many days are in a week?", "7"), ("Who wrote Romeo and Juliet?", "Shakespeare")]
COMPLETIONS = [("Paris is the capital of", "France"), ("The chemical symbol for gold is", "Au"),
               ("Monday, Tuesday, Wednesday,", "Thursday")]
SLOW = pytest.mark.slow


def weights(folder):
    out = {}
    for path in glob.glob(f"{folder}/model*.safetensors"):
        out.update(mx.load(path))  # lazy: only the arrays used are read
    return out


def greedy_answer(model, tokenizer, question, max_tokens=20):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, verbose=False)


def perplexity(model, tokenizer, text):
    tokens = mx.array(tokenizer.encode(text))
    logits = model(tokens[None])[0, :-1].astype(mx.float32)
    nll = mx.logsumexp(logits, -1) - mx.take_along_axis(logits, tokens[1:, None], -1)[:, 0]
    return float(mx.exp(nll.mean()))


@pytest.fixture(scope="module")
def qwen():
    return mlx_lm.load(str(model_dir("qwen2.5-coder-0.5b")))


# ---------------------------------------------------------------------------- weights

def check_weights_against_gguf(name):
    """The smallest matrix (else vector) of each type in the file, in the float32 and the
    quantized folders, against the gguf package's dequantization: {type: max abs error}."""
    meta, tensors = read_gguf(gguf_path(name))
    arch, config = build_config(meta, tensors)
    dense, quantized = weights(model_dir(name, "float32")), weights(model_dir(name, None))
    by_kind = {}
    for tensor in sorted((t for t in tensors if not t.name.startswith("rope_freqs")),
                         key=lambda t: (-len(t.shape), np.prod(t.shape))):
        by_kind.setdefault(tensor.kind.name, tensor)
    errors = {}
    for tensor in by_kind.values():
        exact = _transform(arch, config, tensor, dequantize(tensor))
        key = mlx_name(arch, tensor.name)
        np.testing.assert_array_equal(np.array(dense[key]), exact, err_msg=tensor.name)
        module = key.rsplit(".", 1)[0]
        if not key.endswith(".weight") or f"{module}.scales" not in quantized:  # kept as a float tensor
            np.testing.assert_array_equal(np.array(quantized[key].astype(mx.float32)), exact)
            errors[tensor.kind.name] = 0.0
            continue
        codes = (quantized[key], quantized[f"{module}.scales"], quantized[f"{module}.biases"])
        bits = codes[0].shape[-1] * 32 // exact.shape[-1]
        error = np.abs(mlx_dequantized(codes, bits) - exact)
        if affine_codes(tensor) is None:  # re-quantized: half a step, float16 scale and bias
            groups = exact.reshape(exact.shape[0], -1, 32)
            step = (groups.max(-1) - groups.min(-1)) / 255
            bound = 0.5 * step * (1 + 2**-10) + 2**-10 * np.abs(groups).max(-1)
            assert (error.reshape(groups.shape) <= bound[..., None]).all(), tensor.name
        elif tensor.kind.name in ("Q4_K", "Q5_K"):  # d * sc rounded to float16
            assert error.max() <= 2**-10 * np.abs(exact).max(), tensor.name
        else:
            assert error.max() == 0, tensor.name
        errors[tensor.kind.name] = float(error.max())
    print(f"\n{name}: max abs error of the quantized folder per GGUF type: "
          + ", ".join(f"{k} {v:.3g}" for k, v in sorted(errors.items())))
    return errors


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b",
                                  pytest.param("qwen2.5-coder-1.5b", marks=SLOW),
                                  pytest.param("gemma3-270m", marks=SLOW)])
def test_converted_weights_are_the_gguf_dequantization(name):
    errors = check_weights_against_gguf(name)
    expected = {"smollm2-135m": {"F32", "Q4_1", "Q8_0"},
                "qwen2.5-coder-0.5b": {"F32", "Q5_0", "Q8_0", "Q6_K", "Q4_K"},
                "qwen2.5-coder-1.5b": {"F32", "Q4_K", "Q6_K"},
                "gemma3-270m": {"F32", "Q5_0", "Q8_0", "Q6_K", "Q4_K"}}[name]
    assert set(errors) == expected


# ---------------------------------------------------------------------------- tokenizers

def test_qwen_tokenizer_gives_qwens_ids_and_chat_format(qwen):
    _, tokenizer = qwen
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]  # Qwen2's published ids
    assert tokenizer.encode("<|im_start|>user") == [151644, 872]
    text = prose_text()[:3000] + code_text()[:3000] + " 1234567 日本語 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                      "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token_ids == {151645}  # <|im_end|> ends the turn


@SLOW
def test_gemma_tokenizer_matches_sentencepiece_on_prose_and_code():
    meta, _ = read_gguf(gguf_path("gemma3-270m"))
    reference = sentencepiece_reference(meta)
    _, tokenizer = mlx_lm.load(str(model_dir("gemma3-270m")))
    for text in (prose_text()[:20000], code_text()[:20000], PARAGRAPH):
        assert tokenizer.encode(text) == [2] + reference.encode(text)


# ---------------------------------------------------------------------------- answers, perplexity

@pytest.mark.parametrize("questions", [QUESTIONS[:2], pytest.param(QUESTIONS[2:], marks=SLOW)])
def test_qwen_answers_and_perplexity(qwen, questions):
    model, tokenizer = qwen
    for question, answer in questions:
        reply = greedy_answer(model, tokenizer, question)
        print(f"\n{question!r} -> {reply!r}")
        assert answer in reply
    ppl = perplexity(model, tokenizer, PARAGRAPH)
    print(f"Qwen2.5-Coder-0.5B-Instruct (float32) perplexity on the paragraph: {ppl:.2f}")
    assert ppl < 60  # a wrong transform gives hundreds or more


@SLOW
@pytest.mark.parametrize("name, dtype", [("qwen2.5-coder-0.5b", None), ("qwen2.5-coder-1.5b", "float32"),
                                         ("qwen2.5-coder-1.5b", None)])
def test_other_qwen_variants_answer(name, dtype):
    model, tokenizer = mlx_lm.load(str(model_dir(name, dtype)))
    for question, answer in QUESTIONS[:2]:
        reply = greedy_answer(model, tokenizer, question)
        print(f"\n{name} ({dtype or 'quantized'}): {question!r} -> {reply!r}")
        assert answer in reply
    ppl = perplexity(model, tokenizer, PARAGRAPH)
    print(f"{name} ({dtype or 'quantized'}) perplexity on the paragraph: {ppl:.2f}")
    assert ppl < 60


@SLOW
def test_gemma_completes_facts_and_has_a_sane_perplexity():
    model, tokenizer = mlx_lm.load(str(model_dir("gemma3-270m")))
    for prompt, answer in COMPLETIONS:
        reply = mlx_lm.generate(model, tokenizer, prompt, max_tokens=8, verbose=False)
        print(f"\n{prompt!r} -> {reply!r}")
        assert answer in reply
    ppl = perplexity(model, tokenizer, PARAGRAPH)
    print(f"Gemma-3-270M (float32) perplexity on the paragraph: {ppl:.2f}")
    assert ppl < 60


@SLOW
def test_generate_cli_answers_from_the_quantized_gguf():
    r = subprocess.run([sys.executable, "-m", "triattn_mlx.generate", "--model", str(gguf_path("qwen2.5-coder-0.5b")),
                        "--budget", "1024", "--prompt", "What is the capital of France?", "-m", "16"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert "Paris" in r.stdout
    assert "estimating query centers" not in r.stderr  # --stats auto found the shipped stats


def test_models_table_is_consistent():
    for name, model in MODELS.items():
        assert model.file.endswith(".gguf") and model.packages and len(model.sha256) == 64, name
