"""Every option of the tool as pydantic models, and the one function that resolves them.

Precedence, highest first: command-line flags (and `--set key=value`) > environment (`CIFAR_` prefix, `__` between
levels, e.g. `CIFAR_OPTIM__LR=0.1`) > the YAML file (`--config`, default `./settings.yaml` when present) > the named
preset (`preset: fast`, a YAML file shipped in `cifar_cli/config/presets/`) > the defaults written below.
"""

from __future__ import annotations

import contextvars
import os
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cifar_cli.config.sections import (
    DataSettings,
    LogSettings,
    ModelSettings,
    OptimSettings,
    SchedulerSettings,
    TrainSettings,
    model_recipe,
)
from cifar_cli.config.set_options import deep_merge, parse_set_options, set_dotted  # noqa: F401  (part of this API)
from cifar_cli.config.yaml_files import parse_yaml, read_yaml_file
from cifar_cli.errors import SettingsError

DEFAULT_CONFIG_FILE = Path("settings.yaml")
# The recipe ladder, cheapest first: a time budget given without a preset (or a model) trains the highest rung whose
# whole schedule fits the budget on this machine (budget/ladder.py), its epochs stretched to fill the budget.
LADDER = ("fast", "balanced", "accurate")


class Settings(BaseSettings):
    """The whole configuration. Build it with `load_settings`, which applies the precedence above."""

    model_config = SettingsConfigDict(
        env_prefix="CIFAR_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    preset: str = "fast"
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings cannot take a YAML path at run time (its issue 259): the file and preset are read by
        # `load_settings` and handed over through a context variable, as the lowest-priority sources.
        return (init_settings, env_settings, _DictSource(settings_cls, _file_layers.get() or {}))

    # The ladder's rungs (preset -> settings, each with the same flags, environment and YAML on top) when the
    # budget run may climb it: set by `load_settings`, empty otherwise.
    _rungs: dict[str, Settings] = PrivateAttr(default_factory=dict)

    @property
    def rungs(self) -> dict[str, Settings]:
        return self._rungs

    @property
    def starts_from_weights(self) -> bool:
        """Whether a fresh run loads trained weights (a checkpoint's, or a torchvision model's pretrained ones)."""
        return self.train.init_from is not None or self.model.weights is not None

    def to_plain(self) -> dict[str, Any]:
        """JSON-safe nested dict (paths as strings): what checkpoints and run folders store."""
        return self.model_dump(mode="json")


def choices(section: type[BaseModel], field: str) -> list[str]:
    """The values a Literal setting allows, for help texts and error messages that follow the code."""
    annotation = section.model_fields[field].annotation
    return [str(value) for value in get_args(annotation) if isinstance(value, str)]


VAL_SIZE_AUTO = 5_000  # a tenth of CIFAR-10's training split
# Held out for the temperature alone: one parameter pinned down by its negative log-likelihood needs a few thousand
# images at most (4% of CIFAR-10's training split; each epoch then scores these, not the 10,000 test images).
CALIBRATION_IMAGES = 2_000


def monitors_validation(settings: Settings) -> bool:
    """Whether the recipe decides anything from a validation metric (plateau scheduler, early stopping)."""
    stopping = settings.train.early_stopping
    decides = settings.scheduler.name == "plateau" or stopping.patience > 0
    return decides and stopping.monitor.startswith("val_")


def fits_temperature(settings: Settings) -> bool:
    """Whether the run fits a temperature at its end (train.calibrate; auto: budget runs)."""
    calibrate = settings.train.calibrate
    return settings.train.time_budget is not None if calibrate == "auto" else bool(calibrate)


def resolve_val_size(settings: Settings, train_images: int) -> int:
    """`data.val_size` as a number of images: auto holds out a validation split where the recipe needs one, and a
    smaller calibration split where only the end-of-run temperature needs one."""
    if settings.data.val_size != "auto":
        return settings.data.val_size
    if monitors_validation(settings):
        return held_out_images(train_images)
    return min(CALIBRATION_IMAGES, train_images // 10) if fits_temperature(settings) else 0


def held_out_images(train_images: int) -> int:
    """The validation split `auto` holds out: 5,000 images, or a tenth of a smaller training split."""
    return min(VAL_SIZE_AUTO, train_images // 10)


def check_recipe(settings: Settings) -> Settings:
    """Refuse a recipe that would choose on the test split: a validation monitor with no validation split."""
    if settings.data.val_size == 0 and monitors_validation(settings):
        uses = "the plateau scheduler" if settings.scheduler.name == "plateau" else "early stopping"
        raise SettingsError(
            "This recipe needs a validation split.",
            [
                (
                    "data.val_size",
                    f"{uses} reads {settings.train.early_stopping.monitor}: 0 would read the test split",
                    "0",
                )
            ],
            hint="Leave data.val_size at auto (5,000 images) or give a number of images.",
        )
    if settings.model.whiten_bias_schedule == "decay" and settings.scheduler.name in ("plateau", "onecycle"):
        raise SettingsError(
            "The whitening bias's own schedule needs a per-step main schedule.",
            [
                (
                    "model.whiten_bias_schedule",
                    f"decay has no place beside scheduler.name {settings.scheduler.name}, which sets every group's lr",
                    "decay",
                )
            ],
            hint="Use scheduler.name linear, cosine or none, or leave model.whiten_bias_schedule at main.",
        )
    train = settings.train
    if train.freeze_epochs and not settings.starts_from_weights:
        raise SettingsError(
            "Nothing to freeze.",
            [
                (
                    "train.freeze_epochs",
                    "needs train.init_from (--init-from) or model.weights (--weights): only loaded weights are frozen",
                    str(train.freeze_epochs),
                )
            ],
        )
    return settings


_file_layers: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("_file_layers", default=None)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source backed by an already-merged dict (preset below YAML)."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


# ---------------------------------------------------------------------------------------------- loading


def available_presets() -> list[str]:
    folder = resources.files("cifar_cli.config") / "presets"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> dict[str, Any]:
    if name not in available_presets():
        raise SettingsError("Unknown preset.", [("preset", f"must be one of: {', '.join(available_presets())}", name)])
    text = (resources.files("cifar_cli.config") / "presets" / f"{name}.yaml").read_text()
    return parse_yaml(text, f"preset {name}")


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve settings from defaults, preset, YAML, environment and overrides (flags), in rising priority; with a
    budget and no preset, model or `--init-from` (its network is fixed) named, `.rungs` holds the ladder's settings.
    `config_file=None` reads `./settings.yaml` when it exists. Raises `SettingsError` (exit 2) on any problem."""
    overrides = overrides or {}
    yaml_data = read_yaml_file(config_file) if config_file else _default_yaml()
    preset_name = _choose_preset(overrides, yaml_data)
    settings = _settings_with_preset(preset_name, overrides, yaml_data)
    if preset_name is None and settings.train.time_budget is not None and settings.train.init_from is None:
        settings._rungs = {name: _settings_with_preset(name, overrides, yaml_data) for name in LADDER}
    return settings


def _settings_with_preset(preset_name: str | None, overrides: dict[str, Any], yaml_data: dict[str, Any]) -> Settings:
    """The settings with this preset under the YAML, environment and flags (None: the default preset)."""
    preset_name = preset_name or str(Settings.model_fields["preset"].default)
    token = _file_layers.set(deep_merge(read_preset(preset_name), yaml_data))
    try:
        # The preset chosen above names the recipe merged in, whichever layer or model chose it.
        return check_recipe(Settings(**{**overrides, "preset": preset_name}))
    except ValidationError as error:
        raise settings_error_from(error) from None
    finally:
        _file_layers.reset(token)


def _default_yaml() -> dict[str, Any]:
    return read_yaml_file(DEFAULT_CONFIG_FILE) if DEFAULT_CONFIG_FILE.is_file() else {}


def _choose_preset(overrides: dict[str, Any], yaml_data: dict[str, Any]) -> str | None:
    """The preset has to be known before the other layers are merged, so it is resolved on its own first.

    Layer by layer (flags, environment, YAML): a preset named there wins; else a model named there brings the
    recipe made for it (MODEL_RECIPES); else the next layer decides; else None (the default preset, or a rung of
    the ladder for a time budget).
    """
    layers = [
        (overrides.get("preset"), _model_name(overrides)),
        (os.environ.get("CIFAR_PRESET"), os.environ.get("CIFAR_MODEL__NAME")),
        (yaml_data.get("preset"), _model_name(yaml_data)),
    ]
    for preset, model in layers:
        if preset is not None:
            return str(preset)
        if model_recipe(model) is not None:
            return model_recipe(model)
    return None


def _model_name(layer: dict[str, Any]) -> str | None:
    model = layer.get("model")
    return model.get("name") if isinstance(model, dict) else None


def settings_error_from(error: ValidationError) -> SettingsError:
    rows = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown setting"
        given = problem.get("input")
        rows.append((field, message, _short_repr(given)))
    return SettingsError("Invalid settings.", rows, hint="Run `cifar config show` to see every setting.")


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dump_yaml(settings: Settings) -> str:
    return yaml.safe_dump(settings.to_plain(), sort_keys=False)
