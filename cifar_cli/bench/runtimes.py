"""`cifar bench --export`: inference on the CPU, eager against .pt2 against ONNX Runtime."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cifar_cli.bench.measure import BenchOptions
from cifar_cli.data.spec import CIFAR10_SPEC
from cifar_cli.errors import UsageError
from cifar_cli.models import build_model

EXPORT_BATCH = 256  # throughput rows
LATENCY_RUNS = 50  # batch-1 calls timed per runtime (after warm-up), median reported


def bench_export_runtimes(
    options: BenchOptions, say: Callable[[str], None] = lambda _t: None, model_name: str = "airbench"
) -> dict[str, Any]:
    """Inference of the `fast` preset's model (airbench, random weights, TTA as trained) on the CPU: the eager
    module, its `torch.export` program and ONNX Runtime, batch-1 latency and batch-256 throughput, in one run."""
    import tempfile

    from cifar_cli.export.writer import PixelClassifier, onnx_bytes, pt2_bytes
    from cifar_cli.predict.exported_model import load_exported, require_onnx

    torch.manual_seed(0)
    classifier = PixelClassifier(build_model(model_name, 1.0).eval(), tta=2, spec=CIFAR10_SPEC).eval()
    example = torch.rand(2, 3, 32, 32)
    runners: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager (torch, fp32)": classifier}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        program = Path(folder) / "m.pt2"
        program.write_bytes(pt2_bytes(classifier, example, None, {"input": {"shape": ["N"]}}))
        runners["torch.export program (.pt2)"] = load_exported(program).run
        try:
            require_onnx()
            model = Path(folder) / "m.onnx"
            model.write_bytes(onnx_bytes(classifier, example, None, None, {"input": {"shape": ["N"]}}))
            runners["ONNX Runtime (CPU provider)"] = load_exported(model).run
        except UsageError as error:
            rows.append({"runtime": "ONNX Runtime", "skipped": error.message})
        for name, run in runners.items():
            say(f"Export runtimes: {name}")
            rows.append({"runtime": name, **_latency_and_throughput(run, options)})
    return {"device": "cpu", "model": f"{model_name}, TTA level 2", "rows": rows}


def _latency_and_throughput(run: Callable[[torch.Tensor], torch.Tensor], options: BenchOptions) -> dict[str, float]:
    single, batch = torch.rand(1, 3, 32, 32), torch.rand(EXPORT_BATCH, 3, 32, 32)
    with torch.no_grad():
        for _ in range(max(options.warmup, 3)):
            run(single), run(batch)
        latencies = []
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            run(single)
            latencies.append(time.perf_counter() - started)
        started, images = time.perf_counter(), 0
        while images < EXPORT_BATCH * options.batches or time.perf_counter() - started < options.min_seconds:
            run(batch)
            images += EXPORT_BATCH
        seconds = time.perf_counter() - started
    return {"latency_ms_batch_1": statistics.median(latencies) * 1000, "images_per_second_batch_256": images / seconds}
