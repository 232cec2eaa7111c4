from __future__ import annotations

import subprocess
import sys

import pytest

from cifar_cli.config.settings import load_settings
from cifar_cli.runtime import memory
from cifar_cli.runtime.distributed import DistContext
from cifar_cli.train import setup

# Allocates, fills and frees a 64 MiB tensor 20 times; prints the minor page faults of the last 10 rounds. (With the
# heap kept, glibc grows it for the first few rounds while its free lists settle, then serves every round from it.)
FAULTS_PER_ROUND_SCRIPT = """
import resource, sys, torch
from cifar_cli.runtime.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 * 2**20)
before = faults()
for _ in range(10):
    torch.ones(16 * 2**20)  # 64 MiB of float32
print(faults() - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_ROUND_SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not memory.keep_freed_memory_supported(), reason="needs glibc's malloc")
def test_kept_memory_is_reused_instead_of_mapped_again() -> None:
    with_defaults, kept = _page_faults("default"), _page_faults("keep")
    # glibc maps every 64 MiB block afresh: 16,384 faults of 4 KiB pages per round (fewer with huge pages).
    assert kept * 10 < with_defaults, (kept, with_defaults)


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.keep_freed_memory() is False
    assert memory.keep_freed_memory_supported() is False


def test_other_devices_keep_their_own_allocators() -> None:
    assert memory.keep_freed_memory("cuda") is False
    assert memory.keep_freed_memory_supported("cuda") is False


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_unless_told_not_to(monkeypatch: pytest.MonkeyPatch, keep: bool) -> None:
    calls: list[str] = []
    monkeypatch.setattr(setup, "keep_freed_memory", lambda device_type: calls.append(device_type) or True)
    settings = load_settings(None, {"train": {"device": "cpu", "keep_freed_memory": keep}})
    setup.setup_device(settings.train, DistContext())
    assert calls == (["cpu"] if keep else [])
