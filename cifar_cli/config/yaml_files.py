"""Reading YAML written by people: settings files, presets and `--set` values, with clear errors for malformed files
and a refusal of documents that expand without bound through their aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cifar_cli.errors import UsageError


def read_yaml_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"Config file not found: {path}", hint="Pass an existing file to --config.")
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise UsageError(f"Config file {path} cannot be read: {error.strerror or error}.") from None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        line = payload[: error.start].count(b"\n") + 1
        raise UsageError(
            f"Config file {path} is not UTF-8 text: byte 0x{payload[error.start]:02x} on line {line} "
            f"(byte {error.start + 1} of the file).",
            hint="Save the file as UTF-8 (most editors: 'Save with encoding'; iconv -f latin1 -t utf-8 converts).",
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = load_bounded_yaml(text, origin)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UsageError(f"Malformed YAML in {origin}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{origin} must hold a mapping of settings, not a {type(data).__name__}.")
    return data


MAX_YAML_NODES = 10_000  # a full settings file has about 150; nine levels of ten aliases expand to a billion


def load_bounded_yaml(text: str, origin: str) -> Any:
    """`yaml.safe_load`, refusing at once a document whose aliases would expand past MAX_YAML_NODES (an alias
    bomb, "billion laughs") or that refers to itself, before anything is built from it. Syntax errors raise
    yaml.YAMLError, for the caller to word."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise UsageError(
                f"{origin} expands to more than {MAX_YAML_NODES:,} values through its aliases (*name); refused.",
                hint="A settings file needs no aliases: write the values out.",
            )
        return loader.construct_document(node)
    except _SelfReference:
        raise UsageError(f"{origin}: a YAML alias refers to the node that contains it; refused.") from None
    except RecursionError:
        raise UsageError(f"{origin} is nested too deeply to be a settings file; refused.") from None
    finally:
        loader.dispose()


class _SelfReference(Exception):
    pass


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values in the document once every alias is copied out; each distinct node is counted once (memoised)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _SelfReference
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_NODES:
            break  # no need to count a billion
    open_nodes.discard(key)
    sizes[key] = total
    return total
