"""Measure how fast a model trains on this machine in each precision and memory layout, and remember the answer.

Why measure instead of a rule: CPUs differ (bf16 is 2-3x faster than fp32 with AMX and 14-16x slower on an AVX2-only
CPU; docs/performance.md, "Measurements behind the code"). `precision: auto` and `channels_last: auto` time a few
real steps of the actual model in each candidate on small steps (`PROBE_IMAGES`), keep the fastest, then time it on
steps of the run's own batch size (up to `BATCH_STEP_CAP`: per-image speed grows with the batch). The answer is cached
per machine, torch version, threads, model, width, optimiser and batch size in the user's cache folder, and drives
the run's time estimate (budget/plan.py): a step takes about `batch / batch_images_per_second + optimizer_seconds`.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifar_cli.config.sections import ModelSettings, OptimSettings
from cifar_cli.files import write_text_atomically
from cifar_cli.models import build_model_for_measuring
from cifar_cli.recipe.optim import build_optimizer
from cifar_cli.runtime.device import Precision, describe_device, resolve_precision, synchronise

CACHE_VERSION = 2  # 2: speeds at the run's batch size
CACHE_FILE = "calibration.json"
SCREEN_IMAGES = 8  # a first, tiny step per candidate: enough to spot a 10x slower one cheaply
PROBE_IMAGES = 64  # images per timed step when comparing candidates
BATCH_STEP_CAP = 1024  # the chosen candidate's steps at the run's batch size, at most this many images
PROBE_SECONDS = 0.4  # each surviving candidate is timed for at least this long (seconds), at least 2 steps
EVAL_PASSES = 3  # timed forward passes in eval mode
SLOW_FACTOR = 3.0  # a candidate whose screening step is this much slower than the best one's is not timed further
CALIBRATION_LR = 0.01  # the preset's optimiser at a small lr: a random start at full lr may diverge into NaNs


@dataclass(frozen=True)
class Layout:
    """One candidate: the autocast precision and the memory format of activations."""

    precision: str  # fp32, bf16 or fp16
    channels_last: bool

    @property
    def label(self) -> str:
        return self.precision + (" + channels_last" if self.channels_last else "")


@dataclass
class Calibration:
    """What was measured; `precision` and `channels_last` are the fastest candidate's."""

    precision: str
    channels_last: bool
    train_images_per_second: dict[str, float]  # candidate label -> forward + backward images/s, small steps
    eval_images_per_second: float  # forward only, eval mode, the chosen candidate
    optimizer_seconds: float  # one optimiser step, independent of the batch size
    measured_seconds: float  # wall clock the measurement took
    # Forward + backward images/s of the chosen candidate on steps of the run's batch size (up to BATCH_STEP_CAP);
    # None: estimates use the small steps' speed.
    batch_images_per_second: float | None = None
    batch_step_images: int = 0  # the size of those steps
    key: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # True when read from the cache instead of measured now
    # What real epochs of earlier runs with this key measured (learn_from_epoch): a running estimate that, once
    # present, the plan uses instead of the probe's. Seconds per training step at the key's batch size, and
    # images/s of the per-epoch evaluation.
    learned_step_seconds: float | None = None
    learned_eval_images_per_second: float | None = None
    learned_epochs: int = 0
    # Distillation: the teacher's forward pass per training image, added to every step (recipe/distill.py).
    teacher_seconds_per_image: float = 0.0
    # train.low_res: image side in pixels -> a step on images that small as a share of a full-size step's seconds
    # (measure_low_res_share).
    low_res_shares: dict[str, float] = field(default_factory=dict)

    @property
    def layout(self) -> Layout:
        return Layout(self.precision, self.channels_last)

    @property
    def images_per_second(self) -> float:
        return self.train_images_per_second[self.layout.label]

    def step_seconds(self, batch_size: int) -> float:
        """Estimated seconds of one training step (forward, backward, optimiser) at `batch_size`: what real epochs
        measured where earlier runs have taught it, else the probe's estimate."""
        teacher = batch_size * self.teacher_seconds_per_image
        if self.learned_step_seconds and batch_size == self.key.get("batch_size"):
            return self.learned_step_seconds + teacher
        return batch_size / (self.batch_images_per_second or self.images_per_second) + self.optimizer_seconds + teacher

    def low_res_share(self, side: int) -> float:
        return self.low_res_shares[str(side)]

    def describe_low_res(self, side: int) -> str:
        share = self.low_res_share(side)
        return (
            f"A step on {side} x {side} images takes {share:.2f} of a full-size step's time ({1 / share:.1f}x faster)"
        )

    @property
    def eval_speed(self) -> float:
        """Images/s of an evaluation pass: learned from real epochs where there are some, else the probe's."""
        return self.learned_eval_images_per_second or self.eval_images_per_second

    def summary(self, requested: str = "auto") -> str:
        """E.g. `precision auto -> fp32 + channels_last: 130 img/s; bf16 + channels_last: 8 img/s`."""
        speeds = sorted(self.train_images_per_second.items(), key=lambda item: -item[1])
        listed = "; ".join(f"{label}: {rate:,.0f} img/s" for label, rate in speeds)
        source = " (cached)" if self.cached else f" (measured in {self.measured_seconds:.1f} s)"
        batch = (
            f"; {self.batch_images_per_second:,.0f} img/s on steps of {self.batch_step_images}"
            if self.batch_images_per_second
            else ""
        )
        learned = (
            f"; real epochs of earlier runs ({self.learned_epochs}): {self.learned_step_seconds:.3g} s per step"
            if self.learned_epochs and self.learned_step_seconds
            else ""
        )
        return f"precision {requested} -> {self.layout.label}. Train step speeds: {listed}{batch}{source}{learned}"


def candidates(precision: str, channels_last: bool | str, device: torch.device) -> list[Layout]:
    """What `auto` may choose from, fp32 first (the reference that is never pathologically slow).

    GPUs keep the rule (bf16 where supported, else fp16; channels_last on): their mixed precision is never slower.
    """
    if device.type != "cpu" and precision == "auto":
        precision = resolve_precision("auto", device).name
    precisions = ["fp32", "bf16"] if precision == "auto" else [precision]
    if channels_last == "auto":
        layouts = [True] if device.type != "cpu" else [True, False]
    else:
        layouts = [bool(channels_last)]
    return [Layout(p, cl) for p in precisions for cl in layouts]


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cifar`, else `~/.cache/cifar`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cifar"


def machine_identity(device: torch.device) -> dict[str, Any]:
    """What makes speeds on one machine differ from another's."""
    return {
        "device": describe_device(device),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # Set by hand to mimic another CPU kind (../DESIGN.md): then kernels dispatch differently.
        "isa_caps": [os.environ.get("ONEDNN_MAX_CPU_ISA"), os.environ.get("ATEN_CPU_CAPABILITY")],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_speed(
    model: ModelSettings,
    optim: OptimSettings,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | str = "auto",
    use_cache: bool = True,
) -> Calibration:
    """The fastest of `candidates(...)` for this model on this machine, from the cache when it has the answer."""
    layouts = candidates(precision, channels_last, device)
    key = {
        "version": CACHE_VERSION,
        **machine_identity(device),
        "model": model.name,
        "width": model.width_multiplier,
        **({"activation": model.activation} if model.activation else {}),  # unset: the keys cached before it
        "optimizer": optim.name,
        "batch_size": batch_size,
        "candidates": [layout.label for layout in layouts],
    }
    key_text = json.dumps(key, sort_keys=True)
    cache = _read_cache() if use_cache else {}
    if key_text in cache:
        try:
            cached = Calibration(**{**cache[key_text], "key": key, "cached": True})
            if cached.layout.label in cached.train_images_per_second:
                return cached
        except (TypeError, AttributeError):
            pass  # written by another version, or damaged: measure again
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = _measure(model, optim, device, layouts, min(batch_size, BATCH_STEP_CAP))
    result.key = key
    if use_cache:
        _write_cache(key_text, result)
    return result


LOW_RES_PROBE_IMAGES = 512  # images per step when timing smaller images against full-size ones
LOW_RES_ROUNDS = 2  # timed rounds of (full-size step, small step) after a warm-up step of each; best of each kept


def measure_low_res_share(
    calibration: Calibration, model: ModelSettings, optim: OptimSettings, batch_size: int, device: torch.device,
    side: int, use_cache: bool = True,
) -> Calibration:  # fmt: skip
    """`calibration` with the seconds of a training step on `side` x `side` images as a share of a full-size
    step's, in its chosen layout: measured side by side (full, small, full, small: a burst of load hits both
    alike) on steps of the run's batch (up to LOW_RES_PROBE_IMAGES), optimiser step included; cached with it."""
    if str(side) in calibration.low_res_shares:
        return calibration
    images = min(batch_size, LOW_RES_PROBE_IMAGES)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probes = [_Probe(model, optim, device, calibration.layout, images, size) for size in (32, side)]
        best = [float("inf"), float("inf")]
        for probe in probes:  # a warm-up step each: kernels chosen, memory allocated
            probe.step(images, optimizer_step=True)
        for _ in range(LOW_RES_ROUNDS):
            for index, probe in enumerate(probes):
                best[index] = min(best[index], sum(probe.step(images, optimizer_step=True)))
    shares = {**calibration.low_res_shares, str(side): best[1] / best[0]}
    result = replace(calibration, low_res_shares=shares)
    if use_cache and calibration.key:
        key_text = json.dumps(calibration.key, sort_keys=True)
        cache = _read_cache()
        if key_text in cache:
            _write_entries({**cache, key_text: {**cache[key_text], "low_res_shares": shares}})
    return result


LEARN_WEIGHT = 0.5  # of the newest epoch in the running estimate: a shared machine drifts, recent epochs say most
REPLACE_FACTOR = 2.0  # an estimate this far from a real epoch (either way) is replaced, not averaged


def learn_from_epoch(calibration: Calibration, step_seconds: float, eval_images_per_second: float) -> None:
    """Fold one real epoch's speed into the cached entry of `calibration`'s key, so that the next run's plan starts
    from what real epochs measured; an estimate far from it (a probe taken while the machine was busy) is
    replaced. Best effort, like the cache itself."""
    if not calibration.key or step_seconds <= 0 or eval_images_per_second <= 0:
        return
    key_text = json.dumps(calibration.key, sort_keys=True)
    cache = _read_cache()
    entry = cache.get(key_text) or {k: v for k, v in asdict(calibration).items() if k not in ("key", "cached")}
    for name, value in (
        ("learned_step_seconds", step_seconds),
        ("learned_eval_images_per_second", eval_images_per_second),
    ):
        entry[name] = _running(entry.get(name), value)
    entry["learned_epochs"] = int(entry.get("learned_epochs") or 0) + 1
    _write_entries({**cache, key_text: entry})


def _running(old: float | None, new: float) -> float:
    if not old or not 1 / REPLACE_FACTOR <= new / old <= REPLACE_FACTOR:
        return new
    return (1 - LEARN_WEIGHT) * old + LEARN_WEIGHT * new


def forget_calibrations() -> int:
    """Remove every cached calibration (`cifar bench --recalibrate`); returns how many there were."""
    count = len(_read_cache())
    (cache_dir() / CACHE_FILE).unlink(missing_ok=True)
    return count


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: measure again
    return data if isinstance(data, dict) else {}


def _write_cache(key_text: str, result: Calibration) -> None:
    entry = {k: v for k, v in asdict(result).items() if k not in ("key", "cached")}
    _write_entries({**_read_cache(), key_text: entry})


def _write_entries(entries: dict[str, Any]) -> None:
    """Best effort: a read-only home costs a re-measurement next time, never a failed run."""
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / CACHE_FILE, json.dumps(entries, indent=1))
    except OSError:
        pass


class _Probe:
    """A fresh model, its optimiser and a synthetic batch in one layout; times forward+backward and the step."""

    def __init__(
        self,
        model: ModelSettings,
        optim: OptimSettings,
        device: torch.device,
        layout: Layout,
        images: int = PROBE_IMAGES,
        side: int = 32,
    ) -> None:
        self.device, self.layout = device, layout
        self.precision: Precision = resolve_precision(layout.precision, device)
        memory_format = torch.channels_last if layout.channels_last else torch.contiguous_format
        network = build_model_for_measuring(model.name, model.width_multiplier, activation=model.activation)
        self.model = network.to(device, memory_format=memory_format).train()
        dtype = self.precision.autocast_dtype or torch.float32
        self.optimizer = build_optimizer(self.model, optim.model_copy(update={"lr": CALIBRATION_LR}), dtype)
        self.images = torch.randn(images, 3, side, side, device=device).to(dtype)
        self.images = self.images.contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, 10, (images,), device=device)

    def step(self, images: int, optimizer_step: bool = False) -> tuple[float, float]:
        """Seconds of forward + backward on `images` images, and of the optimiser step after it (0 without one:
        its cost does not depend on the batch, and Muon's in emulated bf16 alone took 1.6 s on an AVX2 CPU)."""
        self.optimizer.zero_grad(set_to_none=True)
        synchronise(self.device)
        started = time.perf_counter()
        with self.precision.autocast(self.device):
            logits = self.model(self.images[:images])
        nn.functional.cross_entropy(logits.float(), self.labels[:images]).backward()
        synchronise(self.device)
        computed = time.perf_counter()
        if not optimizer_step:
            return computed - started, 0.0
        self.optimizer.step()
        synchronise(self.device)
        return computed - started, time.perf_counter() - computed

    @torch.no_grad()
    def eval_images_per_second(self) -> float:
        """Forward passes in eval mode over all of the probe's images (the first untimed)."""
        self.model.eval()
        with self.precision.autocast(self.device):
            self.model(self.images)
        synchronise(self.device)
        started = time.perf_counter()
        for _ in range(EVAL_PASSES):
            with self.precision.autocast(self.device):
                self.model(self.images)
        synchronise(self.device)
        return EVAL_PASSES * len(self.images) / (time.perf_counter() - started)


def _measure(
    model: ModelSettings, optim: OptimSettings, device: torch.device, layouts: list[Layout], batch_images: int
) -> Calibration:
    started = time.perf_counter()
    rates: dict[str, float] = {}
    timed: list[Layout] = []  # the candidates that passed the screening step
    probes: dict[str, _Probe] = {}
    best_screen = float("inf")
    for layout in layouts:
        probe = _Probe(model, optim, device, layout)
        probe.step(SCREEN_IMAGES)  # warm-up: kernels chosen, memory allocated
        screen, _ = probe.step(SCREEN_IMAGES)
        if screen > SLOW_FACTOR * best_screen:
            rates[layout.label] = SCREEN_IMAGES / screen  # clearly slower: not worth timing further
            continue
        best_screen = min(best_screen, screen)
        rates[layout.label] = _timed_rate(probe)
        probes[layout.label] = probe
        timed.append(layout)
    # A second round in reverse order, each candidate's best round kept: a burst of load from another process
    # during one candidate's round (a shared machine) no longer decides the choice.
    for layout in reversed(timed) if len(timed) > 1 else []:
        rates[layout.label] = max(rates[layout.label], _timed_rate(probes[layout.label], warm=True))
    chosen = max(timed, key=lambda layout: rates[layout.label])
    probe = _Probe(model, optim, device, chosen, batch_images)
    probe.step(batch_images, optimizer_step=True)  # warm-up at this size: memory, kernels
    compute, optimizer_seconds = probe.step(batch_images, optimizer_step=True)
    return Calibration(
        precision=chosen.precision,
        channels_last=chosen.channels_last,
        train_images_per_second=rates,
        eval_images_per_second=probe.eval_images_per_second(),
        optimizer_seconds=optimizer_seconds,
        measured_seconds=time.perf_counter() - started,
        batch_images_per_second=batch_images / compute,
        batch_step_images=batch_images,
    )


def _timed_rate(probe: _Probe, warm: bool = False) -> float:
    """Forward + backward images/s over at least 2 steps and `PROBE_SECONDS` (first full-size step untimed unless
    the probe is `warm`)."""
    if not warm:
        probe.step(PROBE_IMAGES)
    compute, steps = 0.0, 0
    while steps < 2 or compute < PROBE_SECONDS:
        compute += probe.step(PROBE_IMAGES)[0]
        steps += 1
    return steps * PROBE_IMAGES / compute
