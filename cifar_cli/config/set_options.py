"""`--set dotted.key=value` options into nested dicts, and the merge of one settings layer over another."""

from __future__ import annotations

from typing import Any

import yaml

from cifar_cli.config.yaml_files import load_bounded_yaml
from cifar_cli.errors import SettingsError


def parse_set_options(assignments: list[str]) -> dict[str, Any]:
    """Turn `["optim.lr=0.1", "train.augment.flip=false"]` into a nested dict; values are read as YAML scalars."""
    nested: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw_value = assignment.partition("=")
        if not sep or not key.strip():
            raise SettingsError("Bad --set option.", [("--set", "expected dotted.key=value", assignment)])
        try:
            value = load_bounded_yaml(raw_value, f"--set {key.strip()}") if raw_value.strip() else ""
        except yaml.YAMLError:
            value = raw_value
        set_dotted(nested, key.strip(), value)
    return nested


def set_dotted(target: dict[str, Any], dotted_key: str, value: Any) -> None:
    *parents, leaf = dotted_key.split(".")
    for part in parents:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError("Conflicting settings.", [(dotted_key, "parent is not a section", str(child))])
        target = child
    target[leaf] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
