"""`cifar bench --vs-record`, the parts that run without a GPU: finding the record, its copy with fewer runs,
reading its table, the summary, the refusal on a CPU, and the table from a recorded result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_cli.bench.ours import OURS_NAME, OURS_WARM_NAME, run_ours, run_ours_warm
from cifar_cli.bench.record import (
    RECORDS,
    ProgramResult,
    find_anchors,
    parse_record_output,
    read_side_by_side,
    record_copy,
    records_in,
    run_record,
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
@pytest.mark.parametrize("script", ["airbench94_muon.py", "hiverge_cifar10_speedrun.py"])
def test_the_shared_record_copies_change_only_their_run_count(script: str) -> None:
    source = (SHARED_ANCHORS / script).read_text()
    copy = record_copy(source, 5, script)
    changed = [(a, b) for a, b in zip(source.splitlines(), copy.splitlines()) if a != b]
    assert len(changed) == 1 and "range(5)" in changed[0][1] and "range(200)" in changed[0][0]
    with pytest.raises(UsageError, match=f"{script} is not the expected version"):
        record_copy(copy, 5, script)
    assert [program.script for program in records_in(SHARED_ANCHORS)] == [p.script for p in RECORDS]


# A stand-in for a record, as the copy runs it: the 200 in its loop is the line the copy changes; it prints a table
# in hiverge's manner (a warm-up, then each run's eval row, a progress line ending in a carriage return between).
FAKE_RECORD = """\
import sys
print("|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |")
print("|  warmup  |   eval  |     0.0990  |   0.1000  |       0.1000  |       44.2104  |")
for run in range(200):
    print(f"|  {run + 1:6d}  |   eval  |     0.9275  |   0.9035  |  {0.9081 + run / 1000:.4f}  |  {1.40 + run:.4f}  |")
    print(f"Mean accuracy after {run + 1} runs: 0.9081 | Mean time: 1.40s", end="\\r", flush=True)
"""


def test_a_record_runs_as_a_copy_with_fewer_runs_in_its_own_process(tmp_path: Path) -> None:
    anchors = _anchor_folder(tmp_path)
    (anchors / "hiverge_cifar10_speedrun.py").write_text(FAKE_RECORD)
    hiverge = records_in(anchors)[1]
    result = run_record(hiverge, anchors, 3, tmp_path, print)
    assert result.name == "hiverge" and result.accuracies == pytest.approx([0.9081, 0.9091, 0.9101])
    assert result.span_seconds == pytest.approx([1.40, 2.40, 3.40]) and result.warmup_seconds == 44.2104
    assert (tmp_path / "hiverge_cifar10_speedrun_3_runs.py").read_text() == FAKE_RECORD.replace("200", "3")
    # Its output went to a log as it came (a comparison stopped from outside still shows how far it got).
    assert "Mean accuracy after 3 runs" in (tmp_path / "hiverge_cifar10_speedrun_3_runs.log").read_text()


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
    hiverge = ProgramResult("hiverge", "python hiverge_cifar10_speedrun.py", [0.9090, 0.9110], [1.10, 1.12], 60.0, 25.0)
    ours = ProgramResult("cifar train --preset fast", "cifar train", [0.9070, 0.9090], [2.80, 2.60], 20.0, 50.0)
    document = side_by_side([record, hiverge], ours, {"gpu": "NVIDIA H200", "torch": "2.11.0"})
    assert document["time_ratios"] == pytest.approx({"airbench94_muon": 2.7 / 1.395, "hiverge": 2.7 / 1.11})
    path = tmp_path / "vs.json"
    path.write_text(json.dumps(document))
    assert read_side_by_side(path)["programs"][2]["accuracy"]["n"] == 2
    result = run_cli("bench", "--from-json", str(path), env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "NVIDIA H200" in text and "90.87 ± 0.08" in text and "91.00 ± 0.14" in text and "2 timed runs" in text
    assert "airbench94_muon" in result.output  # the names fit their column whole at 80 columns
    assert "1.94x airbench94_muon" in text and "2.43x hiverge" in text
    assert max(len(line) for line in result.output.splitlines()) <= 80
    # A document written before hiverge's record was measured reads as the same table with one record.
    before = {"machine": document["machine"], "record": record.to_json(), "ours": ours.to_json(), "time_ratio": 1.94}
    path.write_text(json.dumps(before))
    assert [p["name"] for p in read_side_by_side(path)["programs"]] == ["airbench94_muon", ours.name]
    path.write_text("{}")
    assert run_cli("bench", "--from-json", str(path)).exit_code == 2


def test_a_comparison_keeps_what_it_measured_when_a_program_fails(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The record fails, hiverge's runs, and `cifar train --device cuda` (a real process) fails on this CPU: the
    JSON holds hiverge's runs and both failures, rewritten after each program; the command exits non-zero."""
    import torch

    from cifar_cli.runtime import device

    anchors = _anchor_folder(tmp_path)
    (anchors / "airbench94_muon.py").write_text("for run in range(200): pass\nraise SystemExit('no triton here')\n")
    (anchors / "hiverge_cifar10_speedrun.py").write_text(FAKE_RECORD)
    monkeypatch.setattr(device, "resolve_device", lambda _name: torch.device("cuda"))  # past the refusal on a CPU
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Stand-in GPU")
    saved = []
    real_write = __import__("cifar_cli.files", fromlist=["write_text_atomically"]).write_text_atomically
    monkeypatch.setattr(
        "cifar_cli.files.write_text_atomically",
        lambda path, text, **kw: (saved.append(json.loads(text)), real_write(path, text, **kw))[1],
    )
    output = tmp_path / "vs.json"
    monkeypatch.chdir(tmp_path)  # the comparison works under ./runs/vs-record
    args = ["--anchors", anchors, "--runs", "2", "--processed-dir", prepared_dir]
    result = run_cli("bench", "--vs-record", *args, "--json", output, env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    # The record first, then fast warm and cold, then hiverge: a save after each.
    assert [[p["name"] for p in document["programs"]] for document in saved] == [[], [], [], ["hiverge"]]
    assert list(saved[0]["failed"]) == ["airbench94_muon"] and "no triton here" in saved[0]["failed"]["airbench94_muon"]
    document = read_side_by_side(output)
    assert document == saved[-1] and document["time_ratios"] == {}
    assert list(document["failed"]) == ["airbench94_muon", OURS_WARM_NAME, OURS_NAME]
    assert document["programs"][0]["accuracies"] == pytest.approx([0.9081, 0.9091])
    ours_log = tmp_path / "runs" / "vs-record" / "ours" / "vs-record-seed1000.log"
    assert "CUDA is not available" in flat(ours_log.read_text())  # its stderr, in the log beside its runs
    text = flat(result.output)
    assert "fast was not measured" in text and f"airbench94_muon, {OURS_WARM_NAME}, {OURS_NAME} failed" in text
    assert "CUDA is not available" in flat(
        (tmp_path / "runs" / "vs-record" / "ours" / "vs-record-warm.log").read_text()
    )


def test_only_runs_the_programs_it_names_and_refuses_others_before_running(
    prepared_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """`--only hiverge` on a lent GPU with minutes for one program: neither the record nor `fast` runs."""
    import torch

    from cifar_cli.runtime import device

    anchors = _anchor_folder(tmp_path)
    (anchors / "airbench94_muon.py").write_text("for run in range(200): pass\nraise SystemExit('must not run')\n")
    monkeypatch.chdir(tmp_path)
    args = ["bench", "--vs-record", "--anchors", anchors, "--runs", "2", "--processed-dir", prepared_dir]
    unknown = run_cli(*args, "--only", "hiverj", "--device", "cpu")  # named before the GPU refusal
    assert unknown.exit_code == 2 and "hiverj" in flat(unknown.output) and "fast, hiverge" in flat(unknown.output)
    absent = run_cli(*args, "--only", "hiverge", "--device", "cpu")
    assert absent.exit_code == 2 and "hiverge_cifar10_speedrun.py" in flat(absent.output)
    (anchors / "hiverge_cifar10_speedrun.py").write_text(FAKE_RECORD)
    monkeypatch.setattr(device, "resolve_device", lambda _name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Stand-in GPU")
    output = tmp_path / "vs.json"
    result = run_cli(*args, "--only", "hiverge", "--json", output, env={"COLUMNS": "80"})
    assert result.exit_code == 0, (result.output, result.exception)
    document = read_side_by_side(output)
    assert [p["name"] for p in document["programs"]] == ["hiverge"] and document["failed"] == {}
    assert not (tmp_path / "runs" / "vs-record" / "ours").exists()


def test_fast_is_timed_cold_and_warm_as_real_processes(prepared_dir: Path, tmp_path: Path) -> None:
    """Both of ours on a CPU (on a GPU, `--device cuda`): cold, a process per seed after an untimed one; warm, one
    `cifar train --seeds` process whose first seed is the untimed warm-up. Each timed run's accuracy and span come
    from its own final_metrics.json."""
    args = ["--processed-dir", str(prepared_dir), "--epochs", "1", "--set", "model.width_multiplier=0.25"]
    said: list[str] = []
    warm = run_ours_warm([0], args, tmp_path / "warm", said.append, device="cpu")
    cold = run_ours([0], args, tmp_path / "cold", said.append, device="cpu")
    for result, folder, names in ((warm, "warm", ["vs-record-warm-seed0"]), (cold, "cold", ["vs-record-seed0"])):
        finals = [json.loads((tmp_path / folder / "runs" / name / "final_metrics.json").read_text()) for name in names]
        assert result.accuracies == [final["accuracy"] for final in finals]
        assert result.span_seconds == [final["record_span_seconds"] for final in finals]
        assert result.warmup_seconds > 0 and result.wall_seconds > 0
    assert sum("--seeds 1000,0 " in line for line in said) == 1  # one process for every warm seed
    assert sum("--seed " in line for line in said) == 2  # one for each cold one
    document = side_by_side([ProgramResult("airbench94_muon", "x", [0.9], [1.0], 1.0, 1.0)], [warm, cold], {})
    assert list(document["ratios_by_program"]) == [OURS_WARM_NAME, OURS_NAME]
    assert document["time_ratios"] == document["ratios_by_program"][OURS_WARM_NAME]
