"""The house rules that keep the code easy to change: a core without UI libraries, rooms of readable size, no import
cycles, every flag tied to a setting, and a command reference generated from the app."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cifar_cli"
# Everything but the commands (cli/), the entry point (__main__.py), the CLI's displays (display.py) and the figures
# (plots.py, plots_explain.py) is the core, usable from Python without a terminal.
UI_FILES = {"__main__.py", "display.py", "plots.py", "plots_explain.py"}
UI = (
    "rich",
    "matplotlib",
    "typer",
    "cifar_cli.cli",
    "cifar_cli.plots",
    "cifar_cli.plots_explain",
    "cifar_cli.display",
)
MAX_LINES = 450  # a file past this is asking to be split by what it is about


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_no_ui_library() -> None:
    core = [
        p
        for p in PACKAGE.rglob("*.py")
        if not (p.parent == PACKAGE and p.name in UI_FILES) and PACKAGE / "cli" not in p.parents
    ]
    assert len(core) > 30
    offending = {
        str(path.relative_to(REPO)): sorted(
            n for n in _imported_modules(path) if n.split(".")[0] in UI or n in UI
        )
        for path in core
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_importing_the_core_loads_neither_rich_nor_the_cli() -> None:
    # matplotlib is left out: torchmetrics imports it by itself when it is installed.
    code = ("import sys, cifar_cli.engine.train, cifar_cli.engine.evaluate, cifar_cli.data.prepare; "
            "print([m for m in ('rich', 'typer', 'cifar_cli.cli', 'cifar_cli.plots', 'cifar_cli.display') "
            "if m in sys.modules])")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _commands():  # noqa: ANN202
    from cifar_cli.cli import COMMANDS

    return list(COMMANDS.values())


def test_every_flag_names_a_real_setting() -> None:
    import typing

    from cifar_cli.cli.common import Sets
    from cifar_cli.settings import Settings

    keys = set()
    for command in _commands():
        for hint in typing.get_type_hints(command, include_extras=True).values():
            keys.update(m.key for m in getattr(hint, "__metadata__", ()) if isinstance(m, Sets))
    assert len(keys) >= 25
    for key in keys:
        section: object = Settings
        for part in key.split("."):
            assert part in section.model_fields, key  # type: ignore[attr-defined]
            section = section.model_fields[part].annotation  # type: ignore[attr-defined]


def test_flag_beats_set_beats_environment_beats_yaml(tmp_path: Path, monkeypatch) -> None:
    from cifar_cli.cli.common import flag_settings, resolve
    from cifar_cli.cli.train import train

    config = tmp_path / "settings.yaml"
    config.write_text("optim:\n  lr: 0.1\n")
    monkeypatch.setenv("CIFAR_OPTIM__LR", "0.2")
    assert (
        resolve(config, ["optim.lr=0.3"], flag_settings(train, {"lr": 0.4, "epochs": None})).optim.lr == 0.4
    )
    assert resolve(config, ["optim.lr=0.3"], flag_settings(train, {"lr": None})).optim.lr == 0.3
    assert resolve(config, [], {}).optim.lr == 0.2
    monkeypatch.delenv("CIFAR_OPTIM__LR")
    assert resolve(config, [], {}).optim.lr == 0.1
    assert flag_settings(train, {"lr": 0.4, "epochs": None, "set_options": ["x=1"]}) == {"optim.lr": 0.4}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports_of(path: Path, modules: set[str]) -> set[str]:
    """The cifar_cli modules `path` imports; `from package import submodule` names the submodule, not the package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            names.update(submodules or {node.module})
    return names & modules


def import_graph() -> dict[str, set[str]]:
    """{module: the cifar_cli modules it imports}, imports inside functions included."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return trail[trail.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_through_others() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself works
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "cifar_cli.engine.exported" in graph["cifar_cli.engine.evaluate"]
    assert find_cycle(graph) is None


def test_no_file_is_too_long_to_read_in_one_sitting() -> None:
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in lengths.items() if lines > MAX_LINES} == {}
    assert lengths["cifar_cli/cli/__init__.py"] < 150
