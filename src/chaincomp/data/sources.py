"""Where datasets come from, in the order DESIGN gives, and the decoded-array cache.

Resolution order for a named dataset:

1. ``data.path`` when configured (a dataset directory/file, or a root holding one), else the
   root in ``$CHAINCOMP_DATA_DIR``;
2. the raw cache ``<cache_dir>/raw`` (where downloads land);
3. system paths (Debian's ``dataset-fashion-mnist`` installs /usr/share/datasets/fashion-mnist);
4. the official download, when ``data.download`` is true and ``$CHAINCOMP_OFFLINE`` is unset;
5. otherwise a :class:`DataError` saying where it looked and how to get the data.

Decoded arrays are cached as an uncompressed ``.npz`` under ``<cache_dir>/decoded`` keyed by the
source file's path, size and mtime, so a second load is a plain memory read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chaincomp.data.formats import (
    CIFAR10_CLASSES,
    IDX_STEMS,
    RawDataset,
    has_idx_dataset,
    read_cifar_python,
    read_idx_dataset,
    read_imagefolder,
    read_sklearn_digits,
)
from chaincomp.errors import ConfigError, DataError
from chaincomp.utils import atomic_write

CACHE_FORMAT_VERSION = 1
DOWNLOAD_TIMEOUT_S = 30


def default_cache_dir() -> Path:
    return Path(os.environ.get("CHAINCOMP_CACHE_DIR", "~/.cache/chaincomp")).expanduser()


@dataclass(frozen=True)
class Download:
    """One file of an official download: tried at each base URL in turn, checked by MD5."""

    filename: str
    md5: str


class Source(ABC):
    """Knows how to recognise, read and (optionally) download one dataset.

    Contract: ``find(root)`` returns the dataset path under ``root`` or None without reading
    image data; ``read(path, options)`` returns a validated :class:`RawDataset` or raises
    :class:`DataError` naming the file.
    """

    name: str
    candidates: tuple[str, ...] = ()
    system_paths: tuple[str, ...] = ()
    base_urls: tuple[str, ...] = ()
    downloads: tuple[Download, ...] = ()
    download_dir: str = ""
    how_to_get: str = ""
    needs_path: bool = False

    @abstractmethod
    def is_dataset(self, path: Path) -> bool: ...

    @abstractmethod
    def read(self, path: Path | None, options: dict) -> RawDataset: ...

    def find(self, root: Path) -> Path | None:
        if self.is_dataset(root):
            return root
        for rel in self.candidates:
            if self.is_dataset(root / rel):
                return root / rel
        return None


class IdxSource(Source):
    def __init__(
        self,
        name: str,
        dirs: tuple[str, ...],
        system: tuple[str, ...],
        urls: tuple[str, ...],
        md5s: dict[str, str],
        classes: list[str],
        how_to_get: str,
    ):
        self.name = name
        self.candidates = dirs
        self.system_paths = system
        self.base_urls = urls
        self.downloads = tuple(Download(f"{s}.gz", md5s[k]) for k, s in IDX_STEMS.items())
        self.download_dir = dirs[0]
        self.classes = classes
        self.how_to_get = how_to_get

    def is_dataset(self, path: Path) -> bool:
        return has_idx_dataset(path)

    def read(self, path: Path | None, options: dict) -> RawDataset:
        assert path is not None
        return read_idx_dataset(path, self.classes)


class CifarSource(Source):
    """CIFAR-10 as the official python batches, or as an ImageFolder tree/archive (e.g. JPEG copy)."""

    name = "cifar10"
    candidates = (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "cifar10",
        "cifar10.tar.gz",
        "cifar10.zip",
        "cifar10-jpeg75.tar.gz",
    )
    base_urls = ("https://www.cs.toronto.edu/~kriz/",)
    downloads = (Download("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),)
    download_dir = "."
    how_to_get = (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (or an ImageFolder "
        "archive train/<class>/*.png, test/<class>/*.png) into $CHAINCOMP_DATA_DIR or set data.path"
    )

    @staticmethod
    def _is_python_batches(path: Path) -> bool:
        return (path.is_dir() and (path / "data_batch_1").is_file()) or (
            path.is_file() and path.name.startswith("cifar-10-python")
        )

    def is_dataset(self, path: Path) -> bool:
        if self._is_python_batches(path):
            return True
        if path.is_dir():
            return (path / "train").is_dir() and (path / "test").is_dir()
        return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar", ".zip"))

    def read(self, path: Path | None, options: dict) -> RawDataset:
        assert path is not None
        if self._is_python_batches(path):
            return read_cifar_python(path)
        raw = read_imagefolder(path, channels=3, image_size=options.get("image_size"))
        if raw.classes != CIFAR10_CLASSES:
            raise DataError(f"{path}: ImageFolder classes {raw.classes} are not CIFAR-10's")
        return raw


class ImageFolderSource(Source):
    name = "imagefolder"
    needs_path = True
    how_to_get = "set data.path to a directory, .zip or .tar.gz holding train/<class>/<image> and test/<class>/<image>"

    def is_dataset(self, path: Path) -> bool:
        return path.exists()

    def read(self, path: Path | None, options: dict) -> RawDataset:
        assert path is not None
        return read_imagefolder(
            path, channels=options.get("channels"), image_size=options.get("image_size")
        )


class DigitsSource(Source):
    name = "digits"
    how_to_get = "it ships with scikit-learn: pip install scikit-learn"

    def is_dataset(self, path: Path) -> bool:
        return False

    def read(self, path: Path | None, options: dict) -> RawDataset:
        return read_sklearn_digits()


_MNIST_MD5 = {
    "train_x": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train_y": "d53e105ee54ea40749a09fcbcd1e9432",
    "test_x": "9fb629c4189551a2d022fa330f9573f3",
    "test_y": "ec29112dd5afa0611ce80d1b7f02629c",
}
_FASHION_MD5 = {
    "train_x": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train_y": "25c81989df183df01b3e8a0aad5dffbe",
    "test_x": "bef4ecab320f06d8554ea6380940ec79",
    "test_y": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SOURCES: dict[str, Source] = {
    "digits": DigitsSource(),
    "mnist": IdxSource(
        "mnist",
        dirs=("mnist", "MNIST/raw", "MNIST"),
        system=("/usr/share/datasets/mnist",),
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5s=_MNIST_MD5,
        classes=[str(i) for i in range(10)],
        how_to_get="put the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
        "$CHAINCOMP_DATA_DIR/mnist or set data.path",
    ),
    "fashion_mnist": IdxSource(
        "fashion_mnist",
        dirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        system=("/usr/share/datasets/fashion-mnist",),
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5s=_FASHION_MD5,
        classes=FASHION_CLASSES,
        how_to_get="apt-get install dataset-fashion-mnist, or put the four IDX files "
        "(train-images-idx3-ubyte.gz, ...) in $CHAINCOMP_DATA_DIR/fashion-mnist or set data.path",
    ),
    "cifar10": CifarSource(),
    "imagefolder": ImageFolderSource(),
}


def get_source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError("data.name", f"unknown dataset {name!r}", sorted(SOURCES)) from None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(source: Source, raw_root: Path) -> Path:
    target_dir = raw_root / source.download_dir
    for item in source.downloads:
        dest = target_dir / item.filename
        if dest.is_file() and _md5(dest) == item.md5:
            continue
        errors = []
        for base in source.base_urls:
            url = base + item.filename
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    payload = resp.read()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                errors.append(f"{url}: {exc}")
                continue
            if hashlib.md5(payload).hexdigest() != item.md5:
                errors.append(f"{url}: MD5 mismatch")
                continue
            atomic_write(dest, functools.partial(Path.write_bytes, data=payload))
            break
        else:
            raise DataError("; ".join(errors))
    found = source.find(raw_root)
    if found is None:
        raise DataError(f"downloaded files in {target_dir} are not a {source.name} dataset")
    return found


def locate(source: Source, path: str | None, cache_dir: Path, download: bool) -> Path | None:
    """Find the dataset on disk (or download it); see the module docstring for the order."""
    if source.needs_path and not path:
        raise ConfigError("data.path", f"dataset {source.name!r} needs a path", source.how_to_get)
    if not source.candidates and not source.needs_path:
        return None  # bundled with a package
    searched: list[str] = []
    if path:
        p = Path(path).expanduser()
        found = source.find(p)
        if found is None:
            raise DataError(
                f"data.path={path}: no {source.name} dataset there; {source.how_to_get}"
            )
        return found
    roots = []
    if os.environ.get("CHAINCOMP_DATA_DIR"):
        roots.append(Path(os.environ["CHAINCOMP_DATA_DIR"]).expanduser())
    roots.append(cache_dir / "raw")
    for root in roots:
        searched.append(str(root))
        found = source.find(root)
        if found is not None:
            return found
    for sys_path in source.system_paths:
        searched.append(sys_path)
        if source.is_dataset(Path(sys_path)):
            return Path(sys_path)
    reason = "downloads are off (data.download=false or CHAINCOMP_OFFLINE set)"
    if download and source.downloads and not os.environ.get("CHAINCOMP_OFFLINE"):
        try:
            return _download(source, cache_dir / "raw")
        except DataError as exc:
            reason = f"download failed: {exc}"
    raise DataError(
        f"data.name={source.name}: dataset not found (searched {', '.join(searched)}; {reason}). "
        f"To get it: {source.how_to_get}"
    )


def _signature(source: Source, path: Path | None, options: dict) -> str:
    stat = None
    if path is not None:
        st = path.stat()
        stat = [str(path.resolve()), st.st_size, st.st_mtime_ns]
        if path.is_dir():  # a directory's own mtime misses edits to its files; add theirs
            stat.append(
                sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir())
            )
    if path is None:
        import sklearn

        stat = ["sklearn", sklearn.__version__]
    blob = json.dumps(
        [CACHE_FORMAT_VERSION, source.name, stat, sorted(options.items())], default=str
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_raw(
    name: str,
    path: str | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    options: dict | None = None,
) -> RawDataset:
    """Load a dataset's decoded arrays, through the decoded cache.

    ``options`` are reader options (``channels``, ``image_size``) and are part of the cache key.
    """
    source = get_source(name)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    location = locate(source, path, cache, download)
    cache_file = cache / "decoded" / f"{name}-{_signature(source, location, options)}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                return RawDataset(
                    train_x=z["train_x"],
                    train_y=z["train_y"],
                    test_x=z["test_x"],
                    test_y=z["test_y"],
                    classes=[str(c) for c in z["classes"]],
                )
        except (OSError, ValueError, KeyError):
            cache_file.unlink(missing_ok=True)  # corrupt cache entry: decode again
    raw = source.read(location, options)

    def _save(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            np.savez(
                fh,
                train_x=raw.train_x,
                train_y=raw.train_y,
                test_x=raw.test_x,
                test_y=raw.test_y,
                classes=np.array(raw.classes),
            )

    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        atomic_write(cache_file, _save)
    return raw
