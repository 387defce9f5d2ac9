"""The prefix cache: the state after step k of a chain, named by a content hash.

A key hashes (data, model, optim, baseline training, seed, settings of steps 1..k) together with
:data:`CACHE_FORMAT` and :func:`code_fingerprint` (the source of every module that shapes a
trained state), so an entry written by another cache format or another version of the code is
never found under the current key. :meth:`PrefixCache.load` also checks the version and the
fingerprint written *in* the entry, and treats a mismatch as a miss (the prefix is recomputed and
the run says so once).

An entry is a directory ``<root>/<key>/`` with ``weights.pt`` (a state dict, loaded with
``weights_only=True``) and ``entry.json`` (records, rows, keys, the trainable-parameter map),
written to a temporary directory and renamed into place, so concurrent workers never see half an
entry.

Concurrent workers (a sweep's ``search.n_workers``) would otherwise train the same prefix each,
the baseline first: a process computing the state under a key holds that key's *compute lock*
(``<root>/<key>.lock``, :meth:`PrefixCache.claim`), and a chain whose next uncomputed prefix is
locked by a live process waits for it and then takes it from the cache. The lock saves work
only: correctness never depends on it (entries are written atomically, and a chain that cannot
take a lock computes the prefix itself, as it would without one).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from chaincomp.chain.spec import ChainSpec
from chaincomp.pipeline import config_section, optim_config, trainer_config
from chaincomp.stages import stages
from chaincomp.tracking import BOOT, HOST, local_process_gone
from chaincomp.utils import writable_dir

log = logging.getLogger("chaincomp.cache")

#: Layout of an entry (``entry.json`` keys and their meaning, records as typed, versioned JSON).
#: Bump on any change of layout.
CACHE_FORMAT = 3

# Modules whose code decides what a trained state is. Not here: report, search, tracking and
# the CLI (they read results, they do not make them).
_RESULT_CODE = (
    "chain",
    "cost",
    "data",
    "layers",
    "models",
    "stages",
    "module.py",
    "optim.py",
    "pipeline.py",
    "tasks.py",
    "utils.py",
)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """A hash of the source of every module that shapes a trained state (see ``_RESULT_CODE``)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    files = [
        f
        for part in _RESULT_CODE
        for f in (sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part])
    ]
    # stages defined outside the package (found through a conf/stage _target_) shape results too
    for cls in stages().values():
        source = inspect.getsourcefile(cls)
        if source and root not in Path(source).resolve().parents:
            files.append(Path(source).resolve())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class CacheStats:
    """How many stage executions a run (or a series of runs) did and skipped: ``executed``
    stage runs (the baseline not counted), ``reused`` steps taken from the cache,
    ``baselines_trained``, ``stale`` entries ignored, ``epochs`` of training spent (the
    baseline's and every executed step's) and ``waited_s``, seconds spent waiting for a prefix
    another process was computing."""

    executed: int = 0
    reused: int = 0
    baselines_trained: int = 0
    stale: int = 0
    epochs: int = 0
    executed_keys: list[str] = field(default_factory=list)
    waited_s: float = 0.0  # seconds spent waiting for prefixes other processes were computing


def _me() -> dict[str, Any]:
    """This process, as a compute lock records its holder."""
    return {"host": HOST, "boot": BOOT, "pid": os.getpid()}


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prefix_keys(cfg: DictConfig, spec: ChainSpec) -> list[str]:
    """Content hashes: [baseline, after step 1, ..., after step n]."""
    tcfg = trainer_config(cfg)
    base = {
        "cache_format": CACHE_FORMAT,
        "code": code_fingerprint(),
        "data": config_section(cfg, "data"),
        "model": config_section(cfg, "model"),
        "optim": dataclasses.asdict(optim_config(cfg)),
        "train": {
            "epochs": tcfg.max_epochs if spec.baseline_epochs is None else spec.baseline_epochs,
            "precision": tcfg.resolved_precision(),
            "limit_train_batches": tcfg.limit_train_batches,
            "gradient_clip_val": tcfg.gradient_clip_val,
            # kernel choices that round differently (the CPU ones count only on the CPU)
            "channels_last": tcfg.channels_last,
            "cpu_kernels": None
            if tcfg.uses_cuda
            else {"onednn": tcfg.cpu_onednn, "fast_batchnorm": tcfg.cpu_fast_batchnorm},
            # compiled kernels fuse and round differently; absent when off (a config
            # without the setting, such as an older run's, keys the same)
            **({"compile": tcfg.compile_mode} if tcfg.compile_mode else {}),
        },
        # the checkpoint's content, not its path: an overwritten file is another baseline
        "checkpoint": file_digest(spec.baseline_checkpoint) if spec.baseline_checkpoint else None,
        "seed": int(cfg.get("seed", 0)),
    }
    keys = [digest(base)]
    for step in spec.steps:
        content = {
            "prev": keys[-1],
            "stage": step.stage.name,
            "settings": step.settings.as_dict(),
        }
        keys.append(digest(content))
    return keys


def entry_version() -> dict[str, Any]:
    """What every entry written now carries (and what :meth:`PrefixCache.load` requires)."""
    return {"version": CACHE_FORMAT, "code": code_fingerprint()}


class PrefixCache:
    """Directory of chain states by prefix hash (see the module docstring)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root else None

    def path(self, key: str) -> Path | None:
        return self.root / key if self.root else None

    def check_writable(self, key: str = "chain.cache_dir") -> None:
        """Raise :class:`ConfigError` naming ``key`` when entries could not be stored (checked
        before anything trains; the cache turned off with null needs nothing)."""
        if self.root is not None:
            writable_dir(self.root, key, "a writable directory, or null to turn the cache off")

    def has(self, key: str) -> bool:
        p = self.path(key)
        return p is not None and (p / "entry.json").is_file() and (p / "weights.pt").is_file()

    def load(self, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The entry and weights under ``key``, or None when absent or written by another
        cache format or code version (such an entry is never used)."""
        if not self.has(key):
            return None
        p = self.path(key)
        assert p is not None
        entry = json.loads((p / "entry.json").read_text())
        found = {k: entry.get(k) for k in ("version", "code")}
        if found != entry_version():
            log.debug("stale cache entry %s: %s, now %s", key, found, entry_version())
            return None
        weights = torch.load(p / "weights.pt", map_location="cpu", weights_only=True)
        return entry, weights

    def store(self, key: str, entry: Mapping[str, Any], net: torch.nn.Module) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / key
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
            torch.save(state, tmp / "weights.pt")
            (tmp / "entry.json").write_text(json.dumps(entry, indent=1, default=float))
            if final.exists() and not self._current(final):
                shutil.rmtree(final, ignore_errors=True)  # a stale entry: replace it
            os.rename(tmp, final)
        except OSError:
            if not self.has(key):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- compute locks (module docstring) ------------------------------------------------------

    #: a lock of another host cannot be checked for a live holder: honoured this long at most
    FOREIGN_LOCK_S = 6 * 3600.0
    #: a lock file not yet readable (its holder is writing it) counts as held this long
    FRESH_LOCK_S = 10.0

    def _lock(self, key: str) -> Path | None:
        return self.root / f"{key}.lock" if self.root else None

    def holder(self, key: str) -> dict[str, Any] | None:
        """Who holds the compute lock of ``key`` (``host``, ``boot``, ``pid``), when a live
        process does: None when the key is unlocked or its holder is gone (a dead pid of this
        host and boot, another boot of this host, or a lock of another host older than
        :attr:`FOREIGN_LOCK_S`)."""
        path = self._lock(key)
        if path is None:
            return None
        try:
            age = time.time() - path.stat().st_mtime
            who = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written: held while fresh
            return {"host": HOST, "boot": BOOT, "pid": -1} if age < self.FRESH_LOCK_S else None
        if not isinstance(who, dict):
            return None
        if who.get("host") != HOST:
            return who if age < self.FOREIGN_LOCK_S else None
        if not isinstance(who.get("pid"), int):
            return None
        return None if local_process_gone(who.get("boot"), who["pid"]) else who

    def claim(self, key: str) -> bool:
        """Take the compute lock of ``key``: True when this process holds it now (also when it
        already did, or when the cache is off), False while another live process holds it. A
        lock whose holder is gone (:meth:`holder`) is replaced."""
        path = self._lock(key)
        if path is None:
            return True
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                who = self.holder(key)
                if who == me:
                    return True
                if who is not None:
                    return False
                path.unlink(missing_ok=True)  # its holder is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        return False

    @contextmanager
    def holding(self) -> Iterator[set[str]]:
        """A set for the keys whose locks a run takes (:meth:`claim`): every one still in it
        is released on leaving, whatever ends the run."""
        held: set[str] = set()
        try:
            yield held
        finally:
            for key in held:
                self.release(key)

    def release(self, key: str) -> None:
        """Drop this process's compute lock of ``key`` (nothing when it holds none)."""
        path = self._lock(key)
        if path is not None and self.holder(key) == _me():
            path.unlink(missing_ok=True)

    @staticmethod
    def _current(path: Path) -> bool:
        try:
            entry = json.loads((path / "entry.json").read_text())
        except (OSError, ValueError):
            return False
        return {k: entry.get(k) for k in ("version", "code")} == entry_version()
