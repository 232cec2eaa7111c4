"""Shared fixtures: a tiny CIFAR-10 archive in the official format, built on the fly, and a prepared copy of it."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import re
import signal
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import Result

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-python.tar.gz"
SHARED_MD5 = "3466e0b843d66efd7e25787f51d01865"
# rich fixes a console's width when COLUMNS is set as the console is made (the CLI's consoles are made on import):
# without it, each print reads COLUMNS then, which `isolated_environment` sets wide for every test.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)
# A shell without job control that starts the suite in the background (`cmd &`) makes it ignore SIGINT, and its
# children inherit that: the Ctrl-C tests then wait for runs that never stop. They need the default handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
WIDE_COLUMNS = "1000"
HAS_ONNX = all(
    importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")
)  # no message wraps: a wrap moves with the length of the temporary paths inside it

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Python2StylePickler(pickle._Pickler):
    """Writes `bytes` as Python 2 `str` (SHORT_BINSTRING), as the official batches do, and names numpy's
    reconstruction function by its Python-2-era module path."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + size.to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):  # noqa: ANN001 - pickle's signature
        module = getattr(obj, "__module__", "")
        if module.startswith("numpy._core"):
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global


def py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def make_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Images whose class is visible in their colour, so a tiny net can learn something."""
    rng = np.random.default_rng(seed)
    labels = [i % 10 for i in range(count)]
    rng.shuffle(labels)
    base = np.array([[(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256] for c in range(10)], dtype=np.float64)
    noise = rng.normal(0, 30, size=(count, 3, 32 * 32))
    data = np.clip(base[labels][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
    return data, labels


def batch_bytes(data: np.ndarray, labels: list[int], label: str) -> bytes:
    return py2_pickle(
        {b"batch_label": label.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    )


def build_archive(
    path: Path, per_batch: int = 20, test_count: int = 30, overrides: dict[str, bytes] | None = None
) -> Path:
    """A CIFAR-10-layout archive with 5 x per_batch training and test_count test images."""
    members: dict[str, bytes] = {}
    for index in range(1, 6):
        data, labels = make_images(per_batch, seed=index)
        members[f"data_batch_{index}"] = batch_bytes(data, labels, f"training batch {index} of 5")
    data, labels = make_images(test_count, seed=99)
    members["test_batch"] = batch_bytes(data, labels, "testing batch 1 of 1")
    members["batches.meta"] = py2_pickle(
        {b"label_names": [n.encode() for n in LABEL_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    )
    members["readme.html"] = b"<html>tiny test copy</html>"
    members.update(overrides or {})
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            if payload is None:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_archive(tmp_path_factory.mktemp("archive") / "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, tiny_archive: Path) -> Path:
    """A processed folder (cache + PNG) made from the tiny archive, shared by the tests that only read it."""
    from cifar_cli.data.prepare import prepare_dataset

    raw = tmp_path_factory.mktemp("raw")
    (raw / tiny_archive.name).write_bytes(tiny_archive.read_bytes())
    processed = tmp_path_factory.mktemp("processed")
    prepare_dataset(raw, processed, write_png=True)
    return processed


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """last.pth of one epoch of the baseline on the tiny data, for tests that need a real checkpoint where the
    path is not the point (a refusal must be reached by its own check, not by a missing file). Read only."""
    from cifar_cli.train.run import train

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    return train(tiny_settings(folder, prepared_dir, "train.epochs=1")).checkpoint_dir / "last.pth"


@pytest.fixture(scope="session")
def calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of measured step speeds for the whole session (budget/probe.py), never the user's own."""
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calibration_cache: Path) -> None:
    """Every test runs in its own folder (no ./settings.yaml) with no CIFAR_ variables from the caller."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(calibration_cache))
    monkeypatch.setenv("COLUMNS", WIDE_COLUMNS)
    for key in list(os.environ):
        if key.startswith("CIFAR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CI", "true")
    # An unexpected exception leaves the CLI's error boundary as itself, so `run_cli` can tell a crash from a clean
    # error (both would exit 1 otherwise). Tests of the boundary's own message delete it.
    monkeypatch.setenv("CIFAR_DEBUG", "1")


def run_cli(*args: object, **options: Any) -> Result:
    """`cifar ARGS` through Typer's CliRunner (options as `CliRunner.invoke` takes them: env, input...). The test
    fails when the command crashed: `result.exception` may only be the SystemExit of a handled error (CliRunner
    swallows every other exception, exit 1 and no traceback in the output, like a clean error)."""
    from typer.testing import CliRunner

    from cifar_cli.cli import app
    from cifar_cli.cli.common import console, error_console

    # A command is a process of its own: its consoles measure COLUMNS as it starts. In one test process they were
    # made at the first import, so the width asked for (`env={"COLUMNS": ...}`, else the test's) is set here.
    columns = int((options.get("env") or {}).get("COLUMNS") or os.environ.get("COLUMNS", WIDE_COLUMNS))
    widths = [(each, each.width) for each in (console, error_console)]
    for each, _ in widths:
        each.width = columns
    try:
        result = CliRunner().invoke(app, [str(arg) for arg in args], **options)
    finally:
        for each, width in widths:
            each.width = width
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        command = " ".join(str(arg) for arg in args)
        raise AssertionError(f"`cifar {command}` crashed: {result.exception!r}\n{result.output}") from result.exception
    return result


def flat(console_text: str) -> str:
    """Console text as one line of words: panel and table borders dropped, every run of whitespace one space, so a
    phrase matches wherever rich wrapped it."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", console_text).split())


def tiny_settings(tmp_path: Path, prepared: Path, *assignments: str, preset: str = "baseline"):
    """Settings for a fast CPU run on the tiny prepared data; extra `dotted.key=value` strings override."""
    from cifar_cli.config.settings import load_settings, parse_set_options

    base = [
        f"preset={preset}",
        f"data.processed_dir={prepared}",
        f"data.raw_data_dir={tmp_path / 'raw'}",
        f"log.checkpoint_dir={tmp_path / 'checkpoints'}",
        f"log.log_dir={tmp_path / 'runs'}",
        "log.progress=none",
        "train.epochs=2",
        "train.batch_size=16",
        "train.eval_batch_size=64",
        "train.device=cpu",
        "train.precision=fp32",
        "train.channels_last=true",  # fixed, so that runs compared bit for bit share one layout
        "train.run_name=tiny",
        "train.num_threads=1",
    ]
    return load_settings(None, parse_set_options(base + list(assignments)))


FINE_NAMES = [f"fine{index:02d}" for index in range(100)]
COARSE_NAMES = [f"coarse{index:02d}" for index in range(20)]


def build_cifar100_archive(path: Path, train_count: int = 400, test_count: int = 200) -> Path:
    """A CIFAR-100-layout archive: cifar-100-python/{train,test,meta}, fine_labels (100) and coarse_labels (20,
    here fine // 5), names in meta's fine_label_names / coarse_label_names, as the official one."""
    members: dict[str, bytes] = {}
    for name, count, seed in (("train", train_count, 1), ("test", test_count, 2)):
        rng = np.random.default_rng(seed)
        fine = [index % 100 for index in range(count)]
        rng.shuffle(fine)
        hues = np.array([[(c * 37) % 256, (c * 91) % 256, (c * 53) % 256] for c in range(100)], dtype=np.float64)
        noise = rng.normal(0, 20, size=(count, 3, 32 * 32))
        data = np.clip(hues[fine][:, :, None] + noise, 0, 255).astype(np.uint8).reshape(count, 3072)
        members[name] = py2_pickle({
            b"batch_label": name.encode(), b"fine_labels": fine, b"coarse_labels": [c // 5 for c in fine],
            b"data": data, b"filenames": [b"x.png"] * count,
        })  # fmt: skip
    members["meta"] = py2_pickle({
        b"fine_label_names": [n.encode() for n in FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES],
    })  # fmt: skip
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_image_tree(root: Path, classes: dict[str, int], size: tuple[int, int] = (40, 30), suffix: str = ".png",
                     seed: int = 0) -> Path:  # fmt: skip
    """root/<class>/NNN<suffix>: `count` images per class whose colour says the class (any size, RGB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        colour = np.array([(label * 80) % 256, (label * 150) % 256, (255 - label * 60) % 256], dtype=np.float64)
        for index in range(count):
            noise = rng.normal(0, 25, size=(size[1], size[0], 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}{suffix}")
    return root


def assert_same_weights(first: Path, second: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two checkpoints hold the same weights, bit for bit (and the same moving average); returns both."""
    import torch

    a, b = (torch.load(path, weights_only=True) for path in (first, second))
    for weights in ("model_state", "ema_state"):
        for key, tensor in (a[weights] or {}).items():
            assert torch.equal(tensor, b[weights][key]), (weights, key)
    return a, b
