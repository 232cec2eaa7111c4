"""`cifar train --teacher`: a trained checkpoint's (or export's) logits blended into the student's loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_cli.data.loader import Augment, BatchLoader
from cifar_cli.data.prepare import load_cache, read_spec
from cifar_cli.recipe.distill import TIMED_BATCHES, DistillationLoss, Teacher, TeacherLogitCache, load_teacher
from cifar_cli.train.run import plan_run, train
from tests.conftest import flat, run_cli, tiny_settings


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(8, 10, generator=generator)
    teacher = torch.randn(8, 10, generator=generator) * 3
    return student, torch.randint(0, 10, (8,), generator=generator), teacher


def test_alpha_0_is_the_plain_loss_and_alpha_1_hears_only_the_teacher() -> None:
    plain = nn.CrossEntropyLoss(label_smoothing=0.2)
    student, targets, teacher = _batch()
    assert torch.equal(DistillationLoss(plain, 0.0, 4.0)(student, targets, teacher), plain(student, targets))
    only_teacher = DistillationLoss(plain, 1.0, 4.0)
    other_targets = (targets + 1) % 10
    assert torch.equal(only_teacher(student, targets, teacher), only_teacher(student, other_targets, teacher))
    # By hand: T^2 x mean over images of sum_c p_teacher log(p_teacher / p_student), both softened by T = 4.
    p_teacher = torch.softmax(teacher / 4, dim=1)
    by_hand = 16 * (p_teacher * (p_teacher.log() - torch.log_softmax(student / 4, dim=1))).sum(dim=1).mean()
    assert float(only_teacher(student, targets, teacher)) == pytest.approx(float(by_hand), rel=1e-5)
    half = DistillationLoss(plain, 0.5, 4.0)(student, targets, teacher)
    assert float(half) == pytest.approx(0.5 * float(plain(student, targets)) + 0.5 * float(by_hand), rel=1e-5)
    # A student that already speaks like its teacher has nothing left to learn from it.
    assert float(only_teacher(teacher, targets, teacher)) == pytest.approx(0.0, abs=1e-6)


def _weights(result) -> dict[str, torch.Tensor]:  # noqa: ANN001 - a TrainResult
    return torch.load(result.checkpoint_dir / "last.pth", weights_only=True)["model_state"]


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[key], second[key]) for key in first)


def test_what_a_student_learns_follows_its_teachers_logits(
    tmp_path: Path, prepared_dir: Path, tiny_checkpoint: Path
) -> None:
    """With alpha 1 a student hears its teacher alone: the same teacher twice gives the same weights, another
    teacher other weights (a run that ignored the teacher's logits would give the same weights for both)."""
    other_teacher = train(tiny_settings(tmp_path / "other", prepared_dir, "train.epochs=1", "train.seed=1"))
    other_checkpoint = other_teacher.checkpoint_dir / "last.pth"

    def student(teacher: Path, name: str) -> dict[str, torch.Tensor]:
        settings = tiny_settings(tmp_path, prepared_dir, f"train.distill.teacher={teacher}", "train.epochs=1",
                                 "train.distill.alpha=1.0", f"train.run_name={name}")  # fmt: skip
        return _weights(train(settings))

    first, again, taught_otherwise = (
        student(tiny_checkpoint, "a"),
        student(tiny_checkpoint, "b"),
        student(other_checkpoint, "c"),
    )
    assert _same(first, again) and not _same(first, taught_otherwise)


def test_a_student_learns_from_a_checkpoint_and_from_an_export(
    tmp_path: Path, prepared_dir: Path, tiny_checkpoint: Path
) -> None:
    settings = tiny_settings(tmp_path, prepared_dir, f"train.distill.teacher={tiny_checkpoint}", "train.epochs=1",
                             "train.distill.alpha=0.7")  # fmt: skip
    result = train(settings)
    state = torch.load(result.checkpoint_dir / "last.pth", weights_only=True)
    assert state["distilled_from"]["path"] == str(tiny_checkpoint)
    assert state["settings"]["train"]["distill"]["alpha"] == 0.7
    assert "distil" in (result.run_dir / "settings.yaml").read_text()
    exported = tmp_path / "teacher.pt2"
    done = run_cli("export", str(tiny_checkpoint), "--format", "pt2", "--out", str(exported))
    assert done.exit_code == 0, done.output
    student = tiny_settings(tmp_path / "b", prepared_dir, f"train.distill.teacher={exported}", "train.epochs=1")
    assert torch.load(train(student).checkpoint_dir / "last.pth", weights_only=True)["distilled_from"]["path"] == str(
        exported
    )


def test_the_planner_counts_the_teachers_forward_pass(
    tmp_path: Path, prepared_dir: Path, tiny_checkpoint: Path
) -> None:
    alone = plan_run(tiny_settings(tmp_path, prepared_dir, "train.time_budget=30s"))
    taught = plan_run(tiny_settings(tmp_path, prepared_dir, "train.time_budget=30s",
                                    f"train.distill.teacher={tiny_checkpoint}"))  # fmt: skip
    assert alone.calibration.teacher_seconds_per_image == 0
    assert taught.calibration.teacher_seconds_per_image > 0
    batch = taught.batch_size
    extra = taught.calibration.step_seconds(batch) - alone.calibration.step_seconds(batch)
    assert extra == pytest.approx(batch * taught.calibration.teacher_seconds_per_image, rel=0.5)


def test_a_teacher_of_other_classes_or_sizes_is_refused_before_any_work(tmp_path: Path, prepared_dir: Path) -> None:
    from tests.conftest import write_image_tree

    other = write_image_tree(tmp_path / "imgs", {"apple": 12, "pear": 12}, (40, 40))
    fruit = tmp_path / "fruit"
    assert run_cli("prepare", "--from-folder", str(other), "--processed-dir", str(fruit)).exit_code == 0
    teacher = train(tiny_settings(tmp_path / "t", fruit, "train.epochs=1", "data.val_size=0",
                                  "scheduler.name=none")).checkpoint_dir / "last.pth"  # fmt: skip
    runs = tmp_path / "student-runs"
    result = run_cli("train", "--teacher", str(teacher), "--processed-dir", str(prepared_dir), "--epochs", "1",
                     "--device", "cpu", "--log-dir", str(runs), "--checkpoint-dir", str(tmp_path / "ck"))  # fmt: skip
    assert result.exit_code == 2 and "knows 2 classes" in flat(result.output), result.output
    assert not list(tmp_path.glob("ck/**/*.pth")) and not list(runs.rglob("*.json"))  # refused before training
    big = tmp_path / "fruit48"
    assert (
        run_cli("prepare", "--from-folder", str(other), "--processed-dir", str(big), "--image-size", "48").exit_code
        == 0
    )
    result = run_cli("train", "--teacher", str(teacher), "--processed-dir", str(big), "--model", "airbench",
                     "--epochs", "1", "--device", "cpu", "--log-dir", str(runs))  # fmt: skip
    assert result.exit_code == 2 and "takes 32 x 32 images" in flat(result.output), result.output
    missing = run_cli("train", "--teacher", str(tmp_path / "nope.pth"), "--processed-dir", str(prepared_dir),
                      "--device", "cpu", "--log-dir", str(runs))  # fmt: skip
    assert missing.exit_code == 2 and "No checkpoint" in flat(missing.output)


@pytest.mark.parametrize("alternate", [False, True])
def test_logits_scored_once_are_the_teachers_logits_of_each_batch(
    prepared_dir: Path, tiny_checkpoint: Path, alternate: bool
) -> None:
    """The fast path looks up, for each image of a batch, the logits of the image as the student sees it: as it
    is, or mirrored (by coin toss or alternating per epoch)."""
    teacher, spec = load_teacher(tiny_checkpoint, torch.device("cpu")), read_spec(prepared_dir)
    images, labels = load_cache(prepared_dir)["train_images"], load_cache(prepared_dir)["train_labels"]
    cache = TeacherLogitCache.score(teacher, images, spec, flips=True)
    augment = Augment(flip=True, alternate_flip=alternate)
    loader = BatchLoader(images, labels, 16, train=True, spec=spec, augment=augment, seed=1)
    mirrored = 0
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch, _ in loader:
            index, flipped = loader.last_batch
            mirrored += int(flipped.sum())
            assert torch.allclose(cache.lookup(index, flipped), teacher.logits(batch, spec), atol=1e-4)
    assert 0 < mirrored < 2 * len(loader) * 16  # both ways were looked up


def test_a_teacher_scores_each_image_once_where_augmentation_allows(
    tmp_path: Path, prepared_dir: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without translation, cutout or mixing the teacher scores each image and its mirror once before training,
    and the steps then learn what they learnt from a teacher scoring every batch."""
    passes: list[int] = []
    logits = Teacher.logits

    def counted(self: Teacher, images: torch.Tensor, spec: object) -> torch.Tensor:
        passes.append(len(images))
        return logits(self, images, spec)

    monkeypatch.setattr(Teacher, "logits", counted)
    taught = (f"train.distill.teacher={tiny_checkpoint}", "train.augment.translate=0", "train.epochs=2")
    cached = train(tiny_settings(tmp_path / "a", prepared_dir, *taught))
    training_images = 90  # of the tiny 100: the baseline recipe holds 10 out for its plateau scheduler
    timing = sum(passes) - 2 * training_images  # the planner's timing passes, then the image and its mirror
    assert passes[-2:] == [training_images, training_images] and timing == (TIMED_BATCHES + 1) * training_images
    passes.clear()
    monkeypatch.setattr(TeacherLogitCache, "allowed", staticmethod(lambda augment, small_epochs: False))
    every_batch = train(tiny_settings(tmp_path / "b", prepared_dir, *taught))
    assert sum(passes) == timing + 2 * (training_images // 16) * 16  # two epochs of batches
    a, b = (torch.load(r.checkpoint_dir / "last.pth", weights_only=True)["model_state"] for r in (cached, every_batch))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
