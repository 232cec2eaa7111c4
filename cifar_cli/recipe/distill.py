"""Knowledge distillation (Hinton et al., 2015): a trained teacher's logits blended into the student's loss.

loss = (1 - alpha) x the recipe's loss on the labels + alpha x T^2 x KL(softmax(teacher / T) || softmax(student / T))

The T^2 keeps the soft term's gradients on the scale of the hard one's as T changes. The teacher is a checkpoint
(its own weights, EMA where kept, and its own input statistics) or an export (.pt2 / .onnx, pixels in [0, 1]); it
scores the student's augmented batches in eval mode, with no gradients: a checkpoint without test-time
augmentation, an export as it was exported (with the TTA inside its graph: export with --no-tta for a
teacher that costs one pass).

The fast path: where a training image reaches the student the same way in every epoch (no translation, cutout or
mixing; mirrored or not), the teacher scores each image, and its mirror image where flips are on, once before
training, and the steps look its logits up (TeacherLogitCache): one or two passes over the data in all instead of
one per epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from cifar_cli.config.sections import AugmentSettings
from cifar_cli.data.loader import normalize
from cifar_cli.data.spec import DataSpec
from cifar_cli.errors import UsageError
from cifar_cli.predict.exported_model import EXPORTED_SUFFIXES, fixed_batch, load_exported, run_batches
from cifar_cli.predict.inference import load_model
from cifar_cli.runtime.device import resolve_precision

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TIMED_BATCHES = 3  # forward passes timed for the budget planner
TEACHER_SAMPLE = 250  # training images the teacher's forward pass is timed on
SCORE_BATCH = 500  # images per teacher pass of the fast path


@dataclass(frozen=True)
class Teacher:
    path: Path
    run: Callable[[torch.Tensor], torch.Tensor]  # pixels in [0, 1], N x 3 x S x S -> logits
    class_names: tuple[str, ...]
    image_size: int
    cached: TeacherLogitCache | None = None  # the fast path's logits, scored once per training image

    def batch_logits(
        self, images: torch.Tensor, spec: DataSpec, drawn: tuple[torch.Tensor, torch.Tensor | None] | None
    ) -> torch.Tensor:
        """The teacher's logits for a training batch: looked up where they were scored once (`drawn`: the
        loader's images and mirror flags of the batch), else computed on the batch."""
        if self.cached is not None and drawn is not None:
            return self.cached.lookup(*drawn)
        return self.logits(images, spec)

    def logits(self, images: torch.Tensor, spec: DataSpec) -> torch.Tensor:
        """The teacher's float logits for a batch the student sees (normalised with the student's `spec`). Images
        of another side (train.low_res's small epochs) are resized to the teacher's: it scores the student's view
        at the size it was trained on (an export takes no other)."""
        mean = torch.tensor(spec.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=images.device).view(1, 3, 1, 1)
        pixels = images.float() * std + mean
        if pixels.shape[-1] != self.image_size:
            pixels = functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear")
        with torch.no_grad():
            return self.run(pixels).float()

    def seconds_per_image(self, images: torch.Tensor, spec: DataSpec) -> float:
        """Seconds of one image's teacher pass, timed on a batch the way training calls it (after a warm-up)."""
        self.logits(images, spec)
        started = time.perf_counter()
        for _ in range(TIMED_BATCHES):
            self.logits(images, spec)
        return (time.perf_counter() - started) / (TIMED_BATCHES * len(images))

    def record(self) -> dict[str, object]:
        """What a checkpoint keeps of the teacher it learnt from."""
        return {"path": str(self.path), "classes": len(self.class_names), "image_size": self.image_size}


class TeacherLogitCache:
    """The teacher's logits of every training image, and of its mirror image where flips are on."""

    def __init__(self, plain: torch.Tensor, mirrored: torch.Tensor | None) -> None:
        self.plain, self.mirrored = plain, mirrored  # N x classes, float32

    @classmethod
    def score(cls, teacher: Teacher, images: torch.Tensor, spec: DataSpec, flips: bool) -> TeacherLogitCache:
        """Score uint8 `images` (all training images, on the training device), in batches of SCORE_BATCH."""

        def logits_of(pixels: torch.Tensor) -> torch.Tensor:
            batches = pixels.split(SCORE_BATCH)
            return torch.cat([teacher.logits(normalize(b, torch.float32, False, spec), spec) for b in batches])

        return cls(logits_of(images), logits_of(images.flip(3)) if flips else None)

    def lookup(self, index: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
        plain = self.plain[index]
        if flipped is None or self.mirrored is None:
            return plain
        return torch.where(flipped.view(-1, 1), self.mirrored[index], plain)

    @staticmethod
    def allowed(augment: AugmentSettings, small_epochs: bool) -> bool:
        """Whether each image reaches the student in one of at most two fixed ways (as is, or mirrored), at one
        size: no epochs on smaller images (train.low_res), whose views the cached logits are not of."""
        return augment.fixed_views() and not small_epochs

    @staticmethod
    def passes(augment: AugmentSettings) -> int:
        """Teacher passes per training image the cache costs: the image, and its mirror image where flips are on."""
        return 2 if augment.flip else 1


def ready_teacher(
    path: Path,
    device: torch.device,
    spec: DataSpec,
    images: torch.Tensor,
    augment: AugmentSettings,
    dry_run_epochs: int | None = None,
    small_epochs: bool = False,
) -> tuple[Teacher, float]:
    """The teacher at `path`, checked against the data's `spec`, and its seconds per training image for the budget
    planner, timed on TEACHER_SAMPLE of `images` (uint8 training images). Where the augmentation allows, it scores
    all of `images` now (the fast path): a plan made afterwards counts that time as spent, and the steps cost
    nothing more; a dry run (`dry_run_epochs`) scores nothing and spreads that cost over its epochs instead."""
    teacher = load_teacher(path, device)
    check_teacher_fits(teacher, spec)
    batch = normalize(images[:TEACHER_SAMPLE].to(device), torch.float32, False, spec)
    seconds = teacher.seconds_per_image(batch, spec)
    if not TeacherLogitCache.allowed(augment, small_epochs):
        return teacher, seconds
    if dry_run_epochs is not None:
        return teacher, seconds * TeacherLogitCache.passes(augment) / dry_run_epochs
    return replace(teacher, cached=TeacherLogitCache.score(teacher, images.to(device), spec, augment.flip)), 0.0


def load_teacher(path: Path, device: torch.device) -> Teacher:
    """A checkpoint (its kept weights) or an export (its own runtime) as a teacher on `device`."""
    if path.suffix in EXPORTED_SUFFIXES:
        exported = load_exported(path)
        contract = exported.contract
        batch = fixed_batch(contract)

        def run_export(pixels: torch.Tensor) -> torch.Tensor:  # its runtime takes CPU tensors, in its own batch
            return run_batches(exported.run, pixels.cpu(), batch).to(pixels.device)

        return Teacher(path, run_export, tuple(contract["class_names"]), int(contract["input"]["shape"][-1]))
    loaded = load_model(path, device)
    model, spec = loaded.model, loaded.spec
    # fp32 on a CPU (bf16 is emulated, 14-16x slower, on some), the GPU's autocast type on a GPU.
    precision = resolve_precision("auto", device)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

    def run_checkpoint(pixels: torch.Tensor) -> torch.Tensor:
        with precision.autocast(device):
            return model((pixels - mean) / std)

    return Teacher(path, run_checkpoint, tuple(spec.class_names), spec.image_size)


def check_teacher_fits(teacher: Teacher, spec: DataSpec) -> None:
    """A teacher that sees other classes (or another order) or another image size cannot teach this data."""
    if list(teacher.class_names) != list(spec.class_names):
        raise UsageError(
            f"The teacher {teacher.path} knows {len(teacher.class_names)} classes "
            f"({', '.join(teacher.class_names[:4])}{', ...' if len(teacher.class_names) > 4 else ''}); this data has "
            f"{len(spec.class_names)} ({', '.join(spec.class_names[:4])}{', ...' if len(spec.class_names) > 4 else ''}).",
            hint="Distil from a teacher trained on the same classes, in the same order (the same prepared data).",
        )
    if teacher.image_size != spec.image_size:
        raise UsageError(
            f"The teacher {teacher.path} takes {teacher.image_size} x {teacher.image_size} images; this data is "
            f"{spec.image_size} x {spec.image_size}.",
            hint="Prepare the data at the teacher's --image-size, or choose a teacher trained at this size.",
        )


class DistillationLoss(nn.Module):
    """The recipe's loss on the targets blended with the teacher's softened logits (see the module's docstring)."""

    def __init__(self, hard_loss: LossFunction, alpha: float, temperature: float) -> None:
        super().__init__()
        self.hard_loss, self.alpha, self.temperature = hard_loss, alpha, temperature

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:
            return self.hard_loss(logits, targets)
        temperature = self.temperature
        soft = functional.kl_div(
            functional.log_softmax(logits / temperature, dim=1),
            functional.log_softmax(teacher_logits.float() / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (temperature**2)
        if self.alpha == 1:
            return soft
        return (1 - self.alpha) * self.hard_loss(logits, targets) + self.alpha * soft
