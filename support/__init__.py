"""Test and benchmark support, not installed with the package: the offline real models."""

from triattn_mlx.corpus import code_text, prose_text  # noqa: F401

from .models import MODELS, gguf_path, model_dir, smollm2_gguf, smollm2_model_dir  # noqa: F401
