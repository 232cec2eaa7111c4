"""What a `fast` training step asks of the device, counted on a CPU: the values it reads back to the host (each one
would make a GPU wait) and its aten ops (kernel launches, roughly). Per step: an epoch of 8 steps less one of 4, the
rest of the run alike, so that set-up, evaluation and the epoch's end cancel out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_cli.train.run import train
from tests.conftest import tiny_settings

# Ops whose result the host must wait for: a scalar read back, or an output whose size depends on the values.
HOST_READS = frozenset({"_local_scalar_dense", "item", "_unique2", "unique_dim", "unique_consecutive", "nonzero",
                        "nonzero_static", "bincount", "masked_select", "equal", "is_nonzero", "allclose"})  # fmt: skip
MAX_READS_PER_STEP = 0.5  # issue 47's marks, for `fast` in bf16 (as a GPU trains it)
MAX_OPS_PER_STEP = 400


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads, self.ops = 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        self.reads += func._schema.name.split("::")[-1] in HOST_READS
        return func(*args, **(kwargs or {}))


def _counted(tmp_path: Path, prepared_dir: Path, images: int) -> OpCounter:
    settings = tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "train.batch_size=10", "train.precision=bf16",
                             f"data.train_subset={images}", f"train.run_name=count{images}", "data.val_size=0",
                             "model.width_multiplier=0.25", preset="fast")  # fmt: skip
    counter = OpCounter()
    with counter:
        train(settings)
    return counter


@pytest.fixture(scope="module")
def per_step(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> tuple[float, float]:
    folder = tmp_path_factory.mktemp("counts")
    _counted(folder / "warm", prepared_dir, 40)  # the speed probes measured once, outside the counts
    short, long = _counted(folder, prepared_dir, 40), _counted(folder, prepared_dir, 80)
    return (long.reads - short.reads) / 4, (long.ops - short.ops) / 4


def test_a_fast_step_reads_nothing_back_from_the_device(per_step: tuple[float, float]) -> None:
    reads, _ = per_step
    assert reads <= MAX_READS_PER_STEP, f"{reads} host reads per step"


def test_a_fast_step_launches_at_most_400_ops(per_step: tuple[float, float]) -> None:
    _, ops = per_step
    assert 100 < ops <= MAX_OPS_PER_STEP, f"{ops} aten ops per step"
