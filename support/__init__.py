"""Test and benchmark support, not installed with the package: offline real models (models.py),
task data (tasks.py), teacher-forced evaluation (evaluate.py)."""

from triattn_mlx.corpus import code_text, prose_text  # noqa: F401

from .models import MODELS, gguf_path, model_dir, smollm2_gguf, smollm2_model_dir  # noqa: F401
