"""train.ema (a moving average of the weights) and train.augment.mixup / cutmix (mixed batches, soft targets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_cli.config.sections import AugmentSettings, EmaSettings
from cifar_cli.errors import SettingsError
from cifar_cli.predict.inference import load_model
from cifar_cli.recipe.ema import WeightAverage
from cifar_cli.recipe.mixing import BatchMixer
from cifar_cli.train.run import train
from tests.conftest import run_cli, tiny_settings


def _set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)
    model.get_buffer("1.num_batches_tracked").fill_(int(value * 10))


def test_the_average_is_the_hand_computed_one_from_its_start_step() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average = WeightAverage(model, decay=0.9, start_step=2)
    expected = None
    for step, value in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        _set_weights(model, value)
        average.update(model, step)
        # Steps 1 and 2 are before the start: the average is the weights; then 0.9 x average + 0.1 x weights.
        expected = value if step <= 2 else 0.9 * expected + 0.1 * value
        state = average.state_dict()
        for name in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
            assert torch.allclose(state[name], torch.full_like(state[name], expected)), (step, name)
        assert int(state["1.num_batches_tracked"]) == int(value * 10)  # integers are copied, not averaged
    assert expected == pytest.approx((0.9 * (0.9 * 2.0 + 0.1 * 4.0) + 0.1 * 8.0) * 0.9 + 0.1 * 16.0)
    assert not any(p.requires_grad for p in average.module.parameters())


def test_a_half_life_is_a_decay_and_both_at_once_are_refused() -> None:
    assert EmaSettings(half_life_steps=10).effective_decay() ** 10 == pytest.approx(0.5)
    assert EmaSettings(decay=0.99).enabled and not EmaSettings().enabled
    result = run_cli("config", "show", "--set", "train.ema.decay=0.9", "--set", "train.ema.half_life_steps=5")
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    with pytest.raises(SettingsError):
        from cifar_cli.config.settings import load_settings

        load_settings(None, {"train": {"ema": {"decay": 0.9, "half_life_steps": 5}}})


def test_a_run_scores_and_keeps_the_average_and_the_commands_load_it(tmp_path: Path, prepared_dir: Path) -> None:
    result = train(tiny_settings(tmp_path, prepared_dir, "train.ema.decay=0.8", "train.ema.start_epoch=1"))
    checkpoint = result.checkpoint_dir / "last.pth"
    state = torch.load(checkpoint, weights_only=True)
    assert state["ema_state"] is not None
    differs = [key for key, t in state["model_state"].items() if t.is_floating_point()
               and not torch.equal(t, state["ema_state"][key])]  # fmt: skip
    assert differs, "the average is a copy of the trained weights"
    loaded = load_model(checkpoint, torch.device("cpu")).model.state_dict()
    for key, tensor in state["ema_state"].items():
        assert torch.equal(loaded[key], tensor), key  # what evaluate, predict, export and calibrate score
    # The final evaluation scored the average: evaluate gives the same accuracy.
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    evaluated = run_cli("evaluate", str(checkpoint), "--device", "cpu", "--json", "-")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["accuracy"] == pytest.approx(final["accuracy"])


def test_a_resume_from_a_checkpoint_without_an_average_starts_it_from_the_restored_weights(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint of a run made before it kept `ema_state`: the average must not start from a fresh network."""
    ema = ("train.ema.decay=0.8", "train.ema.start_epoch=0")
    first = train(tiny_settings(tmp_path, prepared_dir, *ema, "train.epochs=1"))
    checkpoint = first.checkpoint_dir / "last.pth"
    state = torch.load(checkpoint, weights_only=True)
    state["ema_state"] = None
    torch.save(state, checkpoint)
    seen: list[dict[str, torch.Tensor]] = []
    real_update = WeightAverage.update

    def update(self: WeightAverage, model: torch.nn.Module, step: int) -> None:
        if not seen:  # the average as the resumed run's first step finds it
            seen.append({key: tensor.clone() for key, tensor in self.state_dict().items()})
        real_update(self, model, step)

    monkeypatch.setattr(WeightAverage, "update", update)
    train(tiny_settings(tmp_path, prepared_dir, *ema, "train.epochs=2"))
    for key, tensor in state["model_state"].items():
        assert torch.equal(seen[0][key], tensor), key


def _constant_batch(size: int = 8, side: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the value i everywhere, its label i % 4: where each mixed pixel came from can be read back."""
    images = torch.arange(size, dtype=torch.float32).view(size, 1, 1, 1).expand(size, 3, side, side).clone()
    return images, torch.arange(size) % 4


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_and_match_the_mixed_pixels(kind: str) -> None:
    torch.manual_seed(0)
    mixer = BatchMixer.from_settings(AugmentSettings(**{kind: 1.0}), num_classes=8)
    for _ in range(20):
        images, labels = _constant_batch()
        mixed, soft = mixer(images, labels.clone() * 2)  # labels 0, 2, 4, 6, 0, ...: partners differ (i vs 7 - i)
        assert torch.allclose(soft.sum(dim=1), torch.ones(8))
        for i in range(8):
            own, partner = float(i), float(7 - i)
            own_weight = float(soft[i, int(labels[i]) * 2])
            if kind == "mixup":  # every pixel is the same blend
                assert torch.allclose(
                    mixed[i], torch.full_like(mixed[i], own_weight * own + (1 - own_weight) * partner)
                )
            else:  # the share of the image's own pixels
                share = float((mixed[i] == own).float().mean())
                assert share == pytest.approx(own_weight, abs=1e-6), (i, share, own_weight)


def test_no_mixing_unless_asked_and_a_batch_left_unmixed_keeps_its_labels() -> None:
    assert BatchMixer.from_settings(AugmentSettings(), 10) is None
    mixer = BatchMixer.from_settings(AugmentSettings(mixup=1.0, mix_probability=0.0), 4)
    images, labels = _constant_batch()
    same, soft = mixer(images, labels)
    assert torch.equal(same, images) and torch.equal(soft.argmax(dim=1), labels) and torch.all(soft.max(1).values == 1)


def test_a_mixed_run_trains_with_label_smoothing_on_the_soft_targets(tmp_path: Path, prepared_dir: Path) -> None:
    """The same seed twice gives the same weights, mixed batches other weights. (That alone would not notice
    mixing ignored: the soft-target loss changes the weights too. The next test watches the mixed batch reach the
    loss.)"""

    def weights(name: str, *extra: str) -> dict[str, torch.Tensor]:
        settings = tiny_settings(tmp_path, prepared_dir, "optim.label_smoothing=0.1", "train.epochs=1",
                                 f"train.run_name={name}", *extra)  # fmt: skip
        result = train(settings)
        assert result.history[0]["train_loss"] > 0 and 0 <= result.final_metrics["accuracy"] <= 1
        return torch.load(result.checkpoint_dir / "last.pth", weights_only=True)["model_state"]

    plain, again = weights("plain"), weights("again")
    mixed = weights("mixed", "train.augment.mixup=0.5", "train.augment.cutmix=1.0")
    assert all(torch.equal(plain[key], again[key]) for key in plain)
    assert not all(torch.equal(plain[key], mixed[key]) for key in plain)


def test_the_step_learns_from_the_mixed_batch_and_its_soft_targets(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What reaches the loss: other pixels than the loader's batch, and targets that share each row's weight."""
    from cifar_cli.train import loop

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real_forward_backward = loop.forward_backward
    loaded: list[torch.Tensor] = []
    real_mixer = BatchMixer.__call__

    def mixer(self: BatchMixer, images: torch.Tensor, targets: torch.Tensor):  # noqa: ANN202
        loaded.append(images.clone())
        return real_mixer(self, images, targets)

    def spy(model, images, targets, *rest):  # noqa: ANN001, ANN202
        seen.append((images.clone(), targets.clone()))
        return real_forward_backward(model, images, targets, *rest)

    monkeypatch.setattr(BatchMixer, "__call__", mixer)
    monkeypatch.setattr(loop, "forward_backward", spy)
    train(tiny_settings(tmp_path, prepared_dir, "train.augment.mixup=1.0", "train.epochs=1"))
    assert len(seen) == len(loaded) > 0
    for (images, targets), batch in zip(seen, loaded):
        assert targets.dim() == 2 and torch.allclose(targets.sum(dim=1), torch.ones(len(targets)))
        assert (targets.max(dim=1).values < 1).any() and not torch.equal(images, batch)
