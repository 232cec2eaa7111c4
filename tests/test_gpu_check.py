"""scripts/gpu_check.py, the parts that run without a GPU: the prepared arrays packed as JPEGs plus their residual
come back exactly, and a change is caught by the checksum."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cifar_cli.data.prepare import load_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():  # noqa: ANN201 - the script as a module
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_packed_arrays_come_back_exactly(gpu_check, prepared_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(gpu_check, "PACK", tmp_path / ".gpu")
    gpu_check.pack_data(prepared_dir, tmp_path / ".gpu" / "data")
    cache = load_cache(prepared_dir)
    gpu_check.rebuild_data(tmp_path / "rebuilt")
    rebuilt = load_cache(tmp_path / "rebuilt")
    assert all(torch.equal(rebuilt[key], cache[key]) for key in cache)
    index = json.loads((tmp_path / ".gpu" / "data" / "index.json").read_text())
    assert sum(len(entry["lengths"]) for entry in index["splits"].values()) == 130
    index["sha256"] = "0" * 64  # arrays that differ from the packed ones stop the check
    (tmp_path / ".gpu" / "data" / "index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="differ"):
        gpu_check.rebuild_data(tmp_path / "again")
