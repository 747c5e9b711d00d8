# ruff: noqa: I001, E402  (triattn_mlx first: it preloads OpenBLAS on Linux before mlx loads)
import triattn_mlx  # noqa: F401
import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models import llama

from triattn_mlx import calibrate
from support import code_text, smollm2_model_dir


@pytest.fixture(scope="session")
def real_model_dir():
    return smollm2_model_dir("float32")


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """SmolLM2-135M-Instruct (float32), loaded by mlx_lm.load: (model, tokenizer)."""
    return mlx_lm.load(str(real_model_dir))


@pytest.fixture(scope="session")
def real_stats(real_model):
    """Query centers calibrated on Python source (tests evaluate on prose)."""
    model, tokenizer = real_model
    return calibrate(model, tokenizer.encode(code_text())[:1024], source="inspect.py source")


def tiny_llama(seed=0, **overrides):
    """A small random-weight llama (GQA 4 query / 2 KV heads) for fast unit tests."""
    mx.random.seed(seed)
    config = dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
        rope_theta=10000.0, tie_word_embeddings=True,
    )
    config.update(overrides)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_model():
    return tiny_llama()
