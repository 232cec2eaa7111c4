"""The house rules that keep the code easy to change: a core without UI libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cifar_cli"
# Everything but the entry points (cli.py), the CLI's displays (display.py), the figures (plots.py) and the bench,
# which drives the CLI's own code paths.
ENTRY_POINTS = {"cli.py", "__main__.py", "display.py", "plots.py", "bench.py"}
UI = ("rich", "matplotlib", "typer", "cifar_cli.cli", "cifar_cli.plots", "cifar_cli.display")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count too
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_no_ui_library() -> None:
    core = [p for p in PACKAGE.rglob("*.py") if p.name not in ENTRY_POINTS or p.parent != PACKAGE]
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
    from cifar_cli import cli

    return [cli.download, cli.prepare, cli.train, cli.evaluate, cli.predict, cli.plot, cli.bench]


def test_every_flag_names_a_real_setting() -> None:
    import typing

    from cifar_cli.cli import Sets
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
    from cifar_cli.cli import flag_settings, resolve, train

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
