"""`--model torchvision:NAME` and `--weights` (models/pretrained.py), tested as a user's machine runs them: the
weights file lies in torch's hub cache under the name torchvision expects (written here, as a download would have
left it), and `--weights default` reads it without any network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cli.data.prepare import load_cache
from tests.conftest import HAS_ONNX, LABEL_NAMES, SHARED_ARCHIVE, flat, run_cli

torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """resnet18's IMAGENET1K_V1 file in a fresh TORCH_HOME: random weights of the right shapes (the real ones
    cannot be downloaded here), 1,000 classes as ImageNet's."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (home / "hub" / "checkpoints").mkdir(parents=True)
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(state, home / "hub" / "checkpoints" / Path(url).name)
    return state


def _data(tmp_path: Path, prepared_dir: Path) -> Path:
    """A small subset of the shared copy (the first 80 images of its first training batch and 20 of its test
    batch, as a folder) where it is on this machine, else the tiny test data."""
    if not SHARED_ARCHIVE.is_file():
        return prepared_dir
    import pickle
    import tarfile

    images = tmp_path / "subset"
    with tarfile.open(SHARED_ARCHIVE) as archive:
        for split, member, count in (("train", "data_batch_1", 80), ("test", "test_batch", 20)):
            batch = pickle.load(archive.extractfile(f"cifar-10-batches-py/{member}"), encoding="bytes")
            for index in range(count):
                folder = images / split / LABEL_NAMES[batch[b"labels"][index]]
                folder.mkdir(parents=True, exist_ok=True)
                pixels = np.asarray(batch[b"data"][index], dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
                Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{index}.png")
    prepared = run_cli("prepare", "--from-folder", str(images), "--processed-dir", str(tmp_path / "p"), "--no-png")
    assert prepared.exit_code == 0, prepared.output
    return tmp_path / "p"


def test_default_weights_come_from_torchs_cache_and_the_head_fits_the_data(hub_cache, tmp_path: Path) -> None:
    from cifar_cli.models import build_model
    from cifar_cli.models.pretrained import checked_weights

    model = build_model("torchvision:resnet18", num_classes=10)
    record = checked_weights("torchvision:resnet18", "default", 10).load_into(model)
    assert record == {"weights": "resnet18 IMAGENET1K_V1", "model": "torchvision:resnet18", "head": "new"}
    loaded = model.net.state_dict()
    assert torch.equal(loaded["conv1.weight"], hub_cache["conv1.weight"])
    assert torch.equal(loaded["layer4.1.bn2.running_mean"], hub_cache["layer4.1.bn2.running_mean"])
    assert loaded["fc.weight"].shape == (10, 512)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)  # resized to 224 inside, 10 classes out
    wrapped = tmp_path / "wrapped.pth"  # as a training script saves it: {"state_dict": ...}
    torch.save({"state_dict": hub_cache}, wrapped)
    again = checked_weights("torchvision:resnet18", str(wrapped), 10)
    assert again.record["weights"] == str(wrapped) and torch.equal(
        again.tensors["conv1.weight"], hub_cache["conv1.weight"]
    )


def test_weights_of_another_shape_or_model_are_refused_with_a_sentence(tmp_path: Path, prepared_dir: Path) -> None:
    other = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    common = ["train", "--epochs", "1", "--device", "cpu", "--processed-dir", str(prepared_dir),
              "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "runs")]  # fmt: skip
    refused = run_cli(*common, "--model", "torchvision:resnet18", "--weights", str(other))
    assert refused.exit_code == 2, refused.output
    assert "do not fit torchvision:resnet18" in flat(refused.output) and "not in this model" in flat(refused.output)
    unknown = run_cli(*common, "--model", "torchvision:resnet9000")
    assert unknown.exit_code == 2 and "no classification model 'resnet9000'" in flat(unknown.output)
    ours = run_cli(*common, "--model", "seed-cnn", "--weights", "default")
    assert ours.exit_code == 2 and "--init-from" in flat(ours.output), ours.output
    no_set = run_cli(*common, "--model", "torchvision:resnet18", "--weights", "IMAGENET9K_V9")
    assert no_set.exit_code == 2 and "IMAGENET1K_V1" in flat(no_set.output)


def test_a_pretrained_torchvision_model_trains_evaluates_exports_and_predicts(
    hub_cache, tmp_path: Path, prepared_dir: Path
) -> None:
    data = _data(tmp_path, prepared_dir)
    trained = run_cli(
        "train", "--model", "torchvision:resnet18", "--weights", "default", "--epochs", "2", "--device", "cpu",
        "--batch-size", "16", "--processed-dir", str(data), "--checkpoint-dir", str(tmp_path / "ck"),
        "--log-dir", str(tmp_path / "runs"), "--run-name", "tv", "--set", "train.freeze_epochs=1",
        "--set", "train.precision=fp32", "--set", "train.channels_last=false", "--set", "train.tta=false",
        "--progress", "plain",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    said = flat(trained.output)
    assert "Starting from the weights resnet18 IMAGENET1K_V1 (torchvision:resnet18): a new head" in said
    assert "the body frozen for the first 1 epoch." in said
    checkpoint = tmp_path / "ck" / "tv" / "last.pth"
    state = torch.load(checkpoint, weights_only=False)
    assert state["data_spec"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # the weights' own normalisation
    evaluated = run_cli("evaluate", str(checkpoint), "--device", "cpu", "--processed-dir", str(data))
    assert evaluated.exit_code == 0, evaluated.output
    image = next((data / "test").rglob("*.png"), None) or _one_png(tmp_path, data)
    predicted = run_cli("predict", str(checkpoint), str(image), "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    if HAS_ONNX:
        exported = tmp_path / "tv.onnx"
        assert run_cli("export", str(checkpoint), "--format", "onnx", "--out", str(exported)).exit_code == 0
        again = run_cli("predict", str(exported), str(image))
        assert again.exit_code == 0, again.output


def _one_png(tmp_path: Path, data: Path) -> Path:
    pixels = load_cache(data)["test_images"][0].permute(1, 2, 0).numpy()
    path = tmp_path / "one.png"
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path
