from __future__ import annotations

import pytest
import torch

from cifar_cli.data.loader import Augment, BatchLoader, augment_batch, normalize, stratified_split
from cifar_cli.data.spec import CIFAR10_SPEC


def images_and_labels(count: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.arange(count * 3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(count, 3, 32, 32)
    return images, torch.arange(count) % 10


def test_epochs_are_reproducible_and_differ_between_epochs() -> None:
    images, labels = images_and_labels()
    loader = BatchLoader(images, labels, 8, train=True, spec=CIFAR10_SPEC, augment=Augment(True, 2, 4), seed=3)
    first = [batch for batch, _ in loader]
    again = [batch for batch, _ in loader]
    loader.set_epoch(1)
    other = [batch for batch, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_ranks_get_disjoint_equal_shards() -> None:
    images, labels = images_and_labels(42)
    loaders = [
        BatchLoader(images, labels, 7, train=True, spec=CIFAR10_SPEC, seed=1, rank=rank, world_size=2)
        for rank in range(2)
    ]
    shards = [loader._order().tolist() for loader in loaders]
    assert len(shards[0]) == len(shards[1]) == 21 and not set(shards[0]) & set(shards[1])
    assert [len(loader) for loader in loaders] == [3, 3]
    assert sum(len(lab) for _, lab in loaders[0]) == 21


def test_evaluation_order_is_fixed_and_complete() -> None:
    images, labels = images_and_labels(23)
    loader = BatchLoader(images, labels, 10, train=False, spec=CIFAR10_SPEC)
    assert len(loader) == 3
    assert torch.equal(torch.cat([lab for _, lab in loader]), labels)


def test_flip_and_translate_move_pixels_but_keep_content() -> None:
    images, _ = images_and_labels(16)
    generator = torch.Generator().manual_seed(0)
    flipped = augment_batch(images, Augment(flip=True), generator)
    for original, result in zip(images, flipped):
        assert torch.equal(result, original) or torch.equal(result, original.flip(2))
    shifted = augment_batch(images, Augment(flip=False, translate=2), generator)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    # The centre of a shifted image is a shifted window of the original.
    assert any(not torch.equal(a, b) for a, b in zip(shifted, images))


def test_cutout_zeroes_a_square() -> None:
    images = torch.full((8, 3, 32, 32), 200, dtype=torch.uint8)
    result = augment_batch(images, Augment(flip=False, cutout=8), torch.Generator().manual_seed(0))
    zeros_per_image = (result[:, 0] == 0).flatten(1).sum(1)
    assert (zeros_per_image > 0).all() and (zeros_per_image <= 64).all()


def test_normalize_and_channels_last() -> None:
    images, _ = images_and_labels(2)
    batch = normalize(images, torch.bfloat16, True, CIFAR10_SPEC)
    assert batch.dtype == torch.bfloat16 and batch.is_contiguous(memory_format=torch.channels_last)


def test_stratified_split_is_balanced_and_seeded() -> None:
    labels = torch.arange(200) % 10
    train_a, val_a = stratified_split(labels, 50, seed=1)
    train_b, val_b = stratified_split(labels, 50, seed=1)
    assert torch.equal(val_a, val_b) and len(val_a) == 50 and len(train_a) == 150
    assert torch.bincount(labels[val_a]).tolist() == [5] * 10
    assert not set(train_a.tolist()) & set(val_a.tolist())


def test_translate_is_a_reflect_padded_crop() -> None:
    images, _ = images_and_labels(6)
    shifted = augment_batch(images, Augment(flip=False, translate=3), torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(images.float(), (3, 3, 3, 3), mode="reflect").to(torch.uint8)
    for original_padded, result in zip(padded, shifted):
        windows = [original_padded[:, dy : dy + 32, dx : dx + 32] for dy in range(7) for dx in range(7)]
        assert any(torch.equal(result, window) for window in windows)


def test_alternate_flip_mirrors_each_image_every_other_epoch() -> None:
    images, labels = images_and_labels(16)
    loader = BatchLoader(
        images, labels, 16, train=True, spec=CIFAR10_SPEC, augment=Augment(flip=True, alternate_flip=True), seed=2
    )
    epochs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = loader._order()
        [(batch, _)] = list(loader)
        flipped = [not torch.equal(batch[i], normalize(images[order[i] : order[i] + 1], torch.float32, False, CIFAR10_SPEC)[0])
                   for i in range(16)]  # fmt: skip
        epochs.append(dict(zip(order.tolist(), flipped)))
    for index in range(16):
        assert epochs[0][index] != epochs[1][index] and epochs[0][index] == epochs[2][index]


def test_flip_and_translate_equal_a_reflect_padded_crop_of_the_mirrored_image() -> None:
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flip = torch.arange(12) % 3 == 0
    result = augment_batch(images, Augment(flip=True, translate=2), torch.Generator().manual_seed(1), flip)
    for image, mirrored, shifted in zip(images, flip.tolist(), result):
        source = image.flip(2) if mirrored else image
        padded = torch.nn.functional.pad(source.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
        windows = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(5) for dx in range(5)]
        assert sum(torch.equal(shifted, window) for window in windows) == 1


@pytest.mark.parametrize(
    ("images", "batch", "world"), [(100, 16, 1), (100, 200, 1), (50_000, 2000, 1), (101, 16, 2), (10, 16, 2)]
)
def test_steps_known_before_the_loader_match_its_length(images: int, batch: int, world: int) -> None:
    """The planner counts steps before the loader exists; both must agree or every estimate is off."""
    from cifar_cli.data.loader import training_steps_per_epoch

    loader = BatchLoader(torch.zeros(images, 3, 1, 1, dtype=torch.uint8), torch.zeros(images, dtype=torch.long),
                         batch, train=True, spec=CIFAR10_SPEC, world_size=world)  # fmt: skip
    assert training_steps_per_epoch(images, batch, world) == len(loader)


def test_low_resolution_epochs_resize_the_augmented_images_then_return_to_full_size() -> None:
    """train.low_res: the first epochs' batches are the full-size augmented batches, resized (bilinear, anti-aliased);
    later epochs and evaluation stay at full size."""
    images, labels = images_and_labels()
    augment = Augment(True, 2, 0)
    full = BatchLoader(images, labels, 8, train=True, spec=CIFAR10_SPEC, augment=augment, seed=3)
    small = BatchLoader(images, labels, 8, train=True, spec=CIFAR10_SPEC, augment=augment, seed=3, low_res=(16, 1))
    for (big, _), (little, _) in zip(full, small):
        back_to_pixels = big * torch.tensor(CIFAR10_SPEC.std).view(1, 3, 1, 1) * 255
        back_to_pixels += torch.tensor(CIFAR10_SPEC.mean).view(1, 3, 1, 1) * 255
        resized = torch.nn.functional.interpolate(back_to_pixels, size=(16, 16), mode="bilinear", antialias=True)
        assert little.shape[-2:] == (16, 16)
        assert torch.allclose(little, normalize(resized, torch.float32, False, CIFAR10_SPEC), atol=1e-4)
    small.set_epoch(1)
    assert small.image_size == 32 and next(iter(small))[0].shape[-2:] == (32, 32)
    small.set_epoch(0)
    evaluation = BatchLoader(images, labels, 8, train=False, spec=CIFAR10_SPEC, low_res=(16, 1))
    assert next(iter(evaluation))[0].shape[-2:] == (32, 32)


def test_colour_jitter_shifts_then_scales_each_training_image_within_its_ranges() -> None:
    """train.augment.brightness / .contrast: each training image is the plain normalised image plus one shift in
    +-0.2, times one scale in 1 +- 0.1, drawn per image; evaluation batches stay plain."""
    images, labels = images_and_labels()
    plain_augment, jittered_augment = Augment(True, 2, 0), Augment(True, 2, 0, brightness=0.2, contrast=0.1)
    plain = BatchLoader(images, labels, 8, train=True, spec=CIFAR10_SPEC, augment=plain_augment, seed=3)
    jittered = BatchLoader(images, labels, 8, train=True, spec=CIFAR10_SPEC, augment=jittered_augment, seed=3)
    shifts, scales = [], []
    for (before, _), (after, _) in zip(plain, jittered):
        for one, other in zip(before, after):  # other = (one + shift) * scale: a line through every pixel
            x, y = one.flatten().double(), other.flatten().double()
            scale = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
            shift = y.mean() / scale - x.mean()
            assert torch.allclose(y, (x + shift) * scale, atol=1e-4)
            shifts.append(float(shift)), scales.append(float(scale))
    assert all(abs(shift) <= 0.2 + 1e-4 for shift in shifts) and all(abs(s - 1) <= 0.1 + 1e-4 for s in scales)
    assert max(map(abs, shifts)) > 0.1 and max(abs(s - 1) for s in scales) > 0.05  # drawn, not a fixed nudge
    assert len(set(round(shift, 5) for shift in shifts)) == len(shifts)  # one draw per image
    evaluation = BatchLoader(images, labels, 8, train=False, spec=CIFAR10_SPEC, augment=jittered_augment)
    untouched = BatchLoader(images, labels, 8, train=False, spec=CIFAR10_SPEC)
    assert torch.equal(next(iter(evaluation))[0], next(iter(untouched))[0])
