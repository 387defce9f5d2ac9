"""Time to decode an image-folder archive in one process against the decode worker processes.

    python benchmarks/decode_imagefolder.py [PATH] [--rounds 3] [--workers N]

PATH defaults to CIFAR-10's JPEG copy (``$CHAINCOMP_DATA_DIR/cifar10-jpeg75.tar.gz``, or
``../shared/datasets/``). Each round reads the archive both ways (``CHAINCOMP_DECODE_WORKERS=1``,
then the automatic count or ``--workers``; the order alternates between rounds, so a slow spell
of the machine hits both), checks that the arrays are identical, and the script prints the median
seconds of each and the ratio one process / workers: above 1 is faster. This is the first load of
a dataset; later loads read the decoded-array cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from chaincomp.data import formats


def _default_path() -> Path:
    root = os.environ.get("CHAINCOMP_DATA_DIR") or str(
        Path(__file__).resolve().parents[2] / "shared" / "datasets"
    )
    return Path(root) / "cifar10-jpeg75.tar.gz"


def _read(path: Path, workers: str | None) -> tuple[float, formats.RawDataset]:
    if workers is None:
        os.environ.pop(formats.DECODE_WORKERS_ENV, None)
    else:
        os.environ[formats.DECODE_WORKERS_ENV] = workers
    start = time.perf_counter()
    raw = formats.read_imagefolder(path, channels=3)
    return time.perf_counter() - start, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default=None, help="worker processes (default: automatic)")
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    if args.chunk is not None:
        formats._CHUNK = args.chunk
    path = args.path or _default_path()
    saved = os.environ.get(formats.DECODE_WORKERS_ENV)
    times: dict[str, list[float]] = {"one process": [], "workers": []}
    try:
        for r in range(args.rounds):
            ways = [("one process", "1"), ("workers", args.workers)]
            ref = None
            for name, workers in ways if r % 2 == 0 else ways[::-1]:
                seconds, raw = _read(path, workers)
                times[name].append(seconds)
                if ref is None:
                    ref = raw
                else:
                    for key in ("train_x", "train_y", "test_x", "test_y"):
                        if not np.array_equal(getattr(ref, key), getattr(raw, key)):
                            raise SystemExit(f"{key} differs between the two ways")
                    if ref.classes != raw.classes:
                        raise SystemExit("the classes differ between the two ways")
        if args.workers is None:
            os.environ.pop(formats.DECODE_WORKERS_ENV, None)
        else:
            os.environ[formats.DECODE_WORKERS_ENV] = args.workers
        n = len(ref.train_x) + len(ref.test_x) if ref is not None else 0
        workers = formats.decode_workers(n)
    finally:
        if saved is None:
            os.environ.pop(formats.DECODE_WORKERS_ENV, None)
        else:
            os.environ[formats.DECODE_WORKERS_ENV] = saved
    one, many = (statistics.median(times[k]) for k in ("one process", "workers"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{path.name}: {n} images, {cores} usable CPU cores, decode workers: {workers}")
    for name, values in times.items():
        print(
            f"{name:12s}: median {statistics.median(values):6.2f} s  rounds {[round(v, 2) for v in values]}"
        )
    print(f"ratio one process / workers: {one / many:.2f} (identical arrays)")


if __name__ == "__main__":
    main()
