"""torchvision's classification models as `--model torchvision:NAME`, trained from scratch or started from
pretrained weights (`--weights default`, a named set such as IMAGENET1K_V1, or a local state dict).

The model takes images at the side its default weights were made for (224 pixels for most): smaller images are
resized on the device inside the model, so training, evaluation, prediction and exports all see the same thing.
Pretrained weights come through torchvision's own loader, which downloads each file once into torch's hub cache
(`$TORCH_HOME/hub/checkpoints/`) and reads it from there afterwards; the head is made new for the data's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from cifar_cli.config.sections import TORCHVISION_PREFIX as PREFIX
from cifar_cli.errors import UsageError
from cifar_cli.models.heads import head_name

WITHOUT_AUX_LOGITS = {"googlenet", "inception_v3"}  # their auxiliary heads return tuples while training
SHOWN_PROBLEMS = 4


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def architecture(name: str) -> str:
    """`torchvision:resnet18` -> `resnet18`, refused with the list where torchvision has no such classifier."""
    import torchvision.models

    bare = name.removeprefix(PREFIX)
    known = torchvision.models.list_models(module=torchvision.models)
    if bare not in known:
        raise UsageError(
            f"torchvision has no classification model {bare!r}.", hint=f"Choose one of: {', '.join(known)}."
        )
    return bare


def _weights_enum(bare: str) -> Any:
    import torchvision.models

    return torchvision.models.get_model_weights(bare)


def input_side(name: str) -> int:
    """The side, in pixels, the architecture's default weights were trained at (their transforms' crop)."""
    return int(_weights_enum(architecture(name)).DEFAULT.transforms().crop_size[0])


def statistics(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std (0..1 scale) that the architecture's pretrained weights expect."""
    transforms = _weights_enum(architecture(name)).DEFAULT.transforms()
    return tuple(transforms.mean), tuple(transforms.std)


class ResizedInput(nn.Module):
    """A torchvision classifier behind a resize: images smaller than `side` pixels are resized up first."""

    def __init__(self, net: nn.Module, side: int) -> None:
        super().__init__()
        self.net, self.side = net, side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] < self.side or images.shape[-2] < self.side:
            images = functional.interpolate(images, size=(self.side, self.side), mode="bilinear", align_corners=False)
        return self.net(images)


def build(name: str, num_classes: int) -> nn.Module:
    """The architecture with random weights and a head for `num_classes` (pretrained ones are loaded after)."""
    import torchvision.models

    bare = architecture(name)
    options = {"aux_logits": False, "init_weights": True} if bare in WITHOUT_AUX_LOGITS else {}
    net = torchvision.models.get_model(bare, weights=None, num_classes=num_classes, **options)
    return ResizedInput(net, input_side(name))


def pretrained_state(name: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The weights' tensors and what to call them: a local state dict file, or a set torchvision names."""
    path = Path(weights).expanduser()
    if path.suffix in (".pth", ".pt", ".bin") or path.exists():
        return _state_from_file(path), str(path)
    enum = _weights_enum(architecture(name))
    chosen = "DEFAULT" if weights.lower() == "default" else weights
    if chosen not in enum.__members__:
        raise UsageError(
            f"{name} has no weights {weights!r}.",
            hint=f"Choose default, one of {', '.join(k for k in enum.__members__ if k != 'DEFAULT')}, or a file.",
        )
    selected = enum[chosen]
    try:
        state = selected.get_state_dict(progress=False)
    except (OSError, RuntimeError, ValueError) as error:  # urllib's URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(selected.url).name
        raise UsageError(
            f"Cannot load {name}'s {selected.name} weights: {error}.",
            hint=f"On a machine without internet, copy the file from {selected.url} to {cache}.",
        ) from None
    return state, f"{name.removeprefix(PREFIX)} {selected.name}"


def _state_from_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UsageError(f"No weights file at {path}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for files that are not state dicts
        raise UsageError(f"{path} is not a state dict torch can read ({type(error).__name__}).") from None
    if isinstance(state, dict) and "model_state" in state:
        raise UsageError(f"{path} is a cifar checkpoint.", hint="Start from it with --init-from instead.")
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))  # a training script's {"state_dict": ...} around the weights
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"{path} is not a state dict (a mapping of names to tensors).")
    return state


@dataclass(frozen=True)
class Pretrained:
    """Pretrained weights checked against the architecture: the tensors to load and the record of the start."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]

    def load_into(self, model: nn.Module) -> dict[str, Any]:
        model.net.load_state_dict(self.tensors, strict=False)
        return self.record


def checked_weights(name: str, weights: str, num_classes: int) -> Pretrained:
    """`weights` read and checked against `name` built for `num_classes` (a throwaway model on the CPU), before
    any measurement or training: all tensors but the head where its shape differs; any other missing, extra or
    differently shaped tensor is refused, named."""
    state, shown = pretrained_state(name, weights)
    net = build(name, num_classes).net
    own = net.state_dict()
    head = head_name(net) + "."
    replaced = {
        key
        for key, tensor in own.items()
        if key.startswith(head) and key in state and tuple(state[key].shape) != tuple(tensor.shape)
    }
    problems = [
        f"{key}: missing"
        if key not in state
        else f"{key}: {tuple(state[key].shape)} in the weights, {tuple(tensor.shape)} here"
        for key, tensor in own.items()
        if key not in replaced and (key not in state or tuple(state[key].shape) != tuple(tensor.shape))
    ]
    problems += [f"{key}: not in this model" for key in sorted(set(state) - set(own))]
    if problems:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise UsageError(
            f"The weights {shown} do not fit {name}: {'; '.join(problems[:SHOWN_PROBLEMS])}{more}.",
            hint="Pass weights of the same architecture (torchvision's state dict for it).",
        )
    tensors = {key: value for key, value in state.items() if key not in replaced}
    return Pretrained(tensors, {"weights": shown, "model": name, "head": "new" if replaced else "loaded"})
