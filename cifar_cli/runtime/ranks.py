"""Keeping the processes of a distributed run in agreement, across nodes that share no disk.

Rank 0 decides whether and from where a run resumes and sends the checkpoint itself to the others, so a node
without `last.pth` resumes all the same. A step that can fail on one node (its data missing) runs on every rank and
its failures are exchanged, so that every rank stops at once with the same message instead of one dying and the
others waiting in their next collective forever.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from cifar_cli.errors import CifarError, UsageError

T = TypeVar("T")


class RanksDisagree(UsageError):
    """One or more ranks failed a step, or see something other than rank 0 does."""


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def decided_by_main(decide: Callable[[], T]) -> T:
    """`decide()` on rank 0, its result (or its error, raised again) on every rank; other ranks never run it."""
    if not _active():
        return decide()
    outcome: tuple[str, Any] | None = None
    if dist.get_rank() == 0:
        try:
            outcome = ("value", decide())
        except CifarError as error:
            outcome = ("error", (type(error).__name__, error.message, error.hint, error.exit_code))
    holder = [outcome]
    dist.broadcast_object_list(holder, src=0)
    kind, payload = holder[0]
    if kind == "error":
        _name, message, hint, exit_code = payload
        error = CifarError(message, hint)
        error.exit_code = exit_code
        raise error
    return payload


def on_every_rank(attempt: Callable[[], T]) -> T:
    """`attempt()` on every rank; where it fails on any, every rank raises one error that names each failing rank,
    its host and its message."""
    try:
        value, failure = attempt(), None
    except CifarError as error:
        if not _active():
            raise
        value, failure = None, error.message
    if not _active():
        return value
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (dist.get_rank(), socket.gethostname(), failure))
    failed = [(rank, host, message) for rank, host, message in reports if message]
    if failed:
        lines = "\n".join(f"  rank {rank} on {host}: {message}" for rank, host, message in failed)
        raise RanksDisagree(
            f"{len(failed)} of {len(reports)} processes cannot start:\n{lines}",
            hint="Every node needs the same prepared data at the same path (cifar prepare there, or a shared disk).",
        )
    return value


def same_on_every_rank(value: str, what: str, where: Path) -> None:
    """Every rank's `value` (e.g. a checksum of its data) must be rank 0's; otherwise every rank stops, naming the
    ranks, hosts and paths that differ."""
    if not _active():
        return
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (dist.get_rank(), socket.gethostname(), str(where), value))
    reference = reports[0][3]
    differing = [(rank, host, path) for rank, host, path, seen in reports if seen != reference]
    if differing:
        lines = "\n".join(f"  rank {rank} on {host}: {path}" for rank, host, path in differing)
        raise RanksDisagree(
            f"{what} differs from rank 0's ({reports[0][2]} on {reports[0][1]}) on:\n{lines}",
            hint="Prepare the same data on every node (same source, same options), or use a shared disk.",
        )


def manifest_fingerprint(manifest: dict[str, Any] | None) -> str:
    """A checksum of what a prepared data set is: source, classes, counts, size and statistics."""
    keys = ("dataset", "source_md5", "class_names", "counts", "per_class", "image_size", "mean", "std")
    described = {key: (manifest or {}).get(key) for key in keys}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
