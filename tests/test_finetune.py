"""Fine-tuning (`--init-from`, `--freeze-epochs`) and imbalanced classes (`--class-weights`, `--balanced-sampler`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cli.checkpoint import load_checkpoint, save_checkpoint
from cifar_cli.config.sections import TrainSettings
from cifar_cli.data.loader import BatchLoader, balanced_draw
from cifar_cli.data.prepare import prepare_folder
from cifar_cli.data.spec import CIFAR10_SPEC
from cifar_cli.models import build_model
from cifar_cli.train.finetune import head_name
from cifar_cli.train.run import Trainer, train
from cifar_cli.train.setup import class_weights
from tests.conftest import flat, run_cli, tiny_settings, write_image_tree


def invoke(*args: object):
    return run_cli(*args)


@pytest.fixture(scope="module")
def source_checkpoint(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Path:
    """A seed-cnn trained for one epoch on the tiny 10-class data: the weights fine-tuning starts from."""
    folder = tmp_path_factory.mktemp("source")
    result = train(tiny_settings(folder, prepared_dir, "train.epochs=1", "train.run_name=source"))
    return result.checkpoint_dir / "last.pth"


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another data set: three classes of 32 x 32 images."""
    root = tmp_path_factory.mktemp("fruit")
    write_image_tree(root / "imgs", {"apple": 24, "pear": 24, "plum": 24}, (32, 32))
    prepare_folder(root / "imgs", root / "processed", write_png=False)
    return root / "processed"


def body_parameters(state: dict) -> dict[str, torch.Tensor]:
    model = build_model(state["model_name"], 1.0, len(state["class_names"]))
    head = head_name(model) + "."
    trainable = {name for name, _ in model.named_parameters() if not name.startswith(head)}
    return {name: tensor for name, tensor in state["model_state"].items() if name in trainable}


def test_fine_tuning_another_data_set_makes_a_new_head_and_freezes_the_body(
    tmp_path: Path, source_checkpoint: Path, three_classes: Path
) -> None:
    """Freeze for 2 epochs: after epoch 1, and after a resume into epoch 2, the body is the source's to the bit and
    the new head (3 classes) has learned; epoch 3 trains the body too. The run records where it started."""
    source = load_checkpoint(source_checkpoint)

    def run(epochs: int) -> dict:
        settings = tiny_settings(tmp_path, three_classes, f"train.epochs={epochs}", f"train.init_from={source_checkpoint}",
                                 "train.freeze_epochs=2", "train.run_name=fruit", "data.val_size=6")  # fmt: skip
        train(settings)
        return load_checkpoint(tmp_path / "checkpoints" / "fruit" / "last.pth")

    head = head_name(build_model("seed-cnn", 1.0, 3)) + ".weight"
    heads = []
    for epochs in (1, 2):
        state = run(epochs)
        assert state["epoch"] == epochs
        for name, tensor in body_parameters(source).items():
            assert torch.equal(state["model_state"][name], tensor), (epochs, name)
        heads.append(state["model_state"][head])
    assert heads[0].shape[0] == 3 and not torch.equal(heads[0], heads[1])
    assert state["started_from"] == {
        "checkpoint": str(source_checkpoint), "run_name": "source", "epoch": 1, "model": "seed-cnn",
        "classes": 10, "head": "new",
    }  # fmt: skip
    assert state["settings"]["train"]["init_from"] == str(source_checkpoint)
    # The inputs are normalised with the statistics the loaded weights were trained with.
    assert state["data_spec"]["mean"] == source["data_spec"]["mean"]
    state = run(3)
    changed = [
        name for name, tensor in body_parameters(source).items() if not torch.equal(state["model_state"][name], tensor)
    ]
    assert changed, "the body never trained after the frozen epochs"


def test_same_classes_load_every_weight(tmp_path: Path, source_checkpoint: Path, prepared_dir: Path) -> None:
    settings = tiny_settings(tmp_path, prepared_dir, "train.epochs=1", f"train.init_from={source_checkpoint}")
    trainer = Trainer(settings)
    trainer.run()
    assert trainer.parts.started_from["head"] == "loaded"
    # Head included: training from loaded weights starts where the source ended, so the loss of the first epoch
    # is that of a trained model (the source's own first epoch started from chance, 2.30).
    first_loss = trainer.progress.history[0]["train_loss"]
    assert first_loss < load_checkpoint(source_checkpoint)["history"][0]["train_loss"]


def test_checkpoints_that_do_not_fit_are_refused_before_training(
    tmp_path: Path, source_checkpoint: Path, three_classes: Path
) -> None:
    common = ["--processed-dir", three_classes, "--device", "cpu", "--epochs", "1",
              "--checkpoint-dir", tmp_path / "ck", "--log-dir", tmp_path / "runs"]  # fmt: skip
    result = invoke("train", "--preset", "fast", "--init-from", source_checkpoint, *common)
    assert result.exit_code == 2 and "holds model seed-cnn; this run trains model airbench" in flat(result.output)
    result = invoke("train", "--preset", "baseline", "--init-from", source_checkpoint,
                    "--set", "model.width_multiplier=0.5", *common)  # fmt: skip
    assert result.exit_code == 2 and "at width x1; this run trains width x0.5" in flat(result.output)
    # A file whose weights have other shapes (another version of the model): every mismatch is named.
    state = load_checkpoint(source_checkpoint)
    state["model_state"]["0.0.weight"] = torch.zeros(5, 3, 3, 3)
    damaged = tmp_path / "other.pth"
    save_checkpoint(state, damaged)
    result = invoke("train", "--preset", "baseline", "--init-from", damaged, *common)
    assert result.exit_code == 2, result.output
    assert "0.0.weight: (5, 3, 3, 3) in the file, (32, 3, 3, 3) here" in flat(result.output)
    assert "Train step speeds" not in result.output  # refused before the speed measurement
    for path in (tmp_path / "model.onnx", tmp_path / "missing.pth"):
        result = invoke("train", "--preset", "baseline", "--init-from", path, *common)
        assert result.exit_code == 2 and ("exported model" in result.output or "No checkpoint" in result.output)
    result = invoke("train", "--preset", "baseline", "--freeze-epochs", "2", *common)
    assert result.exit_code == 2 and "train.freeze_epochs" in result.output
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").rglob("*.pth"))


# ------------------------------------------------------------------------------------------------ imbalance


def test_class_weights_auto_are_inverse_frequency() -> None:
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 0)
    weights = class_weights(TrainSettings(class_weights="auto"), labels, 3)
    assert torch.allclose(weights, torch.tensor([40 / (3 * 30), 40 / (3 * 10), 0.0]))
    assert class_weights(TrainSettings(), labels, 3) is None


def test_a_run_with_class_weights_weighs_its_loss(tmp_path: Path, prepared_dir: Path) -> None:
    trainer = Trainer(tiny_settings(tmp_path, prepared_dir, "train.epochs=1", "train.class_weights=auto"))
    trainer.run()
    weights = trainer.parts.criterion.weight
    labels = trainer.loaders.train.labels
    assert weights is not None and torch.allclose(weights, class_weights(trainer.settings.train, labels, 10))


def test_the_balanced_sampler_draws_every_class_about_equally() -> None:
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    draws = torch.bincount(labels[balanced_draw(labels, torch.Generator().manual_seed(0))], minlength=3)
    assert all(abs(count - 333) < 60 for count in draws.tolist()), draws
    loader = BatchLoader(torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), labels, 100, train=True,
                         spec=CIFAR10_SPEC, balanced=True)  # fmt: skip
    seen = torch.bincount(torch.cat([batch_labels for _, batch_labels in loader]), minlength=3)
    assert seen.sum() == 1000 and seen.min() > 250, seen
    loader.set_epoch(1)
    again = torch.bincount(torch.cat([batch_labels for _, batch_labels in loader]), minlength=3)
    assert not torch.equal(seen, again)  # each epoch draws anew


def test_prepare_prints_class_counts_and_warns_above_five_to_one(tmp_path: Path) -> None:
    write_image_tree(tmp_path / "skewed", {"common": 36, "rare": 6}, (32, 32))
    write_image_tree(tmp_path / "even", {"common": 12, "rare": 6}, (32, 32))
    skewed = invoke("prepare", "--from-folder", tmp_path / "skewed", "--processed-dir", tmp_path / "p1",
                    "--test-fraction", "0.5", "--no-png")  # fmt: skip
    assert skewed.exit_code == 0, skewed.output
    assert "Imbalanced train split: 0_common has 18 images, 1_rare 3 (6.0:1, above 5:1)" in flat(skewed.output)
    assert "--class-weights auto" in flat(skewed.output)
    even = invoke("prepare", "--from-folder", tmp_path / "even", "--processed-dir", tmp_path / "p2",
                  "--test-fraction", "0.5", "--no-png")  # fmt: skip
    assert even.exit_code == 0 and "Imbalanced" not in even.output
    assert "0_common 6 6" in flat(even.output) and "1_rare 3 3" in flat(even.output)  # class, train, test


def test_freezing_under_ddp_keeps_the_body_and_trains_the_head(
    tmp_path: Path, source_checkpoint: Path, three_classes: Path
) -> None:
    """Two processes under torchrun: the body's gradients are dropped after each backward (DDP's hooks are fixed,
    so it keeps requiring them), and after a frozen epoch the body saved by rank 0 is the source's to the bit."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cifar_cli", "train", "--nproc", "2", "--preset", "baseline", "--epochs", "1",
               "--batch-size", "8", "--device", "cpu", "--precision", "fp32", "--run-name", "ddp-ft",
               "--processed-dir", str(three_classes), "--checkpoint-dir", str(tmp_path / "ck"),
               "--log-dir", str(tmp_path / "runs"), "--init-from", str(source_checkpoint), "--freeze-epochs", "1",
               "--val-size", "6"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(tmp_path / "ck" / "ddp-ft" / "last.pth")
    for name, tensor in body_parameters(load_checkpoint(source_checkpoint)).items():
        assert torch.equal(state["model_state"][name], tensor), name
    assert state["started_from"]["head"] == "new" and state["global_step"] > 0


def test_a_run_takes_its_sources_activation_and_refuses_another(source_checkpoint: Path) -> None:
    from dataclasses import replace

    from cifar_cli.config.sections import ModelSettings
    from cifar_cli.errors import UsageError
    from cifar_cli.train.finetune import match_source, read_source

    source = replace(read_source(source_checkpoint), model_name="airbench", activation="silu")
    unnamed = ModelSettings(name="airbench")
    with pytest.raises(UsageError):  # the seed-cnn weights do not fit; the activation was taken before that check
        match_source(source, unnamed, CIFAR10_SPEC.class_names)
    assert unnamed.activation == "silu"
    with pytest.raises(UsageError, match="with activation silu; this run trains gelu"):
        match_source(source, ModelSettings(name="airbench", activation="gelu"), CIFAR10_SPEC.class_names)
