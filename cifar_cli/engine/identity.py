"""What identifies a run: the settings that change what it learns (its name is a hash of them), the differences that
forbid a resume, and the values logged to TensorBoard's HParams tab."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cifar_cli.settings import OFFICIAL_ARCHIVES, Settings

# Train settings that do not change what a run learns (where and how fast it runs, how it is shown or evaluated at
# the end), and its length: a run is identified by every other setting, so `--epochs 12` after an 8-epoch run
# extends it, and changing anything else (lookahead, micro-batches, the validation split...) starts another run.
NOT_RECIPE = {
    "epochs", "eval_batch_size", "device", "channels_last", "compile", "deterministic", "tta", "run_name",
    "resume", "num_threads", "keep_freed_memory",
}  # fmt: skip


def recipe_identity(plain: dict[str, Any]) -> dict[str, Any]:
    """The settings that identify a run, as dotted keys, from `Settings.to_plain()` (or a checkpoint's copy)."""
    sections = {name: plain.get(name, {}) for name in ("model", "optim", "scheduler")}
    sections["train"] = {k: v for k, v in plain.get("train", {}).items() if k not in NOT_RECIPE}
    sections["data"] = data_identity(plain.get("data", {}))
    flat: dict[str, Any] = {}
    _flatten(sections, "", flat)
    return flat


def data_identity(data: dict[str, Any]) -> dict[str, Any]:
    """Which images and how many are held out, not where they live: the archive's or the folder's checksum, plus
    the data set and label set beyond CIFAR-10 (so CIFAR-10 runs keep their names)."""
    dataset = data.get("dataset") or "cifar10"
    official_md5 = OFFICIAL_ARCHIVES.get(dataset, ("", ""))[1]
    identity: dict[str, Any] = {
        "md5": (data.get("md5") or official_md5).lower(),
        "val_size": data.get("val_size"),
    }
    if dataset == "cifar100":
        identity.update(dataset=dataset, label_set=data.get("label_set", "fine"))
    if dataset == "folder":  # md5: the folder's content checksum (`adopt_prepared`)
        identity.update(dataset=dataset, image_size=data.get("image_size", 32))
    return identity


def _flatten(value: Any, prefix: str, into: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", into)
    else:
        into[prefix.rstrip(".")] = value


def default_run_name(settings: Settings) -> str:
    """Same recipe, same name: running the same command again resumes instead of starting a second run."""
    identity = recipe_identity(settings.to_plain())
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    # A ladder run's rung is chosen later, from this machine's speeds: the same command, the same name.
    if settings.rungs:
        return f"ladder-{digest}"
    return f"{settings.preset}-{settings.model.name}-{digest}"


def recipe_differences(stored: dict[str, Any], current: Settings) -> list[tuple[str, Any, Any]]:
    """(setting, in the run, asked for now) where a resume would mix two recipes. `auto` asks for nothing
    specific (the run stored what it resolved to); keys an older checkpoint lacks are not held against it; a
    time budget chose the width."""
    before, now = recipe_identity(stored), recipe_identity(current.to_plain())
    chosen_by_plan = {"model.width_multiplier"} if current.train.time_budget else set()
    return [
        (key, before[key], value)
        for key, value in sorted(now.items())
        if key in before and before[key] != value and value != "auto" and key not in chosen_by_plan
    ]


def hparams(settings: Settings) -> dict[str, Any]:
    """Every setting that identifies the run (a sweep's varied ones included) and its length, for TensorBoard's
    HParams tab; lists and nested values are written as text."""
    identity = recipe_identity(settings.to_plain())
    values = {
        key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
        for key, value in identity.items()
    }
    return {**{k: v for k, v in values.items() if v is not None}, "train.epochs": settings.train.epochs}
