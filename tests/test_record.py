"""`cifar bench --vs-record`, the parts that run without a GPU: finding the record, its copy with fewer runs,
reading its table, the summary, the refusal on a CPU, and the table from a recorded result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_cli.bench.record import (
    ProgramResult,
    find_anchors,
    parse_record_output,
    read_side_by_side,
    record_copy,
    side_by_side,
    summarise,
)
from cifar_cli.errors import UsageError
from tests.conftest import flat, run_cli

SHARED_ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"

# What airbench94_muon.py prints (its print_training_details), for a warm-up and two timed runs.
RECORD_OUTPUT = """\
---------------------------------------------------------------------------
|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
---------------------------------------------------------------------------
|  warmup  |      1  |     0.1045  |   0.1000  |               |       41.2077  |
|          |      8  |     0.0990  |   0.1000  |               |       44.0155  |
|          |   eval  |     0.0990  |   0.1000  |       0.1000  |       44.2104  |
---------------------------------------------------------------------------
|       0  |      1  |     0.5925  |   0.5710  |               |        0.2931  |
|          |      8  |     0.9275  |   0.9035  |               |        1.3417  |
|          |   eval  |     0.9275  |   0.9035  |       0.9081  |        1.4012  |
---------------------------------------------------------------------------
|       1  |      1  |     0.5870  |   0.5690  |               |        0.2920  |
|          |   eval  |     0.9260  |   0.9050  |       0.9093  |        1.3987  |
---------------------------------------------------------------------------
Mean: 0.9087    Std: 0.0008
"""


def _anchor_folder(root: Path) -> Path:
    folder = root / "shared" / "anchors"
    folder.mkdir(parents=True)
    (folder / "airbench94_muon.py").write_text("for run in range(200)]\n")
    return folder


def test_the_record_is_found_beside_a_checkout_by_flag_or_environment(tmp_path: Path, monkeypatch) -> None:
    folder = _anchor_folder(tmp_path)
    checkout = tmp_path / "main" / "deep" / "inside"
    checkout.mkdir(parents=True)
    assert find_anchors(None, (checkout,)) == folder.resolve()
    elsewhere = _anchor_folder(tmp_path / "other")
    monkeypatch.setenv("CIFAR_ANCHORS", str(elsewhere))
    assert find_anchors(None, (checkout,)) == elsewhere
    assert find_anchors(folder, (checkout,)) == folder  # the flag first
    (elsewhere / "airbench94_muon.py").unlink()
    with pytest.raises(UsageError, match="not in") as missing:
        find_anchors(None, (checkout,))
    assert "--anchors DIR" in missing.value.hint and "cifar10-airbench" in missing.value.hint


@pytest.mark.skipif(not SHARED_ANCHORS.is_dir(), reason="the shared anchors are not beside this checkout")
def test_the_shared_record_copy_changes_only_its_run_count() -> None:
    source = (SHARED_ANCHORS / "airbench94_muon.py").read_text()
    copy = record_copy(source, 5)
    changed = [(a, b) for a, b in zip(source.splitlines(), copy.splitlines()) if a != b]
    assert len(changed) == 1 and "range(5)" in changed[0][1] and "range(200)" in changed[0][0]
    with pytest.raises(UsageError, match="not the expected version"):
        record_copy(copy, 5)


def test_the_records_table_is_read_run_by_run() -> None:
    timed, warmup = parse_record_output(RECORD_OUTPUT)
    assert warmup == {"accuracy": 0.1, "seconds": 44.2104}
    assert timed == [{"accuracy": 0.9081, "seconds": 1.4012}, {"accuracy": 0.9093, "seconds": 1.3987}]


def test_the_record_reads_the_same_images_as_cifar_train(prepared_dir: Path, tmp_path: Path) -> None:
    import torch

    from cifar_cli.bench.record import write_record_data
    from cifar_cli.data.prepare import load_cache

    write_record_data(prepared_dir, tmp_path)
    cache = load_cache(prepared_dir)
    for split in ("train", "test"):
        written = torch.load(tmp_path / "cifar10" / f"{split}.pt", weights_only=True)
        assert written["images"].shape[1:] == (32, 32, 3) and written["images"].dtype == torch.uint8
        assert torch.equal(written["images"].permute(0, 3, 1, 2), cache[f"{split}_images"])
        assert torch.equal(written["labels"], cache[f"{split}_labels"]) and len(written["classes"]) == 10


def test_summaries_are_mean_and_sample_std() -> None:
    summary = summarise([0.90, 0.91, 0.92])
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(0.91) and summary["std"] == pytest.approx(0.01)
    assert summarise([2.0])["std"] == 0.0


def test_on_a_cpu_it_refuses_before_running_anything(tmp_path: Path) -> None:
    folder = _anchor_folder(tmp_path)
    result = run_cli("bench", "--vs-record", "--anchors", str(folder), "--device", "cpu")
    assert result.exit_code == 2 and "needs a CUDA GPU" in flat(result.output), result.output
    assert not Path("runs").exists()
    missing = run_cli("bench", "--vs-record", "--anchors", str(tmp_path / "none"))
    assert missing.exit_code == 2 and "--anchors DIR" in flat(missing.output)


def test_a_recorded_result_renders_on_any_machine(tmp_path: Path) -> None:
    record = ProgramResult("airbench94_muon", "python airbench94_muon.py", [0.9081, 0.9093], [1.40, 1.39], 44.2, 30.0)
    ours = ProgramResult("cifar train --preset fast", "cifar train", [0.9070, 0.9090], [2.80, 2.60], 20.0, 50.0)
    document = side_by_side(record, ours, {"gpu": "NVIDIA H200", "torch": "2.11.0"})
    assert document["time_ratio"] == pytest.approx(2.7 / 1.395)
    path = tmp_path / "vs.json"
    path.write_text(json.dumps(document))
    assert read_side_by_side(path)["ours"]["accuracy"]["n"] == 2
    result = run_cli("bench", "--from-json", str(path), env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "NVIDIA H200" in text and "90.87% ± 0.08%" in text and "1.94x" in text
    assert max(len(line) for line in result.output.splitlines()) <= 80
    path.write_text("{}")
    assert run_cli("bench", "--from-json", str(path)).exit_code == 2
