from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cli.errors import UsageError
from cifar_cli.models import available_models, build_model
from cifar_cli.models.airbench import AirbenchNet, ConvGroup
from cifar_cli.predict.inference import load_model
from cifar_cli.train.run import Trainer
from tests.conftest import tiny_settings


@pytest.mark.parametrize("name", ["seed-cnn", "resnet18", "airbench", "airbench-wide", "airbench-deep"])
def test_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, width_multiplier=0.25)
    images = torch.randn(4, 3, 32, 32)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.randn(16, 3, 32, 32))
    logits = model(images)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_registry_lists_every_model_and_rejects_unknown_names() -> None:
    assert set(available_models()) == {"seed-cnn", "resnet18", "airbench", "airbench-wide", "airbench-deep"}
    with pytest.raises(UsageError, match="Unknown model"):
        build_model("vgg99")


def test_the_ladders_networks_grow_in_width_and_depth() -> None:
    widths = {
        name: [group.conv1.out_channels for group in build_model(name).groups]
        for name in ("airbench", "airbench-wide", "airbench-deep")
    }
    assert widths == {"airbench": [64, 256, 256], "airbench-wide": [128, 384, 384], "airbench-deep": [128, 384, 512]}
    assert [hasattr(build_model(n).groups[0], "conv3") for n in ("airbench-wide", "airbench-deep")] == [False, True]


def test_a_deep_group_adds_its_third_convolution_onto_its_first_activation() -> None:
    torch.manual_seed(0)
    group = ConvGroup(8, 8, depth=3).eval()
    images = torch.randn(2, 8, 16, 16)
    first = group.activation(group.norm1(group.pool(group.conv1(images))))
    with torch.no_grad():
        group.conv3.weight.zero_()  # the third branch adds nothing: the group passes its first activation on
    torch.testing.assert_close(group(images), group.activation(first))


def test_whitening_filters_whiten_the_patches() -> None:
    torch.manual_seed(0)
    # Correlated inputs: the whitened 2x2 patch features should come out decorrelated with unit variance.
    base = torch.randn(256, 1, 32, 32)
    images = torch.cat([base, 0.8 * base + 0.2 * torch.randn_like(base), torch.randn(256, 1, 32, 32)], dim=1)
    model = AirbenchNet()
    model.init_from_data(images, eps=1e-6)
    features = torch.nn.functional.conv2d(images, model.whiten.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(features.T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)
    assert not model.whiten.weight.requires_grad


def test_frozen_whitening_bias_gets_no_gradient() -> None:
    model = AirbenchNet(width_multiplier=0.25)
    model.init_from_data(torch.randn(16, 3, 32, 32))
    model.whiten_bias_trainable = False
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert model.whiten.bias.grad is None
    assert model.groups[0].conv1.weight.grad is not None


def test_seed_cnn_pools_before_the_relu_and_still_computes_the_seeds_function() -> None:
    torch.manual_seed(0)
    ours = build_model("seed-cnn").eval()
    # The seed's order within each stage: conv, ReLU, max-pool (same parameter names).
    seed = build_model("seed-cnn").eval()
    for stage in list(seed)[:3]:
        stage[1], stage[2] = stage[2], stage[1]
    assert isinstance(seed[0][1], torch.nn.ReLU) and isinstance(ours[0][1], torch.nn.MaxPool2d)
    seed.load_state_dict(ours.state_dict())
    images = torch.randn(6, 3, 32, 32)
    ours(images).square().sum().backward()
    seed(images).square().sum().backward()
    torch.testing.assert_close(ours(images), seed(images))
    for a, b in zip(ours.parameters(), seed.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_the_airbench_models_take_silu_in_their_groups_and_others_refuse_a_choice() -> None:
    torch.manual_seed(0)
    gelu = build_model("airbench", 0.25)
    silu = build_model("airbench", 0.25, activation="silu")
    silu.load_state_dict(gelu.state_dict())  # the same weights: only the activation differs
    assert {type(group.activation) for group in silu.groups} == {torch.nn.SiLU}
    assert {type(group.activation) for group in gelu.groups} == {torch.nn.GELU}
    images = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(gelu.eval()(images), silu.eval()(images))
    with pytest.raises(UsageError, match="no activation 'silu'"):
        build_model("seed-cnn", activation="silu")
    with pytest.raises(UsageError, match="no activation 'relu'"):
        build_model("airbench-deep", activation="relu")


def test_a_checkpoint_trained_with_silu_is_rebuilt_with_silu(tmp_path: Path, prepared_dir: Path) -> None:
    extra = ("model.name=airbench", "model.width_multiplier=0.25", "model.activation=silu", "train.epochs=1")
    result = Trainer(tiny_settings(tmp_path, prepared_dir, *extra)).run()
    loaded = load_model(result.checkpoint_dir / "last.pth", torch.device("cpu"))
    assert {type(group.activation) for group in loaded.model.groups} == {torch.nn.SiLU}


@pytest.mark.parametrize("name", ["airbench", "airbench-wide", "airbench-deep"])
def test_the_records_head_pool_is_our_global_max_on_cifar_images(name: str) -> None:
    """The records pool with MaxPool2d(3): the 2x2 whitening (no padding) leaves 31 px, the groups' pools 15, 7, 3,
    so on a 32-px image that window is the whole 3x3 map, and our global max is the same reduction."""
    torch.manual_seed(0)
    model = build_model(name, 0.25).eval()
    model.init_from_data(torch.randn(16, 3, 32, 32))
    seen = []
    model.pool.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    model(torch.randn(4, 3, 32, 32))
    ((features, pooled),) = seen
    assert features.shape[-2:] == (3, 3)
    torch.testing.assert_close(pooled, torch.nn.MaxPool2d(3)(features), rtol=0, atol=0)
