from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifar_cli.bench import BenchOptions, run_benchmark
from cifar_cli.bench.measure import Candidate, one_repeat
from cifar_cli.bench.rows import bench_fast_preset
from cifar_cli.config.sections import DataSettings
from cifar_cli.config.settings import load_settings
from cifar_cli.errors import UsageError
from tests.conftest import run_cli

QUICK = {
    "batches": 2,
    "warmup": 1,
    "repeats": 1,
    "min_seconds": 0.0,
    "batch_size": 16,
    "seed_workers": 0,
    "device": "cpu",
}


def test_benchmark_measures_both_pipelines_and_every_precision(prepared_dir: Path) -> None:
    options = BenchOptions(**QUICK, models=("seed-cnn", "airbench"), include_fast=False)
    results = run_benchmark(options, DataSettings(processed_dir=prepared_dir))
    reference, ours = results["pipeline"]
    assert reference["ratio"] == 1.0
    assert results["pipeline_speedup"] == pytest.approx(ours["images_per_second"] / reference["images_per_second"])
    assert [row["name"].split(":")[0] for row in results["models"]] == ["seed-cnn"] * 4 + ["airbench"] * 4
    assert [row["name"].split(": ")[1] for row in results["models"][:4]] == [
        "fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last",
    ]  # fmt: skip
    for row in results["pipeline"] + results["models"]:
        assert row["images_per_second"] > 0 and 0 <= row["data_share"] <= 1
        assert row["epoch_seconds"] == pytest.approx(50_000 / row["images_per_second"])
        # FLOP/s over the ceiling of the row's precision; none where that precision is not faster than fp32.
        ceiling = results["ceiling"].get(row["precision"])
        expected = row["flops_per_image"] * row["images_per_second"] / ceiling if ceiling else None
        assert row["flops_per_image"] > 0 and row["utilisation"] == pytest.approx(expected)
    assert results["ceiling"]["fp32"] > 1e9
    assert results["ceiling"].get("bf16", float("inf")) > results["ceiling"]["fp32"]
    # Our pipeline runs in the precision and layout that `cifar train` measured as fastest here.
    decision = results["precision_decisions"][0]
    assert decision["model"] == "seed-cnn" and decision["batch_size"] == 16
    assert results["pipeline"][1]["name"].endswith(decision["chosen"])
    speeds = decision["train_images_per_second"]
    assert speeds[decision["chosen"]] == max(speeds.values())
    assert results["fast_preset"] is None


def test_pipeline_ratio_is_also_given_per_repeat(prepared_dir: Path) -> None:
    options = BenchOptions(**{**QUICK, "repeats": 3}, models=("seed-cnn",), include_fast=False)
    results = run_benchmark(options, DataSettings(processed_dir=prepared_dir))
    reference, ours = results["pipeline"]
    assert len(reference["per_repeat"]) == len(ours["per_repeat"]) == 3
    assert reference["images_per_second"] == pytest.approx(statistics.median(reference["per_repeat"]))
    assert results["pipeline_speedup_per_repeat"] == pytest.approx(
        [mine / theirs for theirs, mine in zip(reference["per_repeat"], ours["per_repeat"])]
    )


class _SleepingStep:
    """Stands in for a train step that takes `seconds`; counts its calls."""

    device = torch.device("cpu")

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.calls += 1
        time.sleep(self.seconds)


def _same_batch_forever() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)


def _sleeper(seconds: float) -> tuple[Candidate, _SleepingStep]:
    step = _SleepingStep(seconds)
    return Candidate("sleeper", _same_batch_forever, step, batch_size=4), step  # type: ignore[arg-type]


def test_a_timed_window_runs_for_at_least_min_seconds() -> None:
    candidate, step = _sleeper(0.01)
    images_per_second, data, compute = one_repeat(candidate, BenchOptions(batches=2, warmup=1, min_seconds=0.2))
    timed = step.calls - 1  # after one warm-up step
    assert timed > 2  # more than `batches`: the window was stretched to min_seconds
    assert timed * (data + compute) >= 0.2
    assert compute >= 0.01 and images_per_second == pytest.approx(4 / (data + compute))
    # No minimum duration: exactly `batches` timed steps.
    candidate, step = _sleeper(0.01)
    one_repeat(candidate, BenchOptions(batches=3, warmup=0, min_seconds=0))
    assert step.calls == 3


def test_bench_cli_writes_json(prepared_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli("bench", "--batches", "1", "--repeats", "1", "--batch-size", "8", "--models", "seed-cnn", "--no-fast",
         "--device", "cpu", "--processed-dir", str(prepared_dir), "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Pipeline speed-up" in result.output
    assert json.loads(out.read_text())["pipeline_speedup"] > 0


def test_bench_needs_the_png_folders(tmp_path: Path, prepared_dir: Path) -> None:
    no_png = tmp_path / "no-png"
    no_png.mkdir()
    (no_png / "cache.pt").write_bytes((prepared_dir / "cache.pt").read_bytes())
    (no_png / "manifest.json").write_text(json.dumps({"png": False}))
    with pytest.raises(UsageError, match="PNG folders"):
        run_benchmark(BenchOptions(**QUICK), DataSettings(processed_dir=no_png))


def test_fast_rows_time_the_preset_against_malloc_defaults_and_micro_batches(prepared_dir: Path) -> None:
    fast = load_settings(None, {"preset": "fast", "model": {"width_multiplier": 0.25}, "train": {"batch_size": 16}})
    data = DataSettings(processed_dir=prepared_dir)
    cpu = torch.device("cpu")
    rows = bench_fast_preset(BenchOptions(**QUICK), data, cpu, fast, micro_batch_size=8)
    preset, system, chunked = rows.preset, rows.system_malloc, rows.micro_batches
    assert "whole" in preset.name and "heap kept" in preset.name
    assert "whole" in system.name and "malloc defaults" in system.name
    assert "in chunks of 8" in chunked.name and "heap kept" in chunked.name
    assert preset.ratio == 1.0
    for row in (system, chunked):
        assert row.ratio == pytest.approx(row.images_per_second / preset.images_per_second)
        assert row.batch_size == 16
    # Chunks no smaller than the batch and the heap left to malloc: only the preset's row, nothing to compare with.
    alone = bench_fast_preset(BenchOptions(**QUICK, keep_freed_memory=False), data, cpu, fast, micro_batch_size=16)
    assert alone.system_malloc is None and alone.micro_batches is None
    assert alone.preset.ratio is None and "malloc defaults" in alone.preset.name
    # The preset's own batch of 2000 is more than the tiny data set holds: a clear error, not an endless wait.
    with pytest.raises(UsageError, match="larger than the training split"):
        bench_fast_preset(BenchOptions(**QUICK), data, cpu)


def test_profile_lists_the_fast_steps_operators(prepared_dir: Path) -> None:
    from cifar_cli.bench import profile_fast_step

    results = profile_fast_step(BenchOptions(**QUICK), DataSettings(processed_dir=prepared_dir))
    names = [row["name"] for row in results["operators"]]
    assert any("conv" in name for name in names), names
    assert 0 < sum(row["share"] for row in results["operators"]) <= 1.0 + 1e-9
    assert results["utilisation"] > 0 and results["images_per_second"] > 0
    assert results["choice"] in ("fp32", "fp32 + channels_last", "bf16", "bf16 + channels_last")
    assert results["batch_size"] == 20  # a real run's steps: 100 tiny training images over 2 + 2 steps and one more


def test_a_gpu_profile_counts_the_devices_time_once_and_sorts_by_it() -> None:
    """torch.profiler lists a kernel both as its own row and in its launching operator's self device time: the
    device's seconds per step count the kernels and copies only, so a launch-bound step shows a small busy share."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from cifar_cli.bench.profile import operator_rows

    def event(key: str, host_us: float, device_us: float, device: DeviceType) -> SimpleNamespace:
        return SimpleNamespace(
            key=key, count=2, self_cpu_time_total=host_us, self_device_time_total=device_us, device_type=device
        )

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    events = [
        event("aten::mm", 300.0, 200.0, cpu),
        event("gemm_kernel", 0.0, 200.0, cuda),
        event("aten::add", 100.0, 50.0, cpu),
        event("add_kernel", 0.0, 50.0, cuda),
        event("Memcpy HtoD", 0.0, 750.0, cuda),
    ]
    rows, device_seconds = operator_rows(events, steps=2, on_gpu=True)
    assert device_seconds == pytest.approx(500e-6)  # (200 + 50 + 750) us over 2 steps, not counting mm/add again
    assert [row["name"] for row in rows[:2]] == ["Memcpy HtoD", "aten::mm"]
    assert rows[0]["share"] == pytest.approx(0.75) and rows[0]["device_seconds_per_step"] == pytest.approx(375e-6)
    assert all(row["calls"] == 1 for row in rows)
    host_rows, none = operator_rows(events, steps=2, on_gpu=False)
    assert none is None and host_rows[0]["name"] == "aten::mm" and host_rows[0]["share"] == pytest.approx(0.75)
    assert "device_seconds_per_step" not in host_rows[0]
