"""How balanced the classes of a prepared data set are, and when to say so."""

from __future__ import annotations

from dataclasses import dataclass

IMBALANCE_WARNING_RATIO = 5.0  # largest class / smallest class above which `cifar prepare` warns


@dataclass(frozen=True)
class Balance:
    largest: tuple[str, int]  # (class folder, images)
    smallest: tuple[str, int]

    @property
    def ratio(self) -> float:
        return self.largest[1] / max(self.smallest[1], 1)


def class_balance(per_class: dict[str, int]) -> Balance | None:
    """The largest and smallest class of one split; None for an empty split."""
    if not per_class:
        return None
    ordered = sorted(per_class.items(), key=lambda item: item[1])
    return Balance(largest=ordered[-1], smallest=ordered[0])


def imbalance_warning(per_class: dict[str, int], split: str = "train") -> str | None:
    balance = class_balance(per_class)
    if balance is None or balance.ratio <= IMBALANCE_WARNING_RATIO:
        return None
    (big, big_count), (small, small_count) = balance.largest, balance.smallest
    return (
        f"Imbalanced {split} split: {big} has {big_count:,} images, {small} {small_count:,} "
        f"({balance.ratio:.1f}:1, above {IMBALANCE_WARNING_RATIO:g}:1). Accuracy will favour the large classes; "
        "consider `cifar train --class-weights auto` or `--balanced-sampler`, and read macro F1 and the per-class "
        "report of `cifar evaluate`."
    )
