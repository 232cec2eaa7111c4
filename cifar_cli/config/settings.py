"""Every option of the tool as pydantic models, and the one function that resolves them.

Precedence, highest first: command-line flags (and `--set key=value`) > environment (`CIFAR_` prefix, `__` between
levels, e.g. `CIFAR_OPTIM__LR=0.1`) > the YAML file (`--config`, default `./settings.yaml` when present) > the named
preset (`preset: fast`, a YAML file shipped in `cifar_cli/config/presets/`) > the defaults written below.
"""

from __future__ import annotations

import contextvars
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cifar_cli.config.durations import parse_duration
from cifar_cli.config.set_options import deep_merge, parse_set_options, set_dotted  # noqa: F401  (part of this API)
from cifar_cli.config.yaml_files import parse_yaml, read_yaml_file
from cifar_cli.errors import SettingsError, UsageError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
# The official archive of each downloadable data set: (URL, MD5). `folder` data comes from `data.folder` instead.
OFFICIAL_ARCHIVES = {
    "cifar10": (OFFICIAL_URL, OFFICIAL_MD5),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
DEFAULT_CONFIG_FILE = Path("settings.yaml")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# The recipe made for each model: `--model X` without a preset trains X with it. tests/test_settings.py checks
# that every registered model has one and that the preset trains that model.
# The recipe ladder, cheapest first: a time budget given without a preset (or a model) trains the highest rung whose
# whole schedule fits the budget on this machine (budget/ladder.py), its epochs stretched to fill the budget.
LADDER = ("fast", "balanced", "accurate")
MODEL_RECIPES = {
    "seed-cnn": "baseline",
    "resnet18": "resnet18",
    "airbench": "fast",
    "airbench-wide": "balanced",
    "airbench-deep": "accurate",
}


class _Section(BaseModel):
    """A group of settings: unknown keys are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSettings(_Section):
    # cifar10, cifar100 (the official archives) or folder (an ImageFolder tree at `folder`, see `cifar prepare`).
    # None: whatever is prepared in processed_dir, else cifar10.
    dataset: Literal["cifar10", "cifar100", "folder"] | None = None
    label_set: Literal["fine", "coarse"] = Field("fine", description="cifar100 only: 100 fine or 20 coarse classes")
    folder: Path | None = Field(None, description="folder data only: DIR/<class>/* or DIR/{train,test}/<class>/*")
    # Or a CSV list of labelled images (columns path, label and optionally split; data/csv_list.py), with paths
    # relative to `csv_root` (default: the CSV's folder) or absolute.
    csv_file: Path | None = Field(None, description="folder data from a CSV: path,label[,split] rows")
    csv_root: Path | None = Field(None, description="csv_file: the folder its relative paths start from")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="folder data without a test/ tree: the share held out (stratified, seeded)"
    )
    # Side of the square images the models see, in pixels (folder data is resized to it; archives are 32).
    image_size: int = Field(32, ge=16, le=256)
    skip_bad_images: bool = Field(False, description="folder data: skip unreadable images (counted) instead of failing")
    raw_data_dir: Path = Path("./data_raw")
    processed_dir: Path = Path("./my_cifar_data")
    # Mirrors tried in order: http(s)://, file:// or a plain path. None: the data set's official archive.
    urls: list[str] | None = Field(None, min_length=1)
    md5: str | None = Field(None, pattern=r"^[0-9a-fA-F]{32}$", description="None: the official archive's")
    download_timeout: float = Field(30.0, gt=0, description="seconds without a byte before a retry")
    download_retries: int = Field(3, ge=0, description="extra attempts per mirror, with doubling back-off")
    # CIFAR-10's archive is 170.5 MB: a mirror that sends much more (an endless stream) is stopped and refused.
    max_archive_mb: float = Field(256.0, gt=0, description="largest archive a download may write, in MB")
    write_png: bool = True
    # Training images held out (stratified, seeded) for validation. auto: 5,000 (a tenth of smaller data) where the
    # recipe monitors a validation metric (plateau scheduler, early stopping), else none: nothing reads the test
    # split before the end of training, so nothing can be chosen on it.
    val_size: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"

    def archive_urls(self) -> list[str]:
        return self.urls or [OFFICIAL_ARCHIVES[self.archive_dataset()][0]]

    def archive_md5(self) -> str:
        return (self.md5 or OFFICIAL_ARCHIVES[self.archive_dataset()][1]).lower()

    def archive_dataset(self) -> str:
        if self.dataset is None:
            return "cifar10"
        if self.dataset == "folder":
            raise UsageError(
                "data.dataset is folder: there is no archive to download.",
                hint="Run `cifar prepare --from-folder DIR` (or choose --dataset cifar10 / cifar100).",
            )
        return self.dataset


class AugmentSettings(_Section):
    flip: bool = True
    translate: int = Field(4, ge=0, le=16, description="pixels of random crop padding (translate)")
    cutout: int = Field(0, ge=0, le=32, description="side of a zeroed square in pixels; 0 turns it off")
    # Flip each image on every other epoch (seeded start) instead of by coin toss: each epoch sees the mirror of the
    # last one, which airbench found worth about a tenth more epochs.
    alternate_flip: bool = False
    # Mixing whole batches (train/mixing.py): the alpha of each one's Beta(alpha, alpha) draw; 0 turns it off.
    mixup: float = Field(0.0, ge=0, description="mixup's alpha (pixels and labels blended); 0 turns it off")
    cutmix: float = Field(0.0, ge=0, description="cutmix's alpha (a box of another image pasted in); 0: off")
    mix_probability: float = Field(1.0, ge=0, le=1, description="share of batches mixed")
    cutmix_share: float = Field(0.5, ge=0, le=1, description="with both on: share of mixed batches cut, not blended")

    def pixel_augment(self) -> dict[str, Any]:
        """The per-image augmentations the loader applies (data/loader.py's Augment); mixing happens in the step."""
        return self.model_dump(include={"flip", "translate", "cutout", "alternate_flip"})


class ModelSettings(_Section):
    name: str = "seed-cnn"  # one of MODEL_RECIPES (every registered model; a test keeps the two in step)
    # Multiplies every width of the network; 1.0 is the published architecture.
    width_multiplier: float = Field(1.0, gt=0, le=8)
    # airbench only: epochs during which the whitening layer's bias trains; afterwards it is frozen, which also
    # spares the backward pass through the first convolution's input.
    whiten_bias_epochs: float = Field(3.0, ge=0)

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if name not in MODEL_RECIPES:
            raise ValueError(f"must be one of: {', '.join(MODEL_RECIPES)}")
        return name


class OptimSettings(_Section):
    # muon: Muon for convolution filters, SGD-Nesterov (lr, momentum, decays below) for the other parameters.
    name: Literal["adam", "adamw", "sgd", "muon"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    # Learning-rate multiplier for normalisation biases (airbench trains them much faster, without decay).
    bias_lr_scale: float = Field(1.0, gt=0)
    # Weight decay of the normalisation/bias group (kept apart so that its lr scale does not scale its decay).
    bias_weight_decay: float = Field(0.0, ge=0)
    muon_lr: float = Field(0.24, gt=0, description="muon only: step size of the convolution filters")
    muon_momentum: float = Field(0.6, ge=0, lt=1, description="muon only: momentum of the filters")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0, description="max global gradient norm; 0 turns clipping off")


class SchedulerSettings(_Section):
    name: Literal["plateau", "cosine", "onecycle", "linear", "none"] = "plateau"
    factor: float = Field(0.1, gt=0, lt=1, description="plateau: lr multiplier on a plateau")
    patience: int = Field(2, ge=0, description="plateau: epochs without improvement before reducing")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from warmup_start_factor * lr")
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    final_lr_factor: float = Field(0.0, ge=0, le=1, description="cosine/linear: lr at the end, as a fraction")


MonitoredMetric = Literal[
    "val_accuracy", "val_loss", "val_f1", "val_precision", "val_recall", "train_accuracy", "train_loss", "train_f1"
]


class EmaSettings(_Section):
    """An exponential moving average of the weights (train/ema.py): give `decay` or `half_life_steps` to turn it on."""

    decay: float | None = Field(None, gt=0, lt=1, description="average <- decay x average + (1 - decay) x weights")
    half_life_steps: float | None = Field(None, gt=0, description="or: optimiser steps after which a step counts half")
    start_epoch: float = Field(0.0, ge=0, description="epochs of training before the average starts")

    @model_validator(mode="after")
    def _one_way_to_say_it(self) -> EmaSettings:
        if self.decay is not None and self.half_life_steps is not None:
            raise ValueError("give decay or half_life_steps, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.decay is not None or self.half_life_steps is not None

    def effective_decay(self) -> float:
        if self.half_life_steps is not None:
            return 0.5 ** (1.0 / self.half_life_steps)
        return float(self.decay or 0.0)


class EarlyStoppingSettings(_Section):
    # Also the metric that picks best.pth and drives the plateau scheduler.
    monitor: MonitoredMetric = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    patience: int = Field(0, ge=0, description="epochs without improvement before stopping; 0 turns it off")


class TrainSettings(_Section):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="forward/backward in chunks of this many images, one optimiser step per batch (train/step.py)",
    )
    eval_batch_size: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    # auto: on a CPU, the faster of fp32 and bf16 for this model, measured on this machine (budget/probe.py);
    # on a GPU, bf16 where supported, else fp16.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto"] | bool = Field("auto", description="auto: measured on a CPU, on for GPUs")
    # Seconds of wall clock for the whole run (training and final evaluation); YAML and flags take 90s, 15m, 1h.
    # Set, it picks the epochs (and, where one epoch does not fit, a narrower width) from measured speeds.
    time_budget: float | None = None
    compile: bool = False
    deterministic: bool = False
    tta: bool = True
    lookahead: bool = Field(False, description="airbench's lookahead weight averaging (train/lookahead.py)")
    run_name: str | None = None
    resume: bool | None = Field(None, description="None: resume when last.pth of the run exists")
    # Threads for CPU training; 0 lets torch choose (one per core).
    num_threads: int = Field(0, ge=0)
    keep_freed_memory: bool = Field(
        True, description="CPU runs on Linux: malloc reuses freed memory instead of unmapping it (runtime/memory.py)"
    )
    # Fine-tuning (train/finetune.py): the weights of a trained checkpoint to start from (a new head where its
    # classes differ from the data's), and the first epochs that train only the head.
    init_from: Path | None = None
    freeze_epochs: int = Field(0, ge=0, description="with init_from: epochs that train the head only")
    # Imbalanced classes: weights in the loss (auto: inverse class frequency), or batches that draw every class
    # equally often (with replacement).
    class_weights: Literal["none", "auto"] = "none"
    balanced_sampler: bool = False
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    ema: EmaSettings = Field(default_factory=EmaSettings)
    early_stopping: EarlyStoppingSettings = Field(default_factory=EarlyStoppingSettings)

    def tta_level(self, enabled: bool | None = None) -> int:
        """0 without TTA (`enabled` overrides `tta`); flips (1); flips and one-pixel shifts (2) for models trained
        with translation."""
        if not (self.tta if enabled is None else enabled):
            return 0
        return 2 if self.augment.translate else 1

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' and '-' only")
        return value


class LogSettings(_Section):
    checkpoint_dir: Path = Path("./checkpoints")
    log_dir: Path = Path("./runs")
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain", "none"] = "auto"


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

    def to_plain(self) -> dict[str, Any]:
        """JSON-safe nested dict (paths as strings): what checkpoints and run folders store."""
        return self.model_dump(mode="json")


def choices(section: type[BaseModel], field: str) -> list[str]:
    """The values a Literal setting allows, for help texts and error messages that follow the code."""
    annotation = section.model_fields[field].annotation
    return [str(value) for value in get_args(annotation) if isinstance(value, str)]


VAL_SIZE_AUTO = 5_000  # a tenth of CIFAR-10's training split


def monitors_validation(settings: Settings) -> bool:
    """Whether the recipe decides anything from a validation metric (plateau scheduler, early stopping)."""
    stopping = settings.train.early_stopping
    decides = settings.scheduler.name == "plateau" or stopping.patience > 0
    return decides and stopping.monitor.startswith("val_")


def resolve_val_size(settings: Settings, train_images: int) -> int:
    """`data.val_size` as a number of images: auto holds out a validation split only where the recipe needs one."""
    if settings.data.val_size != "auto":
        return settings.data.val_size
    return held_out_images(train_images) if monitors_validation(settings) else 0


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
    train = settings.train
    if train.freeze_epochs and train.init_from is None:
        raise SettingsError(
            "Nothing to freeze.",
            [
                (
                    "train.freeze_epochs",
                    "needs train.init_from (--init-from): only loaded weights are frozen",
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
        if model in MODEL_RECIPES:
            return MODEL_RECIPES[model]
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
