"""Data layer: formats, resolution order, cache, splits, tasks, device batches, augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chaincomp.data import SOURCES, Augment, ChainDataModule, DataConfig, RawDataset, load_raw
from chaincomp.data.formats import read_idx
from chaincomp.errors import ConfigError, DataError
from chaincomp.tasks import make_task, rotate

from .conftest import needs_shared


# ------------------------------------------------------------------------------- helpers
def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_idx_dataset(root: Path, n_train: int = 20, n_test: int = 8, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz)
    return root


def make_imagefolder(root: Path, size: int = 6, mode: str = "RGB", per_class: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("cat", "ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
                    d / f"{i}.png"
                )
    return root


# -------------------------------------------------------------------------------- formats
def test_digits_is_bundled_with_fixed_test_split() -> None:
    raw = load_raw("digits")
    assert raw.train_x.shape[1:] == (8, 8, 1) and raw.train_x.dtype == np.uint8
    assert len(raw.train_x) + len(raw.test_x) == 1797
    assert len(raw.test_x) == 359
    assert raw.train_x.max() == 255
    again = load_raw("digits")
    np.testing.assert_array_equal(raw.test_y, again.test_y)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_configured_path(tmp_path: Path, gz: bool) -> None:
    make_idx_dataset(tmp_path / "mnist", gz=gz)
    raw = load_raw("mnist", path=str(tmp_path / "mnist"), cache_dir=tmp_path / "cache")
    assert raw.train_x.shape == (20, 28, 28, 1)
    assert raw.test_y.tolist() == list(range(8))
    # a root holding the dataset folder works too
    raw2 = load_raw("mnist", path=str(tmp_path), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(raw.train_x, raw2.train_x)


def test_corrupt_idx_names_the_file(tmp_path: Path) -> None:
    root = make_idx_dataset(tmp_path / "m")
    bad = root / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-100]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*corrupt or truncated"):
        load_raw("mnist", path=str(root), cache_dir=tmp_path / "cache")
    bad.write_bytes(b"not a gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        read_idx(bad)


def test_bad_idx_magic(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(f)


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return pickle.dumps(
        {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(np.arange(n) % 10),
        }
    )


def test_cifar_python_batches_dir_and_tarball(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(_cifar_batch(4, i))
    (d / "test_batch").write_bytes(_cifar_batch(3, 9))
    raw = load_raw("cifar10", path=str(d), cache_dir=tmp_path / "c")
    assert raw.train_x.shape == (20, 32, 32, 3) and raw.test_x.shape == (3, 32, 32, 3)
    # channel-major rows become HWC pixels
    first = pickle.loads((d / "data_batch_1").read_bytes())[b"data"][0]
    assert raw.train_x[0, 0, 0].tolist() == [first[0], first[1024], first[2048]]
    tar = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(d, arcname="cifar-10-batches-py")
    raw2 = load_raw("cifar10", path=str(tar), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(raw.train_x, raw2.train_x)


def test_cifar_batch_with_code_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("true",))

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    (d / "test_batch").write_bytes(_cifar_batch(3, 9))
    with pytest.raises(DataError, match="corrupt CIFAR batch.*refusing"):
        load_raw("cifar10", path=str(d), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("container", ["dir", "zip", "tar.gz"])
def test_imagefolder_containers(tmp_path: Path, container: str) -> None:
    tree = make_imagefolder(tmp_path / "tree")
    path = tree
    if container == "zip":
        path = tmp_path / "data.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(tree.rglob("*.png")):
                zf.write(f, f"data/{f.relative_to(tree).as_posix()}")
    elif container == "tar.gz":
        path = tmp_path / "data.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            tf.add(tree, arcname="data")
    raw = load_raw("imagefolder", path=str(path), cache_dir=tmp_path / "c")
    assert raw.classes == ["ant", "bee", "cat"]
    assert raw.train_x.shape == (9, 6, 6, 3) and raw.test_x.shape == (9, 6, 6, 3)
    assert sorted(raw.train_y.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first = np.asarray(Image.open(tree / "train" / "ant" / "0.png"))
    assert any((raw.train_x[i] == first).all() for i in range(9))


def test_imagefolder_grayscale_and_resize(tmp_path: Path) -> None:
    tree = make_imagefolder(tmp_path / "g", size=5, mode="L")
    raw = load_raw("imagefolder", path=str(tree), cache_dir=tmp_path / "c")
    assert raw.train_x.shape == (9, 5, 5, 1)
    raw = load_raw(
        "imagefolder",
        path=str(tree),
        cache_dir=tmp_path / "c",
        options={"channels": 3, "image_size": 8},
    )
    assert raw.train_x.shape == (9, 8, 8, 3)


def test_imagefolder_errors(tmp_path: Path) -> None:
    tree = make_imagefolder(tmp_path / "t")
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tree / "train" / "ant" / "odd.png")
    with pytest.raises(DataError, match=r"different sizes.*data.image_size"):
        load_raw("imagefolder", path=str(tree), cache_dir=tmp_path / "c")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="expected images at train/<class>/<image>"):
        load_raw("imagefolder", path=str(tmp_path / "empty"), cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="data.path"):
        load_raw("imagefolder", cache_dir=tmp_path / "c")


def _mixed_tree(root: Path) -> dict[str, np.ndarray]:
    """An image folder with RGB, L and 1-bit PNGs (4 x 4) in every class; returns each file's
    written pixels as RGB (a gray value v is (v, v, v); a 1-bit pixel 0 or 255)."""
    rng = np.random.default_rng(2)
    truth: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(7):
                name = f"{split}/{cls}/{i}.png"
                if i % 3 == 0:
                    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                    Image.fromarray(rgb, "RGB").save(root / name)
                elif i % 3 == 1:
                    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
                    Image.fromarray(gray, "L").save(root / name)
                    rgb = np.repeat(gray[..., None], 3, axis=2)
                else:
                    bits = rng.integers(0, 2, (4, 4)).astype(bool)
                    Image.fromarray(bits).save(root / name)  # mode "1"
                    rgb = np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2)
                truth[name] = rgb
    return truth


def test_imagefolder_parallel_decode_equals_serial_and_the_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding in forked processes (chunks of 2 images, 3 processes) gives the pixels that were
    written, in the archive's order, exactly as decoding in this process does, for every
    ``channels`` setting, a resize, and grayscale images among colour ones."""
    from chaincomp.data import formats

    truth = _mixed_tree(tmp_path / "m")
    with tarfile.open(tmp_path / "m.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "m", arcname="m")
    names = [n for n, _ in formats._iter_archive(tmp_path / "m.tar.gz")]
    order = {
        s: [n.split("/", 1)[1] for n in names if n.split("/")[1] == s] for s in ("train", "test")
    }
    monkeypatch.setattr(formats, "_CHUNK", 2)
    pools: list[int] = []  # the process count of every pool that decoded
    pool_map = ProcessPoolExecutor.map

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pools.append(self._max_workers)
        return pool_map(self, *args, **kwargs)

    monkeypatch.setattr(ProcessPoolExecutor, "map", spy)
    for options in ({}, {"channels": 3}, {"channels": 1}, {"channels": 3, "image_size": 6}):
        raws = {}
        for workers in ("1", "3"):
            monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", workers)
            pools.clear()
            raws[workers] = formats.read_imagefolder(tmp_path / "m.tar.gz", **options)
            # a second pool makes RGB of the grayscale images among colour ones
            assert pools == ([] if workers == "1" else [3, 3] if not options else [3])
        for key in ("train_x", "train_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(raws["1"], key), getattr(raws["3"], key))
        raw = raws["3"]
        if "image_size" in options:
            assert raw.train_x.shape == (14, 6, 6, 3)
            continue
        want = 1 if options.get("channels") == 1 else 3  # mixed modes: RGB by default
        assert raw.train_x.shape == (14, 4, 4, want)
        for split, x in (("train", raw.train_x), ("test", raw.test_x)):
            for k, name in enumerate(order[split]):
                rgb = truth[name]
                if want == 3:
                    np.testing.assert_array_equal(x[k], rgb)
                elif (rgb == rgb[..., :1]).all():  # a gray image stays itself in L
                    np.testing.assert_array_equal(x[k, ..., 0], rgb[..., 0])


def _reference_decode(blobs: list[bytes], channels: int | None, size: int | None) -> np.ndarray:
    """The decode loop of read_imagefolder before the worker processes (commit a2723ca), kept
    as the reference: open and load every image, pick the channels from all modes, convert,
    resize."""
    images = []
    for data in blobs:
        img = Image.open(io.BytesIO(data))
        img.load()
        images.append(img)
    if channels is None:
        gray = all(im.mode in ("L", "1", "I;16", "I") for im in images)
        channels = 1 if gray else 3
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for image in images:
        im = image.convert(mode)
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8).reshape(im.size[1], im.size[0], channels))
    return np.stack(arrays)


def _image_bytes(mode: str, rng: np.random.Generator) -> bytes:
    """A 5 x 5 image of ``mode`` as PNG (JPEG for CMYK)."""
    if mode in ("RGB", "RGBA", "CMYK"):
        arr = rng.integers(0, 256, (5, 5, len(mode)), dtype=np.uint8)
        img = Image.fromarray(arr, mode)
    elif mode == "LA":
        img = Image.fromarray(rng.integers(0, 256, (5, 5, 2), dtype=np.uint8), "LA")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), "RGB").quantize(7)
    elif mode == "1":
        img = Image.fromarray(rng.integers(0, 2, (5, 5)).astype(bool))
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (5, 5)).astype(np.uint16))
    else:  # L
        img = Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8), "L")
    buf = io.BytesIO()
    img.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "modes",
    [("L", "1", "I;16"), ("RGB", "P", "RGBA", "LA", "L", "1", "I;16", "CMYK")],
    ids=["gray", "mixed"],
)
@pytest.mark.parametrize("container", ["dir", "zip"])
def test_imagefolder_workers_equal_the_reference_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modes: tuple[str, ...], container: str
) -> None:
    """Every mode, channels None / 1 / 3, with and without resize, from a directory and a zip:
    the arrays decoded by 3 worker processes (chunks of 2) equal the reference loop's."""
    from chaincomp.data import formats

    rng = np.random.default_rng(3)
    files = {
        f"{split}/{cls}/{i}.png": _image_bytes(modes[i % len(modes)], rng)
        for split in ("train", "test")
        for cls in ("x", "y")
        for i in range(len(modes) + 1)
    }
    root = tmp_path / "tree"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    path = root
    if container == "zip":
        path = tmp_path / "tree.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    order = [n for n, _ in formats._iter_archive(path)]
    monkeypatch.setattr(formats, "_CHUNK", 2)
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "3")
    for channels in (None, 1, 3):
        for size in (None, 7):
            raw = formats.read_imagefolder(path, channels=channels, image_size=size)
            for split, x in (("train", raw.train_x), ("test", raw.test_x)):
                blobs = [files[n] for n in order if n.startswith(split + "/")]
                np.testing.assert_array_equal(x, _reference_decode(blobs, channels, size))


def test_imagefolder_names_an_image_that_does_not_convert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image that loads but cannot convert to the mode (LAB) is a DataError naming it, in
    one process and in the workers."""
    from chaincomp.data import formats

    tree = make_imagefolder(tmp_path / "t")
    Image.new("LAB", (6, 6)).save(tree / "test" / "bee" / "lab.tif")
    monkeypatch.setattr(formats, "_CHUNK", 2)
    for workers in ("1", "2"):
        monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", workers)
        with pytest.raises(DataError, match=r"cannot decode an image of test/bee \(ValueError"):
            formats.read_imagefolder(tree, channels=1)


def test_imagefolder_parallel_decode_reports_a_broken_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chaincomp.data import formats

    tree = make_imagefolder(tmp_path / "t")
    (tree / "test" / "bee" / "9.png").write_bytes(b"not a png")
    monkeypatch.setattr(formats, "_CHUNK", 2)
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "2")
    with pytest.raises(DataError, match=r"cannot decode an image of test/bee"):
        formats.read_imagefolder(tree)


_PARENT = os.getpid()


def _die_in_child(args):  # type: ignore[no-untyped-def]
    """A decode worker that dies in a child process (as one killed for memory would)."""
    from chaincomp.data.formats import _decode_one

    if os.getpid() != _PARENT:
        os._exit(1)
    chunk, mode, size = args
    return [_decode_one(data, mode, size) for data in chunk]


def test_imagefolder_decode_goes_on_when_a_worker_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chaincomp.data import formats

    tree = make_imagefolder(tmp_path / "t")
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "1")
    serial = formats.read_imagefolder(tree)
    monkeypatch.setitem(_die_in_child.__globals__, "_PARENT", os.getpid())
    monkeypatch.setattr(formats, "_decode_chunk", _die_in_child)
    monkeypatch.setattr(formats, "_CHUNK", 2)
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "2")
    with pytest.warns(RuntimeWarning, match="worker processes failed"):
        raw = formats.read_imagefolder(tree)
    np.testing.assert_array_equal(raw.train_x, serial.train_x)
    np.testing.assert_array_equal(raw.test_y, serial.test_y)


_SLOW_CHILD = """
import os, sys, time
from pathlib import Path
from chaincomp.data import formats

def slow(args):
    Path(sys.argv[2], str(os.getpid())).touch()
    time.sleep(30)

formats._decode_chunk = slow
formats._CHUNK = 2
os.environ["CHAINCOMP_DECODE_WORKERS"] = "2"
formats.read_imagefolder(Path(sys.argv[1]))
"""


def test_decode_workers_end_with_their_parent(tmp_path: Path) -> None:
    """A process killed while its workers decode (a sweep's trial timeout, the OOM killer)
    leaves no worker behind."""
    import signal
    import subprocess
    import sys
    import time

    tree = make_imagefolder(tmp_path / "t")
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(tree), str(pids)])
    deadline = time.monotonic() + 60
    while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = [int(f.name) for f in pids.iterdir()]
    assert len(workers) == 2, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
        time.sleep(0.1)
    assert alive == [], f"workers {alive} outlived their parent"


def test_decode_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from chaincomp.data import formats

    monkeypatch.delenv("CHAINCOMP_DECODE_WORKERS", raising=False)
    assert formats.decode_workers(100) == 1  # small: no pool
    assert 1 <= formats.decode_workers(60_000) <= min(16, os.cpu_count() or 1)
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "0")
    assert formats.decode_workers(60_000) == 1
    monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", "64")
    assert formats.decode_workers(3000) == 3  # never more than the chunks
    for bad, why in (("two", "invalid value 'two'"), ("-1", "-1 is negative")):
        monkeypatch.setenv("CHAINCOMP_DECODE_WORKERS", bad)
        with pytest.raises(DataError, match=f"CHAINCOMP_DECODE_WORKERS: {why}; allowed"):
            formats.decode_workers(60_000)


# -------------------------------------------------------------------- resolution + cache
def test_unknown_dataset_lists_allowed() -> None:
    with pytest.raises(
        ConfigError, match=r"data.name: unknown dataset 'svhn'; allowed: cifar10, digits"
    ):
        load_raw("svhn")
    with pytest.raises(ConfigError, match="data.name"):
        DataConfig(name="svhn")


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHAINCOMP_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setattr(SOURCES["fashion_mnist"], "system_paths", (str(tmp_path / "sys"),))
    with pytest.raises(DataError) as info:
        load_raw("fashion_mnist", cache_dir=tmp_path / "c", download=False)
    msg = str(info.value)
    assert "data.name=fashion_mnist: dataset not found" in msg
    assert str(tmp_path / "nothing") in msg and str(tmp_path / "sys") in msg
    assert "downloads are off" in msg and "apt-get install dataset-fashion-mnist" in msg


def test_resolution_order_env_then_cache_then_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys_dir = make_idx_dataset(tmp_path / "sys" / "fashion-mnist", n_train=12)
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(SOURCES["fashion_mnist"], "system_paths", (str(sys_dir),))
    monkeypatch.setenv("CHAINCOMP_DATA_DIR", str(tmp_path / "empty"))
    assert len(load_raw("fashion_mnist", cache_dir=cache_dir).train_x) == 12  # system path
    make_idx_dataset(cache_dir / "raw" / "fashion-mnist", n_train=14)
    assert len(load_raw("fashion_mnist", cache_dir=cache_dir).train_x) == 14  # cache beats system
    make_idx_dataset(tmp_path / "env" / "fashion-mnist", n_train=16)
    monkeypatch.setenv("CHAINCOMP_DATA_DIR", str(tmp_path / "env"))
    assert len(load_raw("fashion_mnist", cache_dir=cache_dir).train_x) == 16  # env beats cache
    make_idx_dataset(tmp_path / "cfg", n_train=18)
    assert (
        len(load_raw("fashion_mnist", path=str(tmp_path / "cfg"), cache_dir=cache_dir).train_x)
        == 18
    )


def test_decoded_cache_skips_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_idx_dataset(tmp_path / "m")
    first = load_raw("mnist", path=str(root), cache_dir=tmp_path / "c")
    files = list((tmp_path / "c" / "decoded").glob("mnist-*.npz"))
    assert len(files) == 1

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("decoded again")

    monkeypatch.setattr(SOURCES["mnist"], "read", boom)
    second = load_raw("mnist", path=str(root), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(first.train_x, second.train_x)
    assert second.classes == first.classes
    monkeypatch.undo()
    files[0].write_bytes(b"garbage")  # a corrupt cache entry is rebuilt, not fatal
    third = load_raw("mnist", path=str(root), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(first.train_x, third.train_x)
    # changed source files give a new cache key
    make_idx_dataset(root, n_train=22)
    assert len(load_raw("mnist", path=str(root), cache_dir=tmp_path / "c").train_x) == 22


# published class counts (train, test) of the real files
KNOWN_COUNTS = {
    "mnist": (
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "fashion_mnist": ([6000] * 10, [1000] * 10),
}


@needs_shared
@pytest.mark.parametrize(
    "name,shape,classes", [("mnist", (28, 28, 1), 10), ("fashion_mnist", (28, 28, 1), 10)]
)
def test_real_idx_datasets_from_shared(name: str, shape: tuple[int, ...], classes: int) -> None:
    raw = load_raw(name)
    assert raw.train_x.shape == (60000, *shape) and raw.test_x.shape == (10000, *shape)
    assert len(raw.classes) == classes
    train_counts, test_counts = KNOWN_COUNTS[name]
    assert np.bincount(raw.train_y, minlength=classes).tolist() == train_counts
    assert np.bincount(raw.test_y, minlength=classes).tolist() == test_counts


# ----------------------------------------------------------------------- splits + tasks
def test_datamodule_split_is_seeded() -> None:
    dm = ChainDataModule(DataConfig(name="digits", val_size=0.2, split_seed=3))
    dm.setup()
    n_total = dm.split_size("train") + dm.split_size("val")
    assert n_total == 1797 - 359 and dm.split_size("test") == 359
    assert dm.split_size("val") == round(0.2 * n_total)
    dm2 = ChainDataModule(DataConfig(name="digits", val_size=0.2, split_seed=3))
    dm2.setup()
    x1 = next(iter(dm.loader("val", "cpu")))[0]
    x2 = next(iter(dm2.loader("val", "cpu")))[0]
    torch.testing.assert_close(x1, x2)
    dm3 = ChainDataModule(DataConfig(name="digits", val_size=0.2, split_seed=4))
    dm3.setup()
    assert not torch.equal(next(iter(dm3.loader("val", "cpu")))[0], x1)


def _indexed_raw(n_train: int = 300, n_test: int = 40) -> RawDataset:
    """A dataset whose every image is unique: its index in the training set is written into
    its first two pixels (so a split's samples name the training indices they came from)."""

    def images(n: int, offset: int) -> np.ndarray:
        x = np.zeros((n, 4, 4, 1), np.uint8)
        idx = np.arange(n) + offset
        x[:, 0, 0, 0], x[:, 0, 1, 0] = idx // 256, idx % 256
        return x

    return RawDataset(
        train_x=images(n_train, 0),
        train_y=np.arange(n_train) % 3,
        test_x=images(n_test, 5000),
        test_y=np.arange(n_test) % 3,
        classes=["a", "b", "c"],
    )


def _indices(dm: ChainDataModule, split: str) -> list[int]:
    assert dm._splits is not None
    x = dm._splits[split][0]  # the split's raw uint8 images (N, C, H, W)
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


@pytest.mark.parametrize("max_train", [None, 100])
def test_train_and_val_are_disjoint_and_cover_the_training_set(
    monkeypatch: pytest.MonkeyPatch, max_train: int | None
) -> None:
    import chaincomp.data.datamodule as datamodule

    raw = _indexed_raw()
    monkeypatch.setattr(datamodule, "load_raw", lambda *a, **k: raw)
    dm = ChainDataModule(
        DataConfig(name="digits", val_size=0.25, split_seed=5, max_train_samples=max_train)
    )
    dm.setup()
    train, val, test = _indices(dm, "train"), _indices(dm, "val"), _indices(dm, "test")
    assert len(set(train)) == len(train) and len(set(val)) == len(val)  # no sample twice
    assert not set(train) & set(val)
    assert len(val) == 75
    if max_train is None:
        assert sorted(train + val) == list(range(300))  # exactly the training set
    else:
        assert len(train) == max_train and set(train) < set(range(300)) - set(val)
    assert test == list(range(5000, 5040))  # the official test set, untouched
    # labels travel with their images
    for split, idx in (("train", train), ("val", val)):
        assert dm._splits is not None
        assert dm._splits[split][1].tolist() == [i % 3 for i in idx]


def test_eval_loader_covers_every_sample_once_and_train_drops_last() -> None:
    dm = ChainDataModule(DataConfig(name="digits", batch_size=100, eval_batch_size=50))
    dm.setup()
    n = dm.split_size("test")
    ys = torch.cat([y for _, y in dm.loader("test", "cpu")])
    assert len(ys) == n
    train = dm.loader("train", "cpu")
    assert len(train) == dm.split_size("train") // 100
    assert all(len(y) == 100 for _, y in train)


def test_normalisation_uses_train_statistics() -> None:
    dm = ChainDataModule(DataConfig(name="digits"))
    dm.setup()
    xs = torch.cat([x for x, _ in dm.loader("train", "cpu", train=False)])
    assert xs.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert xs.std().item() == pytest.approx(1.0, abs=1e-3)


def test_train_shuffle_is_reproducible_and_changes_each_pass() -> None:
    dm = ChainDataModule(DataConfig(name="digits", seed=7))
    loader = dm.loader("train", "cpu")
    a = [y for _, y in loader]
    b = [y for _, y in loader]
    assert not all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    again = ChainDataModule(DataConfig(name="digits", seed=7)).loader("train", "cpu")
    assert all(torch.equal(p, q) for p, q in zip(a, [y for _, y in again], strict=True))


def test_rotation_task_targets() -> None:
    dm = ChainDataModule(DataConfig(name="digits", task="rotation"))
    dm.setup()
    assert dm.num_outputs == 2 and dm.task.metric_name == "mae_deg"
    val_a = torch.cat([t for _, t in dm.loader("val", "cpu")])
    val_b = torch.cat([t for _, t in dm.loader("val", "cpu")])
    torch.testing.assert_close(val_a, val_b)  # fixed per sample
    assert val_a.abs().max() <= 1.0 and val_a.std() > 0.4  # U(-1, 1) in units of 45 degrees
    train = dm.loader("train", "cpu")
    first = torch.cat([t for _, t in train])
    second = torch.cat([t for _, t in train])
    assert not torch.allclose(first, second)  # redrawn every pass
    assert first.abs().max() <= 1.0


def test_rotate_is_a_real_rotation() -> None:
    img = torch.zeros(1, 1, 9, 9)
    img[0, 0, 1, 4] = 1.0  # a dot above the centre
    torch.testing.assert_close(rotate(img, torch.tensor([0.0])), img)
    quarter = rotate(img, torch.tensor([90.0]))
    assert quarter[0, 0].argmax().item() == 4 * 9 + 1  # counter-clockwise: now left of the centre
    torch.testing.assert_close(quarter, torch.rot90(img, 1, (2, 3)), atol=1e-5, rtol=0)


def test_task_names_are_validated() -> None:
    with pytest.raises(
        ConfigError, match="data.task: unknown task 'segment'; allowed: classify, rotation"
    ):
        make_task("segment")
    with pytest.raises(ConfigError, match="data.val_size"):
        DataConfig(val_size=0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"data.colour: unknown key; allowed: .*batch_size"):
        DataConfig.from_dict({"colour": 1})


def test_label_smoothing_moves_the_loss_minimum_to_the_smoothed_target() -> None:
    """With ``data.label_smoothing`` e the classification loss is minimal (zero gradient) where
    the softmax is (1 - e) on the label and e / K elsewhere, not at a one-hot softmax; with e = 0
    that point has a gradient pushing the label's logit up."""
    k, e = 10, 0.2
    target = torch.tensor([3, 7])
    smoothed = torch.full((2, k), e / k)
    smoothed[torch.arange(2), target] += 1 - e
    for ls, zero_grad in ((e, True), (0.0, False)):
        task = ChainDataModule(DataConfig(name="digits", label_smoothing=ls)).task
        logits = smoothed.log().clone().requires_grad_(True)
        task.loss(logits, target).backward()
        assert logits.grad is not None
        assert torch.allclose(logits.grad, torch.zeros_like(logits), atol=1e-6) is zero_grad
        if not zero_grad:
            assert (logits.grad[torch.arange(2), target] < -1e-3).all()


def test_label_smoothing_is_validated() -> None:
    for bad in (1.0, -0.1, "x", True):
        with pytest.raises(
            ConfigError, match=r"data.label_smoothing: .*allowed: a number in \[0, 1\)"
        ):
            DataConfig(label_smoothing=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.label_smoothing: .*0.0 with data.task=rotation"):
        make_task("rotation", label_smoothing=0.1)


# ------------------------------------------------------------------------- augmentation
def test_random_crop_is_a_shifted_window() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    out = Augment(crop_padding=2)(x, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        windows = [padded[b, :, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], w) for w in windows)


def test_flip_flips_about_half() -> None:
    x = torch.rand(400, 1, 4, 4)
    out = Augment(flip=True)(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(400)]
    kept = [torch.equal(out[i], x[i]) for i in range(400)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 150 < sum(flipped) < 250


def test_negative_padding_is_rejected() -> None:
    with pytest.raises(ConfigError, match="data.crop_padding"):
        Augment(crop_padding=-1)


def test_cutout_zeroes_one_clipped_square_at_a_uniform_centre() -> None:
    """Each image loses exactly one square (all channels), the window of a centre drawn over
    every pixel and clipped at the borders: on 8 pixels with side 4, the row windows are the 8
    below, and 2000 draws hit all of them."""
    x = torch.ones(2000, 3, 8, 8)
    out = Augment(cutout=4).cut(x.clone(), torch.Generator().manual_seed(0))
    windows = {(0, 2), (0, 3), (0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (5, 8)}
    seen_rows, seen_cols = set(), set()
    for img in out:
        hole = img == 0
        assert torch.equal(hole, hole[:1].expand_as(hole))  # all channels or none
        rows = hole[0].any(1).nonzero().flatten().tolist()
        cols = hole[0].any(0).nonzero().flatten().tolist()
        r, c = (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1)
        assert r in windows and c in windows and len(rows) == r[1] - r[0]
        expected = torch.zeros(8, 8, dtype=torch.bool)
        expected[r[0] : r[1], c[0] : c[1]] = True
        assert torch.equal(hole[0], expected)  # one full rectangle, nothing else
        assert torch.equal(img[~hole], torch.ones(int((~hole).sum())))
        seen_rows.add(r)
        seen_cols.add(c)
    assert seen_rows == windows and seen_cols == windows
    assert Augment(cutout=0).cut(x, torch.Generator()) is x and not Augment().active
    assert Augment(cutout=1).active
    # an odd side is centred on its pixel: side 3 on 8 pixels
    out = Augment(cutout=3).cut(torch.ones(2000, 1, 8, 8), torch.Generator().manual_seed(1))
    rows = {tuple(r.nonzero().flatten()[[0, -1]].tolist()) for r in (out[:, 0] == 0).any(2)}
    assert rows == {(0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 7)}


@pytest.mark.parametrize("task", ["classify", "rotation"])
def test_cutout_changes_only_its_square_in_training_batches(task: str) -> None:
    """The same seed with and without Cutout: the same crops, flips and task targets; the only
    difference is a square of zeros (the training mean) per image; evaluation batches are not
    cut."""
    batches = {}
    for cutout in (0, 3):
        cfg = DataConfig(name="digits", crop_padding=2, flip=True, cutout=cutout, task=task)
        dm = ChainDataModule(cfg)
        train = [(x.clone(), t.clone()) for x, t in dm.loader("train", "cpu")]
        val = [(x.clone(), t.clone()) for x, t in dm.loader("val", "cpu")]
        batches[cutout] = train, val
    (plain, plain_val), (cut, cut_val) = batches[0], batches[3]
    assert len(plain) == len(cut) > 1
    holes = 0
    for (xp, tp), (xc, tc) in zip(plain, cut, strict=True):
        assert torch.equal(tp, tc)
        assert torch.equal(torch.where(xc == 0, xp, xc), xp)  # differs only by zeros
        changed = (xc != xp).flatten(1).any(1)
        holes += int(changed.sum())
        assert ((xc == 0).flatten(1).sum(1) >= 4).all()  # at least a 2 x 2 corner of 3 x 3
    assert holes > 0.9 * sum(len(x) for x, _ in cut)
    for (xp, tp), (xc, tc) in zip(plain_val, cut_val, strict=True):
        assert torch.equal(xp, xc) and torch.equal(tp, tc)


def test_training_augment_is_scoped_to_its_block() -> None:
    """A step's Cutout holds inside the block only, also when the block fails; None keeps the
    data's own setting; a bad side is the data's one error."""
    dm = ChainDataModule(DataConfig(name="digits", cutout=2))
    with dm.training_augment(cutout=5):
        assert dm.loader("train", "cpu").augment.cutout == 5  # type: ignore[union-attr]
    assert dm.cfg.cutout == 2
    with pytest.raises(RuntimeError), dm.training_augment(cutout=0):
        assert dm.loader("train", "cpu").augment is None  # crop 0, no flip, no Cutout
        raise RuntimeError
    assert dm.cfg.cutout == 2
    with dm.training_augment(cutout=None):
        assert dm.cfg.cutout == 2
    with pytest.raises(ConfigError, match="data.cutout"), dm.training_augment(cutout=-1):
        pass
    assert dm.cfg.cutout == 2


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_cutout_is_one_error_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"data.cutout: .*allowed: an integer >= 0"):
        DataConfig(name="digits", cutout=value)  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_live_on_cuda() -> None:
    dm = ChainDataModule(
        DataConfig(name="digits", crop_padding=2, flip=True, cutout=3, task="rotation")
    )
    x, t = next(iter(dm.loader("train", "cuda")))
    assert x.is_cuda and t.is_cuda
    assert ((x == 0).flatten(1).sum(1) >= 4).all()  # each image cut (at least a 2 x 2 corner)


def test_decode_benchmark_script(tmp_path: Path) -> None:
    """benchmarks/decode_imagefolder.py reads an archive both ways and finds the same arrays."""
    import subprocess
    import sys

    tree = make_imagefolder(tmp_path / "t")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tf:
        tf.add(tree, arcname="t")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_imagefolder.py"
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(tmp_path / "t.tar.gz"),
            "--rounds",
            "2",
            "--workers",
            "2",
            "--chunk",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "18 images" in out and "decode workers: 2" in out
    assert "(identical arrays)" in out
