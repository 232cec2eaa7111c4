"""DistributedDataParallel for real: two CPU processes with gloo, launched by torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _settings_args(tmp_path: Path, prepared: Path, *extra: str) -> list[str]:
    return [
        "preset=baseline",
        f"data.processed_dir={prepared}",
        f"log.checkpoint_dir={tmp_path / 'ck'}",
        f"log.log_dir={tmp_path / 'runs'}",
        "log.progress=plain",
        "train.epochs=2",
        "train.batch_size=16",
        "train.device=cpu",
        "train.precision=fp32",
        "train.run_name=ddp",
        "train.num_threads=1",
        *extra,
    ]


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_two_gloo_processes_agree_and_write_one_checkpoint(tmp_path: Path, prepared_dir: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    # Micro-batches of 5 (5, 5, 5, 1): gradients are all-reduced only after the last chunk of each step.
    args = _settings_args(tmp_path, prepared_dir, "train.micro_batch_size=5")
    done = _torchrun(str(REPO / "tests" / "ddp_worker.py"), str(weights), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["ddp"]
    state = torch.load(tmp_path / "ck" / "ddp" / "last.pth", weights_only=True)
    for key in rank0:
        assert torch.equal(state["model_state"][key], rank0[key])
    assert state["epoch"] == 2
    history = json.loads((tmp_path / "runs" / "ddp" / "history.json").read_text())
    # baseline holds out 10 of the 100 images for validation; each rank trains on half of the other 90:
    # 45 / 16 -> 2 full steps per epoch.
    assert [record["step"] for record in history] == [2, 4]
    assert all("val_accuracy" in record and "test_accuracy" not in record for record in history)


def test_cli_nproc_launches_torchrun_and_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    args = [
        "--preset",
        "baseline",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--run-name",
        "ddp-cli",
        "--processed-dir",
        str(prepared_dir),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--log-dir",
        str(tmp_path / "runs"),
        "--progress",
        "plain",
        "--set",
        "train.num_threads=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "cifar_cli", "train", "--nproc", "2", *args]
    first = subprocess.run(run, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Launching: torch.distributed.run --standalone --nproc_per_node=2 -m cifar_cli train" in first.stdout
    assert first.stdout.count("epoch   1 |") == 1  # only rank 0 reports
    assert "2 processes" in first.stdout
    second = subprocess.run([*run, "--epochs", "2"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming run ddp-cli after epoch 1" in second.stdout
    history = json.loads((tmp_path / "runs" / "ddp-cli" / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    # 90 training images (10 held out): two processes take 45 each, 2 full steps of 16 per epoch; one process
    # alone would take 5.
    assert [record["step"] for record in history] == [2, 4]


def test_airbench_early_stopping_is_decided_once_for_both_ranks(tmp_path: Path, prepared_dir: Path) -> None:
    # airbench's whitening bias freezes after epoch 1 (find_unused_parameters from then on); early stopping with
    # patience 1 stops both ranks after the same epoch. The loss is monitored for its maximum, so that learning
    # itself (a lower validation loss in epoch 2) is what stops the run early.
    weights = tmp_path / "weights"
    weights.mkdir()
    args = _settings_args(
        tmp_path, prepared_dir, "model.name=airbench", "model.width_multiplier=0.25", "model.whiten_bias_epochs=1",
        "train.epochs=6", "train.early_stopping.patience=1", "train.early_stopping.monitor=val_loss",
        "train.early_stopping.mode=max",
    )  # fmt: skip
    done = _torchrun(str(REPO / "tests" / "ddp_worker.py"), str(weights), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "runs" / "ddp" / "history.json").read_text())
    losses = [record["val_loss"] for record in history]
    best, stop_after = losses[0], len(losses)
    for epoch, loss in enumerate(losses[1:], start=2):  # the rule (mode max), replayed from the recorded values
        if loss <= best:
            stop_after = epoch
            break
        best = loss
    assert len(history) == stop_after < 6, losses  # it did stop early, where the rule says
    assert {(weights / f"rank{r}.epochs").read_text() for r in (0, 1)} == {str(stop_after)}
    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Parameters agree; BatchNorm running statistics are each rank's own after the last step (DDP broadcasts
    # rank 0's at the start of every forward), which is why rank 0's monitor decides for both.
    differing = {key for key in rank0 if not torch.equal(rank0[key], rank1[key])}
    assert differing and all(key.endswith(("running_mean", "running_var")) for key in differing), differing


# ------------------------------------------------------------------------------------------------ two "nodes"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_nodes(tmp_path: Path, node_args: list[list[str]], **popen: object) -> list[subprocess.Popen]:
    """Two torchrun agents on 127.0.0.1 standing in for two nodes (one process each, node ranks 0 and 1), each with
    its own settings: as nodes without a shared disk."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "cifar_cli",
                "train",
                *args,
            ],
            env=env,
            cwd=tmp_path,
            **popen,
        )  # fmt: skip
        for rank, args in enumerate(node_args)
    ]


def _two_nodes(tmp_path: Path, node_args: list[list[str]], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Both nodes run to the end; their exit codes and merged output."""
    agents = _start_nodes(tmp_path, node_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    return [subprocess.CompletedProcess(agent.args, agent.returncode, out, "") for agent, out in zip(agents, outputs)]


def _node_args(tmp_path: Path, node: int, processed: Path, *extra: str) -> list[str]:
    return ["--preset", "baseline", "--device", "cpu", "--precision", "fp32", "--run-name", "nodes",
            "--batch-size", "16", "--progress", "plain", "--processed-dir", str(processed),
            "--checkpoint-dir", str(tmp_path / f"node{node}" / "ck"), "--log-dir", str(tmp_path / f"node{node}" / "runs"),
            *extra]  # fmt: skip


def test_two_nodes_without_a_shared_disk_resume_from_rank_0s_checkpoint(tmp_path: Path, prepared_dir: Path) -> None:
    """Node 1 never has a checkpoint of its own: rank 0 decides to resume and sends it, so both continue from epoch
    1 (before, rank 1 started again from epoch 1 of 2 and died in its backward pass)."""
    for epochs in ("1", "2"):
        done = _two_nodes(tmp_path, [_node_args(tmp_path, node, prepared_dir, "--epochs", epochs) for node in (0, 1)])
        assert [agent.returncode for agent in done] == [0, 0], done[0].stdout[-3000:] + done[1].stdout[-3000:]
    assert "Resuming run nodes after epoch 1" in done[0].stdout
    state = torch.load(tmp_path / "node0" / "ck" / "nodes" / "last.pth", weights_only=True)
    assert state["epoch"] == 2 and [record["epoch"] for record in state["history"]] == [1, 2]
    assert not (tmp_path / "node1" / "ck" / "nodes" / "last.pth").exists()


def test_a_node_without_the_data_stops_both_nodes_with_one_message(tmp_path: Path, prepared_dir: Path) -> None:
    missing = tmp_path / "not_prepared"
    nowhere = ["--set", f"data.urls=[{tmp_path / 'no_archive.tar.gz'}]", "--raw-dir", str(tmp_path / "raw1")]
    done = _two_nodes(tmp_path, [_node_args(tmp_path, 0, prepared_dir, "--epochs", "1"),
                                 _node_args(tmp_path, 1, missing, "--epochs", "1", *nowhere)], timeout=240)  # fmt: skip
    assert all(agent.returncode != 0 for agent in done)
    for agent in done:
        assert "1 of 2 processes cannot start" in agent.stdout and "rank 1 on" in agent.stdout, agent.stdout[-3000:]
    assert not (tmp_path / "node0" / "ck" / "nodes" / "last.pth").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = status.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _thousand_images(tmp_path: Path) -> Path:
    """A prepared data set of 1,000 training images: epochs long enough to kill a run between two of them."""
    from cifar_cli.data.prepare import prepare_dataset
    from tests.conftest import build_archive

    (tmp_path / "raw_larger").mkdir()
    build_archive(tmp_path / "raw_larger" / "cifar-10-python.tar.gz", per_batch=200, test_count=50)
    prepare_dataset(tmp_path / "raw_larger", tmp_path / "prepared", write_png=False)
    return tmp_path / "prepared"


def _wait_for_epoch(last: Path, epoch: int, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (last.exists() and torch.load(last, weights_only=True)["epoch"] >= epoch):
        time.sleep(0.1)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_node_killed_mid_run_stops_the_other_and_a_rerun_of_both_resumes(tmp_path: Path) -> None:
    """`kill -9` of node 1 (its torchrun agent and worker, as a crashed machine) after epoch 2: node 0's process fails
    in its next collective and its agent exits; the same command on both nodes resumes from node 0's last.pth."""
    prepared = _thousand_images(tmp_path)
    args = [_node_args(tmp_path, node, prepared, "--epochs", "16") for node in (0, 1)]
    agents = _start_nodes(tmp_path, args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "node0" / "ck" / "nodes" / "last.pth"
    try:
        _wait_for_epoch(last, 2)
        _kill_all([agents[1].pid, *_descendants(agents[1].pid)])  # torchrun's workers run in sessions of their own
        assert agents[0].wait(timeout=180) != 0  # failed in its next collective, and said so
    finally:
        _kill_all([pid for agent in agents for pid in (agent.pid, *_descendants(agent.pid))])
    saved = torch.load(last, weights_only=True)["epoch"]
    assert 2 <= saved < 16
    done = _two_nodes(tmp_path, args)
    assert [agent.returncode for agent in done] == [0, 0], done[0].stdout[-3000:] + done[1].stdout[-3000:]
    assert f"Resuming run nodes after epoch {saved}" in done[0].stdout
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 16 and [record["epoch"] for record in state["history"]] == list(range(1, 17))


def test_an_elastic_restart_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """`torchrun --max-restarts 1`: a worker killed after epoch 2 makes torchrun start both again, and they resume
    from last.pth instead of training from the start."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    node = _node_args(tmp_path, 0, _thousand_images(tmp_path), "--epochs", "16")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
         "-m", "cifar_cli", "train", *node],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    last = tmp_path / "node0" / "ck" / "nodes" / "last.pth"
    try:
        _wait_for_epoch(last, 2)
        workers = [pid for pid in _descendants(agent.pid) if "cifar_cli" in Path(f"/proc/{pid}/cmdline").read_text()]
        _kill_all([max(workers)])  # one of the two workers
        output = agent.communicate(timeout=300)[0]
    finally:
        _kill_all([agent.pid, *_descendants(agent.pid)])
    assert agent.returncode == 0, output[-3000:]
    assert "Resuming run nodes after epoch" in output
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 16 and [record["epoch"] for record in state["history"]] == list(range(1, 17))
