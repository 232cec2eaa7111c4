"""In-memory batches, augmented as whole batches on the training device (no per-image decoding in the loop)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn import functional

from cifar_cli.data.spec import DataSpec


@dataclass(frozen=True)
class Augment:
    flip: bool = True
    translate: int = 0  # pixels; random crop of the image padded by this much (reflect padding)
    cutout: int = 0  # side of a zeroed square, pixels
    alternate_flip: bool = False  # flip every other epoch per image instead of at random
    # Colour jitter on the normalised images (as hiverge's record): each image shifted by up to +-brightness
    # (in units of the data's standard deviation), then scaled by 1 +- up to contrast.
    brightness: float = 0.0
    contrast: float = 0.0


@functools.cache
def _mean_and_std(
    device: torch.device, mean_01: tuple[float, ...], std_01: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """On the 0..255 scale, made once per device and data set (a host-to-device copy per batch would stall a GPU)."""
    mean = torch.tensor(mean_01, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std_01, device=device).view(1, 3, 1, 1) * 255
    return mean, std


def normalize(images_uint8: torch.Tensor, dtype: torch.dtype, channels_last: bool, spec: DataSpec) -> torch.Tensor:
    """uint8 N x 3 x H x W -> floats normalised with the data set's own statistics, in `dtype`, optionally in
    channels_last memory layout."""
    mean, std = _mean_and_std(images_uint8.device, spec.mean, spec.std)
    images = ((images_uint8.float() - mean) / std).to(dtype)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def augment_batch(
    images: torch.Tensor, augment: Augment, generator: torch.Generator, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Flip, translate and cutout of a uint8 or float batch, decided by `generator` (or the given flip mask)."""
    batch = images.shape[0]
    if augment.flip and flip is None:
        flip = torch.rand(batch, generator=generator, device=generator.device).to(images.device) < 0.5
    if not augment.flip:
        flip = None
    if flip is not None or augment.translate:
        images = _flip_and_translate(images, flip, augment.translate, generator)
    if augment.cutout:
        images = _cutout(images, augment.cutout, generator)
    return images


def color_jitter(images: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator) -> torch.Tensor:
    """Normalised images, each shifted by a uniform draw in +-brightness, then scaled by 1 + a uniform draw in
    +-contrast (two draws per image from `generator`)."""
    draws = torch.rand(2, images.shape[0], 1, 1, 1, generator=generator, device=generator.device) * 2 - 1
    draws = draws.to(images.device, images.dtype)
    return (images + draws[0] * brightness) * (1 + draws[1] * contrast)


def _flip_and_translate(
    images: torch.Tensor, flip: torch.Tensor | None, pad: int, generator: torch.Generator
) -> torch.Tensor:
    """Mirror the images where `flip` is set, then shift each by up to `pad` pixels each way, filling with the
    mirrored border (as airbench).

    One gather per batch in the input dtype (uint8 stays one byte per value): the source pixel of every output
    pixel is worked out on B x H and B x W index tables, instead of a pass each for flipping, padding and
    cropping.
    """
    batch, channels, height, width = images.shape
    device = images.device
    rows = torch.arange(height, device=device).expand(batch, height)
    cols = torch.arange(width, device=device).expand(batch, width)
    if pad:
        shifts = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator, device=generator.device)
        shifts = shifts.to(device)
        rows = _reflect_index(height, pad, device)[rows + shifts[0].view(-1, 1)]
        cols = _reflect_index(width, pad, device)[cols + shifts[1].view(-1, 1)]
    if flip is not None:
        cols = torch.where(flip.view(-1, 1), width - 1 - cols, cols)
    source = (rows.view(batch, height, 1) * width + cols.view(batch, 1, width)).view(batch, 1, -1)
    flat = images.reshape(batch, channels, height * width)
    return flat.gather(2, source.expand(batch, channels, height * width)).view(batch, channels, height, width)


def _reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis: -2 -> 2, size -> size - 2, ..."""
    index = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def _cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    batch, _, height, width = images.shape
    centres = torch.rand(2, batch, generator=generator, device=generator.device).to(images.device)
    top = (centres[0] * height).long().view(-1, 1, 1) - size // 2
    left = (centres[1] * width).long().view(-1, 1, 1) - size // 2
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside.unsqueeze(1), 0)


class BatchLoader:
    """Yields (normalised images, labels) batches from tensors that already sit on the training device.

    Each epoch's order comes from `seed` and the epoch number alone, so a resumed run sees the same batches. With
    `world_size > 1` every rank takes a disjoint, equally long shard of that order (for DistributedDataParallel).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        train: bool,
        spec: DataSpec,
        augment: Augment | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
        balanced: bool = False,
        low_res: tuple[int, int] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train = batch_size, train
        self.augment = augment or Augment(flip=False)
        self.seed, self.dtype, self.channels_last = seed, dtype, channels_last
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        # Training drops the ragged last batch (BatchNorm dislikes tiny batches) unless it would drop everything.
        self.drop_last = (train and len(labels) // world_size >= batch_size) if drop_last is None else drop_last
        self.epoch = 0
        self.balanced = balanced  # training order: each class drawn equally often, with replacement
        self.low_res = low_res  # (side in pixels, epochs): the first epochs' images resized to that side
        # For alternating flips: whether each image is mirrored in even epochs (odd epochs do the opposite).
        first_flip = torch.Generator().manual_seed(seed + 12_345)
        self.even_epoch_flip = (torch.rand(len(labels), generator=first_flip) < 0.5).to(images.device)
        # The last batch yielded: which images, and which of them mirrored (None: none were), for a distilling
        # run's teacher whose logits were scored once per image (recipe/distill.py).
        self.last_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # The epoch's random streams as they stand (flips and shifts, colour jitter), and where the next
        # iteration starts: a run stopped mid-epoch saves the one and resumes at the other, batch for batch.
        self.generators: tuple[torch.Generator, torch.Generator] | None = None
        self._resume_at: tuple[int, list[torch.Tensor]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, batch: int, generator_states: list[torch.Tensor]) -> None:
        """The next iteration (of this epoch) starts at batch `batch` (0-based), its streams in the saved states."""
        self._resume_at = (batch, generator_states)

    def generator_states(self) -> list[torch.Tensor]:
        """The states of this epoch's streams after the last batch drawn, for `resume_at`."""
        assert self.generators is not None, "no epoch is being drawn"
        return [generator.get_state() for generator in self.generators]

    @property
    def samples_per_rank(self) -> int:
        return len(self.labels) // self.world_size if self.train else len(self.labels)

    def __len__(self) -> int:
        count = self.samples_per_rank
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def images_in(self, steps: int) -> int:
        """The images (on this rank) that the first `steps` batches of an epoch hold: a split smaller than one
        batch makes a single short one."""
        return min(steps * self.batch_size, self.samples_per_rank)

    def _order(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(len(self.labels))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.balanced:
            order = balanced_draw(self.labels.cpu(), generator)
        else:
            order = torch.randperm(len(self.labels), generator=generator)
        per_rank = self.samples_per_rank
        return order[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.images.device)
        # The draws are made on the images' device: no copy from the host that a GPU step would wait for. (A GPU's
        # stream of numbers differs from a CPU's; each is seeded and repeats.)
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 7_919 + self.epoch * 31 + self.rank + 1)
        # Colour jitter draws from its own stream: turning it on leaves every flip and shift as it was.
        jitter = torch.Generator(device=device).manual_seed(self.seed * 7_919 + self.epoch * 31 + self.rank + 104_729)
        self.generators, first = (generator, jitter), 0
        if self._resume_at is not None:
            (first, states), self._resume_at = self._resume_at, None
            for stream, state in zip(self.generators, states):
                stream.set_state(state.cpu())
        for batch_index in range(first, len(self)):
            index = order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            images, flip = self.images[index], None
            if self.train:
                flip = self._flips(index, generator)
                images = augment_batch(images, self.augment, generator, flip)
                images = self._resized(images)
            self.last_batch = (index, flip)
            normalised = normalize(images, self.dtype, self.channels_last, self.spec)
            if self.train and (self.augment.brightness or self.augment.contrast):
                normalised = color_jitter(normalised, self.augment.brightness, self.augment.contrast, jitter)
            yield normalised, self.labels[index]

    @property
    def image_size(self) -> int:
        """The side of this epoch's training images, in pixels."""
        if self.train and self.low_res is not None and self.epoch < self.low_res[1]:
            return self.low_res[0]
        return self.images.shape[-1]

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented uint8 images at this epoch's size: as they are, or resized (floats on the 0..255 scale)."""
        side = self.image_size
        if side == images.shape[-1]:
            return images
        return functional.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True)

    def _flips(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """Which images of the batch are mirrored: alternating per epoch, or a coin toss drawn first from the
        batch's generator (as augment_batch would draw it)."""
        if not self.augment.flip:
            return None
        if self.augment.alternate_flip:
            return self.even_epoch_flip[index] ^ bool(self.epoch % 2)
        return torch.rand(len(index), generator=generator, device=generator.device).to(index.device) < 0.5


def balanced_draw(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """As many indices as there are labels, drawn with replacement so that every class present is equally likely:
    an epoch of an imbalanced split sees each class about equally often (rare images repeat, common ones are
    skipped), as torch's WeightedRandomSampler with inverse-frequency weights."""
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def training_steps_per_epoch(images: int, batch_size: int, world_size: int = 1) -> int:
    """len() of a training BatchLoader over `images` images, known before the loader is built."""
    per_rank = images // world_size
    return per_rank // batch_size if per_rank >= batch_size else -(-per_rank // batch_size)


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) with `val_size` validation images spread evenly over the classes, seeded."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [val_size // len(classes) + (1 if i < val_size % len(classes) else 0) for i in range(len(classes))]
    val_parts = []
    for cls, count in zip(classes.tolist(), per_class):
        members = (labels == cls).nonzero().flatten()
        val_parts.append(members[torch.randperm(len(members), generator=generator)[:count]])
    val_index = torch.cat(val_parts).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_index] = False
    return keep.nonzero().flatten(), val_index
