"""The project's GPU check: what a lent GPU machine measures first, whatever issue its session holds.

    python scripts/gpu_check.py pack [--processed-dir DIR]     here: fills .gpu/ (git-ignored, under 64 MiB)
    python3 scripts/gpu_check.py run OUT_DIR                    there: in one call of at most 9 minutes

`make gpu-pack` runs the first. `pack` writes what the GPU machine lacks: the wheels of the packages its image does
not have (pydantic and its needs, for Python 3.12), the speed records (`../shared/anchors/`), and the prepared
CIFAR-10 arrays in a form that fits the transfer: one JPEG per image (quality 75, 4:2:0, as the shared copy was
made; xz-compressed together) plus the exact residual, xz-compressed, and the SHA-256 of the arrays. `run` installs the wheels, rebuilds
the arrays there and checks them against that SHA-256 (it stops if they differ), then runs and writes into OUT_DIR:

    cifar bench --vs-record --runs 3 --only airbench94_muon --only fast --device cuda   vs-record.json (warm, cold)
    cifar bench --profile --device cuda                                                 profile.json
    cifar train --seeds 0-9 --device cuda                                               seeds.json
    the output of each                                                                  gpu-check.log

Copy the JSON into docs/ with the machine and the date in their names. The working tree needs no install there:
`run` puts the checkout on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / ".gpu"
# Not in the GPU machine's image (its package list: the device README's KINDS.md); pinned as tested here.
WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "pydantic-settings==2.16.3", "annotated-types==0.8.0",
          "typing-inspection==0.4.5", "python-dotenv==1.2.4", "typing-extensions==4.16.0")  # fmt: skip
JPEG_QUALITY = 75
SPLITS = ("train", "test")
VS_RECORD_RUNS = 3
SEEDS = "0-9"


def arrays_sha256(cache: dict) -> str:
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(cache[f"{split}_images"].numpy().tobytes())
        digest.update(cache[f"{split}_labels"].numpy().tobytes())
    return digest.hexdigest()


def encode_images(images) -> tuple[bytes, list[int], bytes, str]:  # noqa: ANN001 - uint8 N x 3 x 32 x 32 numpy
    """(the JPEGs one after the other, each one's length, the xz-compressed residual to the exact pixels, its
    dtype: int8 where every difference fits, else int16)."""
    import numpy as np
    from PIL import Image

    jpegs, lengths = io.BytesIO(), []
    decoded = np.empty_like(images)
    for index, pixels in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=2)
        payload = buffer.getvalue()
        jpegs.write(payload)
        lengths.append(len(payload))
        decoded[index] = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).transpose(2, 0, 1)
    residual = images.astype(np.int16) - decoded.astype(np.int16)
    dtype = "int8" if residual.min() >= -128 and residual.max() <= 127 else "int16"
    return jpegs.getvalue(), lengths, lzma.compress(residual.astype(dtype).tobytes()), dtype


def decode_images(jpegs: bytes, lengths: list[int], residual_xz: bytes, dtype: str, shape: list[int]):  # noqa: ANN201
    import numpy as np
    from PIL import Image

    images = np.empty(shape, dtype=np.uint8)
    offset = 0
    for index, length in enumerate(lengths):
        pixels = Image.open(io.BytesIO(jpegs[offset : offset + length])).convert("RGB")
        images[index] = np.asarray(pixels).transpose(2, 0, 1)
        offset += length
    residual = np.frombuffer(lzma.decompress(residual_xz), dtype=dtype).reshape(shape)
    return (images.astype(np.int16) + residual).astype(np.uint8)


def pack_data(processed_dir: Path, folder: Path) -> None:
    """The prepared arrays as JPEGs plus their exact residual, the labels, the manifest and the arrays' SHA-256."""
    import torch

    from cifar_cli.data.prepare import MANIFEST_FILE, load_cache

    cache = load_cache(processed_dir)
    folder.mkdir(parents=True)
    index = {"sha256": arrays_sha256(cache), "splits": {}}
    for split in SPLITS:
        images = cache[f"{split}_images"].numpy()
        jpegs, lengths, residual, dtype = encode_images(images)
        (folder / f"{split}.jpg.xz").write_bytes(lzma.compress(jpegs))  # the tables repeat in each JPEG
        (folder / f"{split}.residual.xz").write_bytes(residual)
        torch.save(cache[f"{split}_labels"].clone(), folder / f"{split}.labels.pt")
        index["splits"][split] = {"lengths": lengths, "shape": list(images.shape), "residual_dtype": dtype}
    (folder / "index.json").write_text(json.dumps(index))
    shutil.copy(processed_dir / MANIFEST_FILE, folder / MANIFEST_FILE)


def pack(processed_dir: Path) -> None:
    if PACK.exists():
        shutil.rmtree(PACK)  # .gpu/ is this script's own folder (git-ignored)
    pack_data(processed_dir, PACK / "data")
    anchors = REPO.parent / "shared" / "anchors"
    shutil.copytree(anchors, PACK / "anchors")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(PACK / "wheels"), *WHEELS]  # fmt: skip
    subprocess.run(pip, check=True, stdout=subprocess.DEVNULL)
    size = sum(path.stat().st_size for path in PACK.rglob("*") if path.is_file())
    print(f"Packed {PACK} ({size / 2**20:.1f} MiB; the transfer allows 64 MiB with the working tree).")
    print("On the GPU machine, in one call carrying .gpu: python3 scripts/gpu_check.py run $OUT")


def install_wheels() -> None:
    target = Path("/tmp/site")
    wheels = sorted(str(path) for path in (PACK / "wheels").glob("*.whl"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(target), *wheels]  # fmt: skip
    subprocess.run(command, check=True)
    sys.path[:0] = [str(target), str(REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), os.environ.get("PYTHONPATH", "")])


def rebuild_data(target: Path) -> None:
    """cache.pt and manifest.json in `target`, checked against the SHA-256 of the arrays packed."""
    import torch

    from cifar_cli.data.prepare import CACHE_FILE, MANIFEST_FILE

    index = json.loads((PACK / "data" / "index.json").read_text())
    cache = {}
    for split, entry in index["splits"].items():
        jpegs = lzma.decompress((PACK / "data" / f"{split}.jpg.xz").read_bytes())
        residual = (PACK / "data" / f"{split}.residual.xz").read_bytes()
        images = decode_images(jpegs, entry["lengths"], residual, entry["residual_dtype"], entry["shape"])
        cache[f"{split}_images"] = torch.from_numpy(images)
        cache[f"{split}_labels"] = torch.load(PACK / "data" / f"{split}.labels.pt", weights_only=True)
    if arrays_sha256(cache) != index["sha256"]:
        raise SystemExit("The rebuilt arrays differ from the packed ones (another JPEG decoder?): stopping.")
    target.mkdir(parents=True, exist_ok=True)
    torch.save(cache, target / CACHE_FILE)
    shutil.copy(PACK / "data" / MANIFEST_FILE, target / MANIFEST_FILE)


def run(out: Path) -> None:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    install_wheels()
    prepared = Path("/tmp/cifar-prepared")
    rebuild_data(prepared)
    print(f"Wheels installed and data rebuilt (SHA-256 checked) in {time.perf_counter() - started:.0f} s.", flush=True)
    cifar = [sys.executable, "-m", "cifar_cli"]
    common = ["--processed-dir", str(prepared), "--device", "cuda"]
    steps = [
        ("vs-record", [*cifar, "bench", "--vs-record", "--runs", str(VS_RECORD_RUNS), "--only", "airbench94_muon",
                       "--only", "fast", "--anchors", str(PACK / "anchors"), "--json", str(out / "vs-record.json"),
                       *common]),
        ("profile", [*cifar, "bench", "--profile", "--json", str(out / "profile.json"), *common]),
        ("seeds", [*cifar, "train", "--seeds", SEEDS, "--progress", "plain", "--log-dir", "/tmp/gpu-check-runs",
                   "--checkpoint-dir", "/tmp/gpu-check-ck", *common]),
    ]  # fmt: skip
    with (out / "gpu-check.log").open("w") as log:
        for name, command in steps:
            began = time.perf_counter()
            print(f"$ {' '.join(command)}", flush=True)
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd="/tmp", env=os.environ.copy())
            print(f"{name}: exit {done.returncode} in {time.perf_counter() - began:.0f} s", flush=True)
    for summary in Path("/tmp/gpu-check-runs").glob("seeds-*.json"):
        shutil.copy(summary, out / "seeds.json")
    print(f"GPU check done in {time.perf_counter() - started:.0f} s; results in {out}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: fill .gpu/")
    packing.add_argument("--processed-dir", type=Path, default=REPO / "my_cifar_data")
    running = commands.add_parser("run", help="there: the check, results into OUT_DIR")
    running.add_argument("out", type=Path)
    arguments = parser.parse_args()
    if arguments.command == "pack":
        sys.path.insert(0, str(REPO))
        pack(arguments.processed_dir)
    else:
        run(arguments.out)


if __name__ == "__main__":
    main()
