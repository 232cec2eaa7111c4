from __future__ import annotations

import re
from pathlib import Path

import pytest

from cifar_cli.config.settings import available_presets, load_settings, parse_set_options, read_preset
from cifar_cli.errors import SettingsError, UsageError

REPO_SETTINGS = Path(__file__).resolve().parents[1] / "settings.yaml"


def test_defaults_come_from_the_fast_preset() -> None:
    settings = load_settings()
    assert (settings.preset, settings.model.name, settings.optim.name) == ("fast", "airbench", "muon")
    assert (settings.train.batch_size, settings.train.epochs) == (2000, 8)
    assert settings.train.micro_batch_size is None


def test_micro_batches_are_set_and_must_be_positive() -> None:
    chunked = load_settings(None, parse_set_options(["train.micro_batch_size=500"]))
    assert chunked.train.micro_batch_size == 500 and chunked.train.batch_size == 2000
    with pytest.raises(SettingsError) as error:
        load_settings(None, parse_set_options(["train.micro_batch_size=0"]))
    assert [row[0] for row in error.value.rows] == ["train.micro_batch_size"]


def test_precedence_flags_over_env_over_yaml_over_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("optim:\n  lr: 0.5\n  momentum: 0.7\ntrain:\n  seed: 3\n  epochs: 4\n")
    monkeypatch.setenv("CIFAR_OPTIM__LR", "0.25")
    monkeypatch.setenv("CIFAR_TRAIN__SEED", "5")
    settings = load_settings(config, {"optim": {"lr": 0.125}})
    assert settings.optim.lr == 0.125  # flag beats env and YAML
    assert settings.train.seed == 5  # env beats YAML
    assert settings.optim.momentum == 0.7  # YAML beats the preset (0.85)
    assert settings.optim.nesterov is True  # preset beats the defaults
    assert settings.train.epochs == 4


def test_default_config_file_is_read_from_the_working_folder(tmp_path: Path) -> None:
    (tmp_path / "settings.yaml").write_text("preset: baseline\ntrain:\n  epochs: 7\n")
    settings = load_settings()
    assert settings.model.name == "seed-cnn" and settings.train.epochs == 7


def test_the_shipped_settings_file_is_valid_and_matches_the_defaults(tmp_path: Path) -> None:
    assert load_settings(REPO_SETTINGS) == load_settings()


def test_preset_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_PRESET", "resnet18")
    assert load_settings().model.name == "resnet18"


def test_set_options_are_typed_yaml_scalars() -> None:
    nested = parse_set_options(["optim.lr=0.1", "train.augment.flip=false", "model.name=resnet18", "data.urls=[a, b]"])
    assert nested == {
        "optim": {"lr": 0.1},
        "train": {"augment": {"flip": False}},
        "model": {"name": "resnet18"},
        "data": {"urls": ["a", "b"]},
    }


@pytest.mark.parametrize(
    ("overrides", "field", "problem"),
    [
        ({"optim": {"lrr": 1}}, "optim.lrr", "unknown setting"),
        ({"optim": {"lr": -0.1}}, "optim.lr", "greater than 0"),
        ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
        ({"train": {"device": "tpu"}}, "train.device", "must be auto, cpu"),
        ({"train": {"epochs": "many"}}, "train.epochs", "valid integer"),
        ({"bogus": 1}, "bogus", "unknown setting"),
        (
            {"model": {"whiten_bias_schedule": "decay"}, "scheduler": {"name": "onecycle"}},
            "model.whiten_bias_schedule",
            "sets every group's lr",
        ),
    ],
)
def test_rejections_name_field_problem_and_value(overrides: dict, field: str, problem: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(None, overrides)
    rows = {row[0]: row for row in error.value.rows}
    assert field in rows and problem in rows[field][1]
    assert error.value.exit_code == 2


def test_unknown_preset() -> None:
    with pytest.raises(SettingsError, match="preset"):
        load_settings(None, {"preset": "turbo"})


def test_malformed_yaml_reports_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochs: 3\n  seed: [1, 2\nlog: {}\n")
    with pytest.raises(UsageError, match=r"line \d+"):
        load_settings(config)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    config = tmp_path / "list.yaml"
    config.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="mapping"):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_settings(tmp_path / "nope.yaml")


def test_every_preset_loads() -> None:
    assert set(available_presets()) >= {"baseline", "fast", "resnet18"}
    for name in available_presets():
        assert load_settings(None, {"preset": name}).model.name == read_preset(name)["model"]["name"]


def test_commented_recipe_in_settings_yaml_matches_the_fast_preset(tmp_path: Path) -> None:
    # Uncommenting the recipe keys of the shipped file must not change the recipe: the comments show the preset.
    lines = []
    for line in REPO_SETTINGS.read_text().splitlines():
        if re.match(r"^# (model|optim|scheduler):", line) or re.match(r"^#   \w+:", line):
            line = line[2:]
        elif re.match(r"^  # \w+:", line):
            line = "  " + line[4:]
        lines.append(line)
    uncommented = tmp_path / "settings.yaml"
    uncommented.write_text("\n".join(lines) + "\n")
    shipped, explicit = load_settings(REPO_SETTINGS), load_settings(uncommented)
    for section in ("model", "optim", "scheduler", "train"):
        assert getattr(explicit, section) == getattr(shipped, section), section


def test_every_model_has_a_recipe_that_trains_it() -> None:
    from cifar_cli.config.sections import MODEL_RECIPES
    from cifar_cli.models import available_models

    assert sorted(MODEL_RECIPES) == available_models()
    for model, preset in MODEL_RECIPES.items():
        assert read_preset(preset)["model"]["name"] == model


@pytest.mark.parametrize(
    ("overrides", "env", "yaml_text", "preset"),
    [
        ({"model": {"name": "seed-cnn"}}, {}, "", "baseline"),  # a model alone brings its recipe
        ({"model": {"name": "resnet18"}}, {}, "", "resnet18"),
        ({"model": {"name": "seed-cnn"}, "preset": "fast"}, {}, "", "fast"),  # both: exactly what they say
        ({"model": {"name": "seed-cnn"}}, {}, "preset: fast\n", "baseline"),  # the flag is above the file
        ({}, {"CIFAR_MODEL__NAME": "resnet18"}, "preset: fast\n", "resnet18"),
        ({}, {"CIFAR_PRESET": "fast-sgd", "CIFAR_MODEL__NAME": "airbench"}, "", "fast-sgd"),
        ({}, {}, "model:\n  name: seed-cnn\n", "baseline"),
        ({}, {}, "preset: resnet18\nmodel:\n  name: seed-cnn\n", "resnet18"),
        ({}, {}, "", "fast"),
    ],
)
def test_a_model_without_a_preset_trains_with_its_own_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, env: dict, yaml_text: str, preset: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    settings = load_settings(config, overrides)
    assert settings.preset == preset
    assert settings.optim.model_dump() == load_settings(None, {"preset": preset}).optim.model_dump()


def test_time_budget_and_layout_settings() -> None:
    settings = load_settings(None, parse_set_options(["train.time_budget=15m", "train.channels_last=false"]))
    assert settings.train.time_budget == 900 and settings.train.channels_last is False
    assert load_settings().train.channels_last == "auto" and load_settings().train.time_budget is None
    for bad in ("train.time_budget=0", "train.time_budget=soon", "train.channels_last=maybe"):
        with pytest.raises(SettingsError):
            load_settings(None, parse_set_options([bad]))
