"""A folder copy of a CIFAR-10 python archive as JPEG files, for measuring `cifar prepare --from-folder`.

    python docs/make_jpeg_folder.py ../shared/data/cifar-10-python.tar.gz jpeg

writes jpeg/{train,test}/<class>/NNNNN.jpg (quality 95, no chroma subsampling), the archive's own split.
"""

from __future__ import annotations

import pickle
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def main(archive: Path, out: Path) -> None:
    jobs: list[tuple[Path, np.ndarray]] = []
    with tarfile.open(archive) as tar:
        for split, names in BATCHES.items():
            # The shared copy is trusted here; the tool itself reads archives with a restricted unpickler.
            batches = [pickle.load(tar.extractfile(f"cifar-10-batches-py/{n}"), encoding="latin1") for n in names]
            pixels = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            labels = [label for b in batches for label in b["labels"]]
            for name in NAMES:
                (out / split / name).mkdir(parents=True, exist_ok=True)
            jobs += [(out / split / NAMES[label] / f"{i:05d}.jpg", pixels[i]) for i, label in enumerate(labels)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: Image.fromarray(job[1]).save(job[0], quality=95, subsampling=0), jobs))
    print(f"{len(jobs)} files in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
