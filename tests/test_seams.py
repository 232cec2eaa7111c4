"""Where commands meet: a checkpoint leads every command to its data, the training banner says what is held out,
`cifar runs` finds sweep trials, and the tables stay readable in an 80-column terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import HAS_ONNX, flat, run_cli

TINY_RUN = ["--preset", "baseline", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
            "--set", "train.batch_size=16", "--set", "train.num_threads=1", "--set", "log.progress=plain"]  # fmt: skip


LONG_NAME = "a-plain-run-whose-name-is-too-long-for-one-line-of-an-80-column-table"  # 70 characters


def invoke(*args: str, columns: int | None = None):
    env = {"COLUMNS": str(columns)} if columns else None
    return run_cli(*args, env=env)


@pytest.fixture()
def trained_elsewhere(tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run trained in project/ on data in project/my_data (a relative --processed-dir), then the current folder
    moved to another/: the checkpoint's path from there."""
    project = tmp_path / "project"
    shutil.copytree(prepared_dir, project / "my_data")
    monkeypatch.chdir(project)
    result = invoke("train", *TINY_RUN, "--processed-dir", "my_data", "--run-name", "elsewhere")
    assert result.exit_code == 0, result.output
    other = tmp_path / "another"
    other.mkdir()
    monkeypatch.chdir(other)
    return project / "checkpoints" / "elsewhere" / "last.pth"


def test_commands_on_a_checkpoint_find_its_data_without_path_flags(trained_elsewhere: Path, tmp_path: Path) -> None:
    other = Path.cwd()
    evaluated = invoke("evaluate", str(trained_elsewhere), "--json", str(tmp_path / "m.json"))
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "m.json").read_text())["num_samples"] == 30  # the tiny test split
    exported = invoke("export", str(trained_elsewhere), "--format", "pt2", "--out", str(tmp_path / "m.pt2"))
    assert exported.exit_code == 0, exported.output
    from_export = invoke("evaluate", str(tmp_path / "m.pt2"))  # the export's contract records the data too
    assert from_export.exit_code == 0, from_export.output
    plotted = invoke("plot", str(trained_elsewhere), "--out", str(tmp_path / "plots"))
    assert plotted.exit_code == 0, plotted.output
    assert (tmp_path / "plots" / "confusion_matrix.png").is_file()
    assert sorted(p.name for p in other.iterdir()) == []  # nothing downloaded or created here


def test_a_path_flag_still_beats_the_checkpoints_data(trained_elsewhere: Path, tmp_path: Path) -> None:
    result = invoke("evaluate", str(trained_elsewhere), "--processed-dir", str(tmp_path / "empty"),
                    "--raw-dir", str(tmp_path / "no-raw"), "--set", "data.urls=[/nowhere/c.tar.gz]")  # fmt: skip
    assert result.exit_code == 1 and "/nowhere/c.tar.gz" in flat(result.output), result.output
    assert not (tmp_path / "empty").exists() and not (tmp_path / "no-raw").exists()  # failed: nothing left


def test_a_failed_evaluate_creates_no_folders_here(trained_elsewhere: Path) -> None:
    shutil.rmtree(trained_elsewhere.parents[2] / "my_data")  # the run's data is gone and cannot be downloaded
    result = invoke("evaluate", str(trained_elsewhere), "--set", "data.urls=[/nowhere/c.tar.gz]")
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in Path.cwd().iterdir()) == []
    assert not (trained_elsewhere.parents[2] / "my_data").exists()


def test_the_banner_says_what_the_run_holds_out(tmp_path: Path, prepared_dir: Path) -> None:
    common = [*TINY_RUN, "--processed-dir", str(prepared_dir), "--log-dir", str(tmp_path / "runs"),
              "--checkpoint-dir", str(tmp_path / "ck")]  # fmt: skip
    held = flat(invoke("train", *common, "--run-name", "held", "--val-size", "20").output)
    assert "80 training images, 20 held out for validation" in held
    none = flat(invoke("train", *common, "--run-name", "none", "--val-size", "0", "--scheduler", "none").output)
    assert "100 training images, none held out (the 30 test images are scored each epoch" in none
    assert "for validation" not in none


def _sweep_then_runs(tmp_path: Path, prepared_dir: Path) -> tuple[Path, str]:
    log_dir = tmp_path / "runs"
    assert (
        invoke(
            "train",
            *TINY_RUN,
            "--processed-dir",
            str(prepared_dir),
            "--log-dir",
            str(log_dir),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--run-name",
            LONG_NAME,
        ).exit_code
        == 0
    )
    swept = invoke("sweep", "--preset", "baseline", "--set", "optim.lr=0.001,0.003", "--epochs", "1",
                   "--device", "cpu", "--name", "lr", "--processed-dir", str(prepared_dir),
                   "--raw-dir", str(tmp_path / "raw"), "--log-dir", str(log_dir),
                   "--checkpoint-dir", str(tmp_path / "ck"), "--jobs", "1")  # fmt: skip
    assert swept.exit_code == 0, swept.output
    return log_dir, swept.output


def test_runs_finds_sweep_trials_and_reads_well_at_80_columns(tmp_path: Path, prepared_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("CIFAR_TRAIN__BATCH_SIZE", "16")
    monkeypatch.setenv("CIFAR_TRAIN__NUM_THREADS", "1")
    monkeypatch.setenv("CIFAR_TRAIN__PRECISION", "fp32")
    monkeypatch.setenv("CIFAR_LOG__PROGRESS", "none")
    log_dir, _ = _sweep_then_runs(tmp_path, prepared_dir)
    listed = json.loads(invoke("runs", "--log-dir", str(log_dir), "--json").output)
    assert [run["sweep"] for run in listed] == [None, "lr", "lr"]
    assert {tuple(run["differing"]) for run in listed if run["sweep"]} == {("optim.lr",)}
    table = invoke("runs", "--log-dir", str(log_dir), columns=80).output
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in table
    # The first column's pieces, line after line: a name folded over several lines reads whole again.
    first_column = "".join(line.split("│")[1].strip() for line in lines if line.startswith("│"))
    for run in listed:
        assert run["name"] in first_column, table
    assert LONG_NAME not in table  # it did need folding: the check above saw it whole only after unfolding
    assert "Sweep lr" in table and "lr=0.001" in table and "lr=0.003" in table


def test_bench_and_sweep_tables_fit_80_columns() -> None:
    from rich.console import Console

    from cifar_cli.cli.bench import speed_table

    rows = [{"name": "in-memory on cpu, bf16 + channels_last (fused Adam)", "batch_size": 2000,
             "images_per_second": 1234.5, "ratio": 4.23, "epoch_seconds": 40.5, "data_share": 0.03,
             "utilisation": 0.76}]  # fmt: skip
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(speed_table("Input pipeline (same model, Adam)", rows))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "1,234" in text and "4.23x" in text and "76%" in text


@pytest.mark.skipif(not HAS_ONNX, reason="needs the export extra")
def test_predict_reads_an_onnx_export(trained_elsewhere: Path, tmp_path: Path) -> None:
    from PIL import Image

    onnx = tmp_path / "m.onnx"
    assert invoke("export", str(trained_elsewhere), "--out", str(onnx), "--batch", "4").exit_code == 0
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    from_onnx = invoke("predict", str(onnx), str(image), "--json", "-")
    from_checkpoint = invoke("predict", str(trained_elsewhere), str(image), "--json", "-", "--device", "cpu")
    assert from_onnx.exit_code == 0 and from_checkpoint.exit_code == 0, from_onnx.output
    [onnx_top], [checkpoint_top] = (json.loads(r.output)["images"] for r in (from_onnx, from_checkpoint))
    assert [t["class"] for t in onnx_top["top"]] == [t["class"] for t in checkpoint_top["top"]]
    assert abs(onnx_top["top"][0]["probability"] - checkpoint_top["top"][0]["probability"]) < 1e-4
    scored = invoke("evaluate", str(onnx), "--json", str(tmp_path / "onnx.json"))  # 30 images in batches of 4
    assert scored.exit_code == 0 and json.loads((tmp_path / "onnx.json").read_text())["num_samples"] == 30
