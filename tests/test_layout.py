"""The house rules that keep the code easy to change: a core without UI libraries, rooms of readable size, no import
cycles, every flag tied to a setting, and a command reference generated from the app."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cifar_cli"
# Everything but the commands (cli/), what people see (ui/: rich displays, matplotlib figures) and the entry point
# (__main__.py) is the core, usable from Python without a terminal.
UI_FOLDERS = ("cli", "ui")
UI = ("rich", "matplotlib", "typer", "cifar_cli.cli", "cifar_cli.ui")
MAX_LINES = 450  # a file past this is asking to be split by what it is about
MAX_MODULES = 12  # modules in one package folder (cli/ keeps one per command, plus what they share)
MAX_CLI_MODULES = 16
MAX_TOP_LEVEL = 6  # modules directly in cifar_cli/: the ground floor everything stands on


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _core_files() -> list[Path]:
    return [
        p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py" and not any(PACKAGE / folder in p.parents for folder in UI_FOLDERS)
    ]


def test_the_core_imports_no_ui_library() -> None:
    core = _core_files()
    assert len(core) > 30
    offending = {
        str(path.relative_to(REPO)): sorted(
            n for n in _imported_modules(path) if any(n == ui or n.startswith(f"{ui}.") for ui in UI)
        )
        for path in core
    }
    assert {path: names for path, names in offending.items() if names} == {}


def test_importing_the_core_loads_neither_rich_nor_the_cli() -> None:
    # matplotlib is left out: torchmetrics imports it by itself when it is installed.
    code = ("import sys, cifar_cli.train.run, cifar_cli.predict.evaluate, cifar_cli.data.prepare; "
            "print([m for m in ('rich', 'typer', 'cifar_cli.cli', 'cifar_cli.ui.plots', 'cifar_cli.ui.display') "
            "if m in sys.modules])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _commands():  # noqa: ANN202
    from cifar_cli.cli import COMMANDS

    return list(COMMANDS.values())


def test_every_flag_names_a_real_setting() -> None:
    import typing

    from cifar_cli.cli.common import Sets
    from cifar_cli.config.settings import Settings

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
    assert resolve(config, ["optim.lr=0.3"], flag_settings(train, {"lr": 0.4, "epochs": None})).optim.lr == 0.4
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
    assert "cifar_cli.predict.exported_model" in graph["cifar_cli.predict.evaluate"]
    assert find_cycle(graph) is None


def test_no_file_is_too_long_to_read_in_one_sitting() -> None:
    lengths = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in lengths.items() if lines > MAX_LINES} == {}
    assert lengths["cifar_cli/cli/__init__.py"] < 150


def _packages() -> list[Path]:
    return sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


def test_rooms_are_small_and_named_by_purpose() -> None:
    """No package folder past about 12 modules, few modules loose at the top, and no flat `engine/` again."""
    for package in _packages():
        modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        limit = MAX_CLI_MODULES if package.name == "cli" else MAX_MODULES
        assert len(modules) <= limit, (package.name, len(modules))
        first_line = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        assert first_line, f"{package.name}/__init__.py says in a line what lives there"
    assert len(list(PACKAGE.glob("*.py"))) <= MAX_TOP_LEVEL
    assert not (PACKAGE / "engine").exists()


def test_no_two_core_modules_define_the_same_public_name() -> None:
    defined: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if PACKAGE / "cli" in path.parents:
            continue  # one module per command: each may have its own `run` helpers
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                defined.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: paths for name, paths in defined.items() if len(paths) > 1} == {}


def test_the_readme_map_matches_the_tree() -> None:
    """README's "Where things are" names every package folder and top-level module, and only files that exist."""
    text = (REPO / "README.md").read_text()
    start = text.index("Where things are")
    section = text[start:].split("\n\n")[0]
    folders = set(re.findall(r"`(\w+)/`", section))
    assert folders == {package.name for package in _packages()}
    top_level = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    named_files = set(re.findall(r"`([\w/]+\.py)`", section)) - {"tests/test_layout.py"}
    assert top_level <= named_files
    existing = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.rglob("*.py")}
    assert named_files <= existing, named_files - existing
