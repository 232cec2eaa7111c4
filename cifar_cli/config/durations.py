"""Durations as people write them (`15m`) and read them (`12 min 5 s`); no torch, so settings can use it."""

from __future__ import annotations

import math
import re


def format_duration(seconds: float) -> str:
    """`45 s`, `12 min 5 s`, `1 h 30 min`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def parse_duration(text: str | float | int) -> float:
    """`90s`, `15m`, `1h`, `1h30m`, `2.5m` or a plain number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = _parse_units(text.strip().lower().replace(" ", ""))
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive duration, e.g. 90s, 15m, 1h or 1h30m")
    return value


_UNITS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "sec": 1.0}


def _parse_units(text: str) -> float:
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|sec|s)", text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError("must be a duration such as 90s, 15m, 1h or 1h30m")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)
