"""Checkpoints: one dict of tensors and plain data, written atomically and read with `weights_only=True`."""

from __future__ import annotations

import contextlib
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_cli.errors import UsageError
from cifar_cli.files import tensor_file_bytes, write_atomically

FORMAT_VERSION = 1
REQUIRED_KEYS = {"format_version", "model_name", "model_state", "settings", "epoch", "history"}


def kept_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stands for: the moving average where the run kept one (train.ema), else the
    trained weights. What evaluate, predict, export, calibrate and fine-tuning load."""
    return state.get("ema_state") or state["model_state"]


def save_checkpoint(state: dict[str, Any], path: Path, hint: str | None = None) -> None:
    """Written atomically (files.write_atomically): a crash or kill -9 at any moment leaves the previous file or
    the new one, never a torn file; a failure raises a CifarError and leaves no temporary file."""
    write_atomically(path, tensor_file_bytes(state), hint)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without executing anything from it; every kind of bad file is a UsageError (exit 2)."""
    if not path.exists():
        raise UsageError(f"No checkpoint at {path}.")
    if path.is_dir():
        raise UsageError(f"{path} is a folder, not a checkpoint file.")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path} is not a readable checkpoint (truncated, or not a torch file).")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global outside tensors and plain data: nothing was executed.
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise UsageError(
            f"{path} asks to unpickle arbitrary objects ({named.group(1) if named else 'unknown global'}); refused.",
            hint="Only checkpoints written by `cifar train` can be loaded.",
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise UsageError(
            f"{path} is not a readable checkpoint (truncated or not a torch file: {type(error).__name__})."
        ) from None
    _check_format(state, path)
    return state


def _check_format(state: object, path: Path) -> None:
    if not isinstance(state, dict) or not REQUIRED_KEYS <= set(state):
        raise UsageError(f"{path} is a torch file but not a cifar checkpoint (missing keys).")
    version = state["format_version"]
    if version != FORMAT_VERSION:
        raise UsageError(
            f"{path} has checkpoint format version {version}; this version of cifar reads {FORMAT_VERSION}."
        )
    from cifar_cli.models import available_models
    from cifar_cli.models.pretrained import is_torchvision

    if state["model_name"] not in available_models() and not is_torchvision(state["model_name"]):
        raise UsageError(
            f"{path} holds an unknown model {state['model_name']!r}.",
            hint=f"Known models: {', '.join(available_models())}.",
        )


def capture_rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain lists, so they survive `weights_only=True` loading."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *map(float, numpy_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(position), int(has_gauss), cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        # A resume on another GPU count cannot restore every state; training itself is still correct.
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(states["cuda"])
