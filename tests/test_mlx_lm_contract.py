"""The mlx-lm surface this package relies on, checked name by name: when an mlx-lm release
changes one of them, this fails saying which (the server and generate CLIs replace or
call exactly these; triattn_mlx/server.py MLX_LM_NAMES lists the server's)."""

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

from triattn_mlx.generate import REPLACED
from triattn_mlx.server import MLX_LM_NAMES

PACKAGE = Path(__file__).resolve().parent.parent / "triattn_mlx"


def params(fn):
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("module, name, what", MLX_LM_NAMES, ids=[n for _, n, _ in MLX_LM_NAMES])
def test_server_names_exist(module, name, what):
    assert hasattr(importlib.import_module(module), name), f"mlx-lm no longer has {module}.{name} ({what})"


def test_model_provider_has_the_surface_the_subclass_overrides():
    import mlx_lm.server as server

    assert params(server.ModelProvider.__init__)[:2] == ["self", "cli_args"], "mlx_lm.server.ModelProvider.__init__"
    assert params(server.ModelProvider.load) == ["self", "model_path", "adapter_path", "draft_model_path"], \
        "mlx_lm.server.ModelProvider.load"
    source = inspect.getsource(server.ModelProvider._load)
    assert "self.is_batchable" in source and "self.draft_model" in source, "ModelProvider attributes"
    main = inspect.getsource(server.main)
    assert "ModelProvider(args)" in main, "mlx_lm.server.main no longer builds ModelProvider(args)"
    assert "scan_cache_dir()" in inspect.getsource(server.APIHandler.handle_models_request), \
        "mlx_lm.server's /v1/models no longer calls scan_cache_dir"


def test_make_prompt_cache_defers_to_the_models_make_cache():
    from mlx_lm.models.cache import make_prompt_cache

    class Model:
        layers = [1, 2]

        def make_cache(self):
            return ["ours"]

    assert make_prompt_cache(Model()) == ["ours"], "mlx_lm.models.cache.make_prompt_cache ignores model.make_cache"


def test_generate_names_exist():
    generate = importlib.import_module("mlx_lm.generate")
    for name in (*REPLACED, "main", "batch_generate", "stream_generate"):
        assert hasattr(generate, name), f"mlx-lm no longer has mlx_lm.generate.{name}"
    main = inspect.getsource(generate.main)
    for name in REPLACED:  # swapped while our CLI runs: main must still call them by these names
        assert f"{name}(" in main, f"mlx_lm.generate.main no longer calls {name}"


def test_cache_surface_mlx_lm_calls():
    """mlx-lm's batch generation and prompt cache call these on every cache."""
    from triattn_mlx import BatchTriAttentionKVCache, TriAttentionKVCache

    for name in ("update_and_fetch", "make_mask", "is_trimmable", "trim", "size", "empty", "nbytes", "state",
                 "offset", "merge"):
        assert hasattr(TriAttentionKVCache, name), name
    for name in ("extract", "filter", "extend", "prepare", "finalize", "left_padding"):
        assert hasattr(BatchTriAttentionKVCache, name), name


def imports_of(path):
    """Modules of this package that `path` imports at module level (relative imports)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module.split(".")[0] if node.module else None)
    return found - {None}


def test_the_package_import_graph_has_no_cycle():
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in graph.get(node, ()):
            visit(dep, path + [node])
        state[node] = "done"

    for module in graph:
        visit(module, [])


def test_functions_import_nothing_that_would_close_a_cycle():
    """Imports inside functions (kept for optional dependencies) must not point back up."""
    graph = {p.stem: imports_of(p) for p in PACKAGE.glob("*.py")}
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level == 1 and inner.module:
                        target = inner.module.split(".")[0]
                        assert path.stem not in reachable(graph, target), \
                            f"{path.stem}.{node.name} imports {target}, which imports {path.stem} back"


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_importing_the_package_patches_nothing_in_mlx_lm():
    import subprocess

    code = ("import importlib, mlx_lm.models.cache as c, mlx_lm.server as s; "
            "g = importlib.import_module('mlx_lm.generate'); "
            "before = (set(vars(c)), s.ModelProvider, g.load); import triattn_mlx; "
            "assert before == (set(vars(c)), s.ModelProvider, g.load), 'import patched mlx-lm'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
