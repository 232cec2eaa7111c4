"""What the values of `cifar sweep --set key=...` mean: a list (`v1,v2,v3`), `range(a,b[,step])` with b excluded, or
`log(a,b,n)`; shared by the local grid (`sweep/grid.py`) and shared studies (`sweep/space.py`)."""

from __future__ import annotations

import itertools
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from cifar_cli.config.yaml_files import load_bounded_yaml
from cifar_cli.errors import SettingsError

RANGE = re.compile(r"^range\(\s*([^,]+),\s*([^,]+)(?:,\s*([^,]+))?\s*\)$")
LOG = re.compile(r"^log\(\s*([^,]+),\s*([^,]+),\s*(\d+)\s*\)$")


def parse_axis(assignment: str) -> tuple[str, list[Any]]:
    """`key=v1,v2,v3` (Hydra's comma syntax, each value a YAML scalar), `key=range(a,b[,step])` (b excluded) or
    `key=log(a,b,n)` (n values spaced evenly on a log scale from a to b)."""
    key, sep, text = assignment.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or not text:
        raise SettingsError("Bad --set option.", [("--set", "expected dotted.key=v1,v2,...", assignment)])
    if match := RANGE.match(text):
        return key, range_values(key, text, match.group(1), match.group(2), match.group(3) or "1")
    if match := LOG.match(text):
        low, high, count = (float(_decimal(match.group(1))), float(_decimal(match.group(2))), int(match.group(3)))
        if low <= 0 or high <= 0 or count < 2:
            raise SettingsError("Bad log range.", [(key, "log(a, b, n) needs a, b > 0 and n >= 2", text)])
        ratio = (high / low) ** (1 / (count - 1))
        return key, [float(f"{low * ratio**i:.6g}") for i in range(count)]
    return key, [_scalar(value.strip(), key) for value in text.split(",")]


def _scalar(text: str, key: str) -> Any:
    """A YAML scalar, where `1e-9` (a string to YAML 1.1, which wants `1.0e-9`) is the number a user meant."""
    value = load_bounded_yaml(text, f"--set {key}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def range_values(key: str, text: str, *parts: str) -> list[int | float]:
    """a, a + step, ... up to and excluding b, in decimal arithmetic on the numbers as written, so that
    `range(0.7,1.0,0.1)` is 0.7, 0.8, 0.9 (not 0.7999999999999999, ..., 1.0): each value as precise as the user's."""
    start, stop, step = (_decimal(part) for part in parts)
    if step == 0 or (stop - start) / step <= 0:
        raise SettingsError("Bad range.", [(key, "range(a, b, step) must reach from a towards b", text)])
    count = math.ceil((stop - start) / step)
    values = [start + index * step for index in range(count)]
    whole = all(part.strip().lstrip("+-").isdigit() for part in parts)
    return [int(value) if whole else float(value) for value in values]


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise SettingsError("Bad range.", [("range", "bounds and steps must be numbers", text)]) from None
    if not value.is_finite():
        raise SettingsError("Bad range.", [("range", "bounds and steps must be finite numbers", text)])
    return value


def exact_step(first: int | float, second: int | float) -> int | float:
    """second - first without binary noise (0.8 - 0.7 is 0.1, not 0.10000000000000009)."""
    step = Decimal(str(second)) - Decimal(str(first))
    return int(step) if isinstance(first, int) and isinstance(second, int) else float(step)


def cartesian(axes: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, as {key: value} dicts, in grid order (the last axis varies fastest)."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in axes))]
