"""Small shared helpers: atomic writes, tables (Markdown / CSV), headless plotting, seeding,
device selection."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chaincomp.errors import ChaincompError


def config_dir() -> Path:
    """``conf/`` shipped inside the package (wheel) or at the repository root (editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ChaincompError(f"config directory not found next to {here}")


def console() -> Any:
    """A rich console that does not truncate tables when stdout is a file or pipe."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` then rename the temp file onto ``path``.

    Readers never see a half-written file: either the old content or the complete new one.
    The file gets the permissions a plain ``open(path, "w")`` would (0666 less the umask), not
    the private 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def markdown_table(
    rows: Sequence[Mapping[str, Any]], keys: Sequence[str], cell: Callable[[Any], str] = str
) -> str:
    """A Markdown table of ``rows`` with columns ``keys`` (missing values empty)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> Path:
    """Atomically write ``rows`` as CSV with columns ``keys`` (other keys ignored)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return atomic_write(path, lambda p: p.write_text(buf.getvalue()))


def writable_dir(path: str | os.PathLike[str], key: str, allowed: str) -> Path:
    """Create ``path`` (a directory) if needed and prove a file can be written in it; else a
    one-line :class:`~chaincomp.errors.ConfigError` naming ``key``. Returns the path."""
    from chaincomp.errors import ConfigError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(key, f"cannot write in {str(path)!r} ({reason})", allowed) from None
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the headless Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as pretty JSON."""
    return atomic_write(
        path,
        lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default)),
    )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_HEAP_KEPT = False


def keep_freed_memory_in_heap() -> bool:
    """Make glibc's malloc keep freed memory in the process heap (``mallopt``: no ``mmap`` below
    1 GiB, no trimming below 2 GiB, 256 MiB of top padding), so that a training step's
    activation-sized tensors reuse the memory the previous step freed instead of faulting fresh
    pages in from the kernel (on 2 CPU cores that was about a tenth of a step). Process-wide and
    idempotent; the process keeps its peak heap instead of returning it. Returns whether the
    settings are in force (False where the C library is not glibc)."""
    global _HEAP_KEPT
    if _HEAP_KEPT:
        return True
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no tunable mallopt)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    _HEAP_KEPT = bool(
        mallopt(m_mmap_threshold, 1 << 30)
        and mallopt(m_trim_threshold, (1 << 31) - 1)
        and mallopt(m_top_pad, 256 << 20)
    )
    return _HEAP_KEPT
