"""What identifies a run: the settings that change what it learns (its name is a hash of them), the differences that
forbid a resume, the values logged to TensorBoard's HParams tab, and what made it (versions, commit)."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_cli import __version__
from cifar_cli.budget.plan import RunPlan
from cifar_cli.config.sections import OFFICIAL_ARCHIVES
from cifar_cli.config.settings import Settings

# Train settings that do not change what a run learns (where and how fast it runs, how it is shown or evaluated at
# the end), and its length: a run is identified by every other setting, so `--epochs 12` after an 8-epoch run
# extends it, and changing anything else (lookahead, micro-batches, the validation split...) starts another run.
NOT_RECIPE = {
    "epochs",
    "eval_batch_size",
    "device",
    "channels_last",
    "compile",
    "deterministic",
    "tta",
    "tta_share",  # which images the final evaluation scores with every view: not what the run learns
    "run_name",
    "resume",
    "requeue_signal",
    "num_threads",
    "keep_freed_memory",
}


# What a run's plan decides for this machine (train/planning.py applies exactly these, from its RunPlan): the
# settings it fills in, never part of what the user asked. A run keeps the user's request (`request` in its
# checkpoint, request.yaml in its folder) apart from these choices (`settings`, settings.yaml, plan.json).
PLAN_CHOICES: dict[str, Callable[[RunPlan, Settings], Any]] = {
    "train.precision": lambda plan, _settings: plan.calibration.precision,
    "train.channels_last": lambda plan, _settings: plan.calibration.channels_last,
    "train.epochs": lambda plan, _settings: plan.epochs,
    "model.width_multiplier": lambda plan, _settings: plan.width_multiplier,
    "model.activation": lambda plan, _settings: plan.activation,
    # small-image epochs: the plan's number where the recipe has a small size at all
    "train.low_res.epochs": lambda plan, settings: (
        plan.low_res_epochs if settings.train.low_res.size else settings.train.low_res.epochs
    ),
}


def apply_plan(settings: Settings, plan: RunPlan) -> None:
    """Fill the plan's choices into the settings a run trains with (not into its request)."""
    for dotted, choose in PLAN_CHOICES.items():
        *sections, name = dotted.split(".")
        holder: Any = settings
        for section in sections:
            holder = getattr(holder, section)
        setattr(holder, name, choose(plan, settings))


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
    identity: dict[str, Any] = {"md5": (data.get("md5") or official_md5).lower(), "val_size": data.get("val_size")}
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


def identity_digest(identity: dict[str, Any]) -> str:
    """Eight hex digits naming a recipe identity (or part of one)."""
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_run_name(settings: Settings) -> str:
    """Same recipe, same name: running the same command again resumes instead of starting a second run."""
    digest = identity_digest(recipe_identity(settings.to_plain()))
    # A ladder run's rung is chosen later, from this machine's speeds: the same command, the same name.
    if settings.rungs:
        return f"ladder-{digest}"
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", settings.model.name)  # torchvision:resnet18 -> torchvision-resnet18
    return f"{settings.preset}-{model}-{digest}"


def recipe_differences(stored: dict[str, Any], current: Settings, planned: bool = False) -> list[tuple[str, Any, Any]]:
    """(setting, in the run, asked for now) where a resume would mix two recipes. `stored` is the run's request,
    or (`planned`: a run recorded before requests were kept) the settings its plan filled in, whose plan choices
    are then not held against it. `auto` asks for nothing specific; keys an older run lacks are not either."""
    before, now = recipe_identity(stored), recipe_identity(current.to_plain())
    chosen_by_plan = set(PLAN_CHOICES) if planned else set()
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


@functools.cache
def provenance() -> dict[str, Any]:
    """What made a checkpoint, a run's results or an export: this package's version, the git commit of the checkout
    it runs from ("-dirty" when tracked files differ from it; None when installed from a wheel), torch, Python."""
    import torch

    return {
        "cifar_cli": __version__,
        "git_commit": _git_commit(Path(__file__).resolve().parents[2]),
        "torch": str(torch.__version__),  # a str subclass that weights_only loading refuses
        "python": platform.python_version(),
    }


def _git_commit(checkout: Path) -> str | None:
    if not (checkout / ".git").exists():
        return None
    git = ["git", "-C", str(checkout)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or a stuck one
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")
