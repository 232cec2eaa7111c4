"""The documentation that is generated or bounded: docs/cli.md matches the app, the README stays one screen per idea."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def generated_reference(out: Path) -> str:
    """What `make docs` writes, from the app as it is now."""
    command = [sys.executable, "-m", "typer", "cifar_cli.cli", "utils", "docs", "--name", "cifar",
               "--title", "cifar: command reference", "--output", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return out.read_text()


def test_the_command_reference_is_generated_from_the_app(tmp_path: Path) -> None:
    fresh = generated_reference(tmp_path / "cli.md")
    assert "## `cifar sweep`" in fresh and "`--raw-dir <path>`" in fresh
    stored = (REPO / "docs" / "cli.md").read_text()
    assert stored == fresh, "docs/cli.md is stale: run `make docs`"


def test_the_readme_stays_short_and_links_the_reference() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for linked in ("docs/cli.md", "docs/guide.md", "docs/performance.md", "make test"):
        assert linked in readme
    for path in ("docs/cli.md", "docs/guide.md", "docs/performance.md"):
        assert (REPO / path).is_file(), path
