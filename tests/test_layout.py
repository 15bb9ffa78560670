"""The package's shape: the modules that import each other when loaded form no cycle, and
the model knows nothing of the command line, devices or distribution."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "noodle"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def load_time_imports(path: Path) -> set[str]:
    """The noodle modules a module imports at its top level (imports inside functions run
    only when called, and are how the CLI keeps torch out of `--help`)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] == "noodle"}


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in load_time_imports(path) if target in modules} - {name}
        for name, path in modules.items()
    }


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert {"noodle.train.loop", "noodle.model", "noodle.cli"} <= graph.keys()
    assert "noodle.loss" in graph["noodle.model"]  # the parser sees real imports
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_the_model_imports_nothing_of_the_cli_devices_or_distribution():
    assert import_graph()["noodle.model"].isdisjoint(
        {"noodle.cli", "noodle.device", "noodle.parallel", "noodle.train", "noodle.progress"}
    )
    text = (PACKAGE / "model.py").read_text()
    assert "torch.distributed" not in text and "typer" not in text


def test_a_tokenizer_process_loads_only_the_encoders():
    """One starts per core, all at once: numpy alone would triple their start."""
    code = "import sys, noodle.tokenizer_worker; print(sorted(sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    loaded = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    modules = {name.split(".")[0] for name in ast.literal_eval(loaded.stdout)}
    assert "tokenizers" in modules and not modules & {"numpy", "torch", "rich", "typer"}
