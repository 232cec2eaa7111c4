"""The sections of the settings (data, model, optim, scheduler, train, log) as pydantic models, with their
defaults and bounds; `config/settings.py` puts them together and resolves their layers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cifar_cli.config.durations import parse_duration
from cifar_cli.errors import UsageError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
# The official archive of each downloadable data set: (URL, MD5). `folder` data comes from `data.folder` instead.
OFFICIAL_ARCHIVES = {
    "cifar10": (OFFICIAL_URL, OFFICIAL_MD5),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# The recipe made for each model: `--model X` without a preset trains X with it. tests/test_settings.py checks
# that every registered model has one and that the preset trains that model.
MODEL_RECIPES = {
    "seed-cnn": "baseline",
    "resnet18": "resnet18",
    "airbench": "fast",
    "airbench-wide": "balanced",
    "airbench-deep": "accurate",
}
# torchvision's classifiers (`--model torchvision:NAME`) train with this recipe unless a preset is named; a time
# budget never climbs the ladder into or out of them.
TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_RECIPE = "baseline"


def model_recipe(model: str | None) -> str | None:
    """The preset made for `model` (None: none is)."""
    if model is not None and model.startswith(TORCHVISION_PREFIX):
        return TORCHVISION_RECIPE
    return MODEL_RECIPES.get(model) if model is not None else None


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
    # Or parquet files as the Hugging Face Hub keeps data sets (data/parquet.py): a folder or one file.
    parquet: Path | None = Field(None, description="folder data from parquet files (the Hub's layout)")
    image_column: str | None = Field(None, description="parquet: the image column (default: img or image)")
    label_column: str | None = Field(None, description="parquet: the label column (default: label)")
    split_column: str | None = Field(None, description="parquet: a column of train/test (default: file names)")
    parquet_validation: Literal["train", "test", "skip"] = Field(
        "train", description="parquet: what validation-* files join"
    )
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
    # Quick experiments and learning curves: train on this many of the training images (stratified, seeded by
    # train.seed, drawn after the validation split, so the validation images stay the same).
    train_subset: int | None = Field(None, ge=1, description="train on this many training images; None: all")

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


# AugmentSettings fields that make no view of an image vary by themselves (how flips and mixing are done).
FIXED_VIEW_FIELDS = frozenset({"flip", "alternate_flip", "mix_probability", "cutmix_share"})


class AugmentSettings(_Section):
    flip: bool = True
    translate: int = Field(4, ge=0, le=16, description="pixels of random crop padding (translate)")
    cutout: int = Field(0, ge=0, le=32, description="side of a zeroed square in pixels; 0 turns it off")
    # Flip each image on every other epoch (seeded start) instead of by coin toss: each epoch sees the mirror of the
    # last one, which airbench found worth about a tenth more epochs.
    alternate_flip: bool = False
    # Mixing whole batches (recipe/mixing.py): the alpha of each one's Beta(alpha, alpha) draw; 0 turns it off.
    mixup: float = Field(0.0, ge=0, description="mixup's alpha (pixels and labels blended); 0 turns it off")
    cutmix: float = Field(0.0, ge=0, description="cutmix's alpha (a box of another image pasted in); 0: off")
    mix_probability: float = Field(1.0, ge=0, le=1, description="share of batches mixed")
    cutmix_share: float = Field(0.5, ge=0, le=1, description="with both on: share of mixed batches cut, not blended")
    # Colour jitter per image on the normalised images (hiverge's record: 0.14 and 0.13); 0 turns each off.
    brightness: float = Field(0.0, ge=0, le=1, description="shift by up to +- this many standard deviations")
    contrast: float = Field(0.0, ge=0, lt=1, description="scale by 1 +- up to this")

    def fixed_views(self) -> bool:
        """Whether each image reaches the network in one of at most two fixed ways (as it is, or mirrored): every
        field that is on, but those that only say how flips and mixing are done, makes views vary (a new
        augmentation does too, without being listed here)."""
        return not any(getattr(self, name) for name in type(self).model_fields if name not in FIXED_VIEW_FIELDS)

    def pixel_augment(self) -> dict[str, Any]:
        """The per-image augmentations the loader applies (data/loader.py's Augment); mixing happens in the step."""
        return self.model_dump(include={"flip", "translate", "cutout", "alternate_flip", "brightness", "contrast"})


class ModelSettings(_Section):
    name: str = "seed-cnn"  # one of MODEL_RECIPES (every registered model; a test keeps the two in step)
    # Multiplies every width of the network; 1.0 is the published architecture.
    width_multiplier: float = Field(1.0, gt=0, le=8)
    # Under a time budget on a CPU only: the width the plan starts from instead (a narrower network trains more
    # epochs in the same minutes; where it was measured to pay). None: width_multiplier everywhere.
    cpu_budget_width: float | None = Field(None, gt=0, le=8)
    # ... only where width_multiplier would train fewer than this many epochs (small ones included) in the budget:
    # with more, the full width pays again. None: the narrower width under every CPU budget.
    cpu_budget_width_below_epochs: int | None = Field(None, ge=1)
    # airbench only: epochs during which the whitening layer's bias trains; afterwards it is frozen, which also
    # spares the backward pass through the first convolution's input.
    whiten_bias_epochs: float = Field(3.0, ge=0)
    # airbench only: the whitening bias's step size during those epochs. "main": the schedule every bias follows;
    # "decay": its own, falling linearly from the biases' lr to 0 at the end of whiten_bias_epochs (the records').
    whiten_bias_schedule: Literal["main", "decay"] = "main"
    # airbench models only: the activation inside the conv groups; None keeps the model's own (GELU).
    activation: Literal["gelu", "silu"] | None = None
    # Under a time budget on a CPU only: the activation instead (where it was measured to pay). None: `activation`.
    cpu_budget_activation: Literal["gelu", "silu"] | None = None
    # torchvision:NAME models only: start from pretrained weights: "default", a named set (IMAGENET1K_V1) or a
    # state dict file (models/pretrained.py). None: random weights.
    weights: str | None = Field(None, description="torchvision models: default, a weights name, or a file")

    @property
    def is_torchvision(self) -> bool:
        return self.name.startswith(TORCHVISION_PREFIX)

    def width_for(self, device_type: str, budgeted: bool) -> float:
        """The width a run on `device_type` (with a time budget or not) plans from (torchvision's models: their
        published width, always)."""
        if self.cpu_budget_width is not None and device_type == "cpu" and budgeted and not self.is_torchvision:
            return self.cpu_budget_width
        return self.width_multiplier

    def activation_for(self, device_type: str, budgeted: bool) -> str | None:
        """The activation a run on `device_type` (with a time budget or not) trains with."""
        if self.cpu_budget_activation is not None and device_type == "cpu" and budgeted and not self.is_torchvision:
            return self.cpu_budget_activation
        return self.activation

    def wider_budget_width(self, device_type: str) -> tuple[float, int] | None:
        """(width_multiplier, epochs): the plan a CPU budget run tries before cpu_budget_width, kept where it
        trains at least that many epochs; None where the narrower width is planned straight away."""
        narrower = self.width_for(device_type, budgeted=True)
        if self.cpu_budget_width_below_epochs is None or narrower == self.width_multiplier:
            return None
        return self.width_multiplier, self.cpu_budget_width_below_epochs

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        # torchvision:NAME is checked against torchvision's list where the model is built (models/pretrained.py).
        if name not in MODEL_RECIPES and not (
            name.startswith(TORCHVISION_PREFIX) and len(name) > len(TORCHVISION_PREFIX)
        ):
            raise ValueError(f"must be one of: {', '.join(MODEL_RECIPES)}, or torchvision:NAME")
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


class LowResSettings(_Section):
    """Fewer pixels early: the first `epochs` epochs train on images resized to `size` x `size` (bilinear, with
    anti-aliasing), the rest at full size; the network pools globally, so it takes either."""

    size: int | None = Field(None, ge=8, description="side in pixels of the early epochs' images; None: off")
    epochs: int = Field(0, ge=0, description="epochs trained at that size before full size")
    # Where it applies: every run, or only time-budget runs on a CPU (where it was measured to pay; a fixed number
    # of epochs and GPUs then train full size throughout).
    scope: Literal["always", "cpu_budget"] = "always"

    def applies(self, device_type: str, budgeted: bool) -> bool:
        """Whether a run on `device_type` (with a time budget or not) trains its first epochs small."""
        wanted = self.scope == "always" or (device_type == "cpu" and budgeted)
        return self.size is not None and self.epochs > 0 and wanted


class EmaSettings(_Section):
    """An exponential moving average of the weights (recipe/ema.py): give `decay` or `half_life_steps` to turn it on."""

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


class DistillSettings(_Section):
    """Knowledge distillation (recipe/distill.py): a trained teacher's logits blended into the loss."""

    teacher: Path | None = Field(None, description="a checkpoint or an export (.pt2, .onnx) of the same classes")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the teacher's term; 0: the labels alone")
    temperature: float = Field(4.0, gt=0, description="softens both sides' logits before they are compared")


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
    # Selective TTA when scoring a split: a plain pass over every image, then every view only for this share of
    # them, the least sure; 1.0: every image. predict and exports always augment every image.
    tta_share: float = Field(
        1.0, gt=0, le=1, description="share of images scored with every TTA view (least sure first)"
    )
    # Temperature scaling fitted at the end of training on the validation split (predict/temperature.py), so that
    # predict's and an export's probabilities are calibrated. auto: on for time-budget runs (`make run`), which then
    # hold out a calibration split of 2,000 images where their recipe holds out nothing.
    calibrate: Literal["auto"] | bool = Field("auto", description="fit a temperature at the end (auto: budget runs)")
    lookahead: bool = Field(False, description="airbench's lookahead weight averaging (recipe/lookahead.py)")
    run_name: str | None = None
    resume: bool | None = Field(None, description="None: resume when last.pth of the run exists")
    # The signal a SLURM job asks to be warned with before its time limit (`#SBATCH --signal=USR1@90`): a run
    # stopped by it inside a SLURM job saves and requeues the job (runtime/stopping.py). none: saves only.
    requeue_signal: Literal["SIGUSR1", "SIGUSR2", "none"] = Field(
        "SIGUSR1", description="under SLURM: the warning signal that saves and requeues the job"
    )
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
    low_res: LowResSettings = Field(default_factory=LowResSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)
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
