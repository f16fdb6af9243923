"""The package's layers: the training loop (kdcache.train) is imported for training only; where work runs
(kdcache.runtime), how a model answers (kdcache.inference) and the batch source (kdcache.batches) are
their own modules, so dump, verify, imports, bench and the API never pull the loop in for them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdcache"


def _top_level_names(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every `from kdcache.X import name` anywhere in the file (function bodies too)."""
    return [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdcache")
        for alias in node.names
    ]


def test_no_module_imports_the_training_loop_for_runtime_inference_or_batches():
    elsewhere = {m: _top_level_names(m) for m in ("runtime", "inference", "batches")}
    train_names = _top_level_names("train")
    for module, names in elsewhere.items():
        assert not names & train_names, f"train.py defines {names & train_names} again (they live in {module}.py)"
    wrong = [
        f"{path.name} imports {name} from kdcache.train"
        for path in sorted(PACKAGE.glob("*.py"))
        for module, name in _imports(path)
        if module == "kdcache.train" and name not in train_names
    ]
    assert not wrong, wrong


def test_the_lower_layers_never_import_the_loop_or_the_stages():
    upper = {"kdcache.train", "kdcache.stages", "kdcache.dump", "kdcache.pipeline", "kdcache.cli", "kdcache.api"}
    for low in ("runtime", "inference", "batches", "checkpoints", "models", "views", "data", "folders", "cache"):
        bad = {module for module, _ in _imports(PACKAGE / f"{low}.py") if module in upper}
        assert not bad, f"{low}.py imports {bad}"
