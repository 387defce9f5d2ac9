"""Readers for the on-disk formats chaincomp understands.

Every reader returns a :class:`RawDataset`: uint8 images in NHWC layout, int64 labels, and class
names. Readers raise :class:`~chaincomp.errors.DataError` naming the file when it is corrupt.

Formats: IDX (optionally gzipped; MNIST, Fashion-MNIST), CIFAR-10 python batches (directory or
``cifar-10-python.tar.gz``), ImageFolder trees ``split/class/image`` (directory, ``.zip``,
``.tar``, ``.tar.gz``/``.tgz``), and scikit-learn's bundled ``digits``.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import signal
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from chaincomp.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


@dataclass
class RawDataset:
    """Decoded images of one dataset.

    Contract: ``train_x``/``test_x`` are uint8 arrays of shape (N, H, W, C); ``train_y``/``test_y``
    int64 arrays of shape (N,) with values in ``range(len(classes))``.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str] = field(default_factory=list)

    def validate(self, source: str) -> RawDataset:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(
                    f"{source}: {split} images must be uint8 NHWC, got {x.dtype} {x.shape}"
                )
            if len(x) != len(y):
                raise DataError(f"{source}: {split} has {len(x)} images but {len(y)} labels")
            if len(x) == 0:
                raise DataError(f"{source}: {split} split is empty")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise DataError(f"{source}: {split} labels outside 0..{len(self.classes) - 1}")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{source}: train images {self.train_x.shape[1:]} and test images "
                f"{self.test_x.shape[1:]} differ in shape"
            )
        return self


# ----------------------------------------------------------------------------------------- IDX
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw). Raises DataError on a bad header or truncated data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(
            f"{path}: cannot read IDX file ({exc}); delete it and fetch it again"
        ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number); delete it and fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX data has {len(raw) - header} bytes, header promises "
            f"{count * dtype.itemsize}; the file is corrupt or truncated"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem`` or ``directory/stem.gz`` (also the ``stem.idx3-ubyte`` spelling)."""
    for name in (
        stem,
        f"{stem}.gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


IDX_STEMS = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx_dataset(directory: Path, classes: list[str]) -> RawDataset:
    """Read the four MNIST-style IDX files of ``directory``."""
    arrays = {}
    for key, stem in IDX_STEMS.items():
        path = find_idx_file(directory, stem)
        if path is None:
            raise DataError(f"{directory}: missing {stem}[.gz]")
        arrays[key] = read_idx(path)
    for split in ("train", "test"):
        x = arrays[f"{split}_x"]
        if x.ndim != 3:
            raise DataError(
                f"{directory}: {split} images must have 3 IDX dimensions, got {x.shape}"
            )
        arrays[f"{split}_x"] = x[..., None].astype(np.uint8)
        arrays[f"{split}_y"] = arrays[f"{split}_y"].astype(np.int64)
    return RawDataset(classes=classes, **arrays).validate(str(directory))


def has_idx_dataset(directory: Path) -> bool:
    return directory.is_dir() and all(find_idx_file(directory, s) for s in IDX_STEMS.values())


# -------------------------------------------------------------------------------- CIFAR python
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches without executing arbitrary code: only numpy array reconstruction."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _load_cifar_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        y = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:
        raise DataError(
            f"{name}: corrupt CIFAR batch ({exc}); delete it and fetch it again"
        ) from exc
    return np.ascontiguousarray(x), y


CIFAR_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def read_cifar_python(path: Path) -> RawDataset:
    """Read CIFAR-10 python batches from ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz``."""
    files: dict[str, bytes] = {}
    wanted = [*CIFAR_TRAIN_BATCHES, "test_batch"]
    if path.is_dir():
        for name in wanted:
            if (path / name).is_file():
                files[name] = (path / name).read_bytes()
    else:
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    base = PurePosixPath(member.name).name
                    if member.isfile() and base in wanted:
                        fh = tar.extractfile(member)
                        assert fh is not None
                        files[base] = fh.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(
                f"{path}: cannot read archive ({exc}); delete it and fetch it again"
            ) from exc
    missing = [n for n in wanted if n not in files]
    if missing:
        raise DataError(f"{path}: missing CIFAR batches {missing}")
    parts = [_load_cifar_batch(files[n], f"{path}/{n}") for n in CIFAR_TRAIN_BATCHES]
    test_x, test_y = _load_cifar_batch(files["test_batch"], f"{path}/test_batch")
    return RawDataset(
        train_x=np.concatenate([p[0] for p in parts]),
        train_y=np.concatenate([p[1] for p in parts]),
        test_x=test_x,
        test_y=test_y,
        classes=list(CIFAR10_CLASSES),
    ).validate(str(path))


# ------------------------------------------------------------------------------- ImageFolder
GRAY_MODES = ("L", "1", "I;16", "I")
DECODE_WORKERS_ENV = "CHAINCOMP_DECODE_WORKERS"
_PARALLEL_MIN_IMAGES = 4096  # below this a process pool costs more than it saves
_CHUNK = 1024


def decode_workers(n_images: int) -> int:
    """Processes that decode ``n_images`` images: ``$CHAINCOMP_DECODE_WORKERS`` if set (0 or 1:
    in this process), else one per usable CPU core (at most 16) when there are at least 4,096
    images and the platform forks, else 1."""
    import multiprocessing

    env = os.environ.get(DECODE_WORKERS_ENV)
    if env is not None and env.strip() != "":
        try:
            wanted = int(env)
        except ValueError:
            raise DataError(
                f"{DECODE_WORKERS_ENV}: invalid value {env!r}; allowed: an integer >= 0"
            ) from None
        if wanted < 0:
            raise DataError(f"{DECODE_WORKERS_ENV}: {wanted} is negative; allowed: >= 0")
    else:
        if n_images < _PARALLEL_MIN_IMAGES:
            return 1
        try:
            wanted = min(16, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            wanted = min(16, os.cpu_count() or 1)
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(wanted, -(-n_images // _CHUNK)))


def _decode_one(data: bytes, mode: str | None, image_size: int | None) -> tuple[str, np.ndarray]:
    """One image's bytes -> (its own mode, its uint8 HWC array). ``mode`` None: "L" for a
    grayscale image, "RGB" otherwise. Raises what PIL raises for bytes it cannot read or convert."""
    image: Image.Image = Image.open(io.BytesIO(data))
    image.load()
    own = image.mode
    target = mode or ("L" if own in GRAY_MODES else "RGB")
    im = image.convert(target)
    if image_size is not None and im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    channels = 1 if target == "L" else 3
    return own, np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels)


def _decode_chunk(
    args: tuple[list[bytes], str | None, int | None],
) -> list[tuple[str, np.ndarray] | str]:
    """:func:`_decode_one` over a chunk; an image that does not decode gives its error text."""
    chunk, mode, image_size = args
    out: list[tuple[str, np.ndarray] | str] = []
    for data in chunk:
        try:
            out.append(_decode_one(data, mode, image_size))
        except Exception as exc:  # not readable, or not convertible to the mode: named by caller
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def _worker_init(parent: int) -> None:
    """A decode worker ends with its parent (Linux: ``PR_SET_PDEATHSIG``), so a parent killed
    mid-decode (a sweep's trial timeout, the OOM killer) leaves no orphan behind; Ctrl-C goes to
    the parent only."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _decode_all(
    blobs: list[bytes], mode: str | None, image_size: int | None
) -> list[tuple[str, np.ndarray] | str]:
    """:func:`_decode_chunk` over every image, in order, in :func:`decode_workers` forked
    processes (the same function, hence the same arrays, as in this process)."""
    chunks = [(blobs[i : i + _CHUNK], mode, image_size) for i in range(0, len(blobs), _CHUNK)]
    workers = decode_workers(len(blobs))
    results: list[list[tuple[str, np.ndarray] | str]]
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        Image.init()  # the plugins, imported once here rather than in every child
        try:
            pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            try:
                results = list(pool.map(_decode_chunk, chunks))
            finally:  # on an error or Ctrl-C here, the chunks not started are dropped
                pool.shutdown(wait=True, cancel_futures=True)
            return [r for chunk in results for r in chunk]
        except (BrokenProcessPool, OSError) as exc:  # a worker died or could not fork
            warnings.warn(
                f"image decoding: worker processes failed ({type(exc).__name__}: {exc}); "
                "decoding in this process",
                RuntimeWarning,
                stacklevel=2,
            )
    results = [_decode_chunk(c) for c in chunks]
    return [r for chunk in results for r in chunk]


def _iter_archive(path: Path) -> Iterator[tuple[str, bytes]]:
    """Yield (posix member name, bytes) of the image files in a directory, zip or tar archive."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES:
                yield file.relative_to(path).as_posix(), file.read_bytes()
        return
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if (
                        not info.is_dir()
                        and PurePosixPath(info.filename).suffix.lower() in IMAGE_SUFFIXES
                    ):
                        yield info.filename, zf.read(info)
            return
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and PurePosixPath(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    fh = tar.extractfile(member)
                    assert fh is not None
                    yield member.name, fh.read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(
            f"{path}: cannot read archive ({exc}); is it a directory, .zip or .tar.gz?"
        ) from exc


def read_imagefolder(
    path: Path,
    channels: int | None = None,
    image_size: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> RawDataset:
    """Read an ImageFolder tree ``[prefix/]split/class/image`` from a directory, zip or tar(.gz).

    Classes are the sorted class folder names of the train split. ``channels`` (1 or 3) converts
    every image to L or RGB; by default 1 if every image is grayscale, else 3. ``image_size``
    resizes to a square; without it, every image must have the same size.
    """
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    items: dict[str, list[tuple[str, bytes]]] = {train_split: [], test_split: []}
    for name, data in _iter_archive(path):
        parts = PurePosixPath(name).parts
        for i, part in enumerate(parts[:-2]):
            if part in items and len(parts) - i == 3:
                items[part].append((parts[i + 1], data))
                break
    if not items[train_split] or not items[test_split]:
        raise DataError(
            f"{path}: expected images at {train_split}/<class>/<image> and {test_split}/<class>/<image>; "
            f"found {len(items[train_split])} train and {len(items[test_split])} test images"
        )
    classes = sorted({c for c, _ in items[train_split]})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({c for c, _ in items[test_split]} - set(classes))
    if unknown:
        raise DataError(f"{path}: test classes {unknown} do not occur in the train split")
    if channels not in (None, 1, 3):
        raise DataError(f"data.channels: {channels} is not supported; allowed: 1, 3")
    mode = None if channels is None else ("L" if channels == 1 else "RGB")
    splits = list(items)
    blobs = [data for split in splits for _, data in items[split]]
    where = [(split, cls) for split in splits for cls, _ in items[split]]

    def decode(indices: list[int], to: str | None) -> list[tuple[str, np.ndarray]]:
        results = _decode_all([blobs[k] for k in indices], to, image_size)
        for k, result in zip(indices, results, strict=True):
            if isinstance(result, str):
                split, cls = where[k]
                raise DataError(f"{path}: cannot decode an image of {split}/{cls} ({result})")
        return results  # type: ignore[return-value]

    decoded = decode(list(range(len(blobs))), mode)
    if mode is None:
        channels = 1 if all(own in GRAY_MODES for own, _ in decoded) else 3
        gray = [k for k, (_, arr) in enumerate(decoded) if arr.shape[2] == 1]
        if channels == 3 and gray:  # grayscale images among colour ones: RGB from their own mode
            for k, result in zip(gray, decode(gray, "RGB"), strict=True):
                decoded[k] = result
    out: dict[str, np.ndarray] = {}
    start = 0
    for split in splits:
        arrays = [arr for _, arr in decoded[start : start + len(items[split])]]
        start += len(items[split])
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise DataError(
                f"{path}: images of {split} have different sizes {sorted(sizes)[:3]}...; "
                "set data.image_size to resize them"
            )
        out[split] = np.stack(arrays)
    labels = {s: np.array([index[c] for c, _ in items[s]], dtype=np.int64) for s in items}
    return RawDataset(
        train_x=out[train_split],
        train_y=labels[train_split],
        test_x=out[test_split],
        test_y=labels[test_split],
        classes=classes,
    ).validate(str(path))


# ------------------------------------------------------------------------------------ digits
def read_sklearn_digits(test_fraction: float = 0.2, seed: int = 0) -> RawDataset:
    """scikit-learn's bundled 8x8 digits (no download); a fixed seeded test split is held apart."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(images))
    n_test = round(len(images) * test_fraction)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return RawDataset(
        train_x=images[train_idx],
        train_y=labels[train_idx],
        test_x=images[test_idx],
        test_y=labels[test_idx],
        classes=[str(i) for i in range(10)],
    ).validate("sklearn digits")
