"""Shared fixtures: offline data roots, an isolated cache, Hydra composition."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Triton (where installed) runs kernels on the CPU in tests: it reads this when first imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def _shared_datasets() -> Path | None:
    for candidate in (os.environ.get("CHAINCOMP_DATA_DIR"), REPO.parent / "shared" / "datasets"):
        if candidate and (Path(candidate) / "mnist").is_dir():
            return Path(candidate)
    return None


SHARED = _shared_datasets()
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="../shared/datasets (CHAINCOMP_DATA_DIR) not present"
)


@pytest.fixture(scope="session", autouse=True)
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test touches the network or the user's cache; shared data is the data root."""
    old = dict(os.environ)
    os.environ["CHAINCOMP_OFFLINE"] = "1"
    os.environ["CHAINCOMP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    if SHARED is not None:
        os.environ["CHAINCOMP_DATA_DIR"] = str(SHARED)
    yield
    os.environ.clear()
    os.environ.update(old)


def chaincomp_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``chaincomp <args>`` in a fresh interpreter (``python -m chaincomp.cli``), in ``cwd``, with
    this environment plus ``env``; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "chaincomp.cli", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def compose_cfg(*overrides: str) -> DictConfig:
    """The config ``chaincomp`` would build for these overrides (no run directory)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():  # type: ignore[no-untyped-def]
    return compose_cfg


QUIET = ("trainer.enable_progress_bar=false", "tracking.enabled=false")


@pytest.fixture(scope="session")
def digits_base():  # type: ignore[no-untyped-def]
    """(cfg, dm, trained net) on digits with a half-width SmallCNN, trained once per session,
    seeded: the same net in every process, whichever tests run."""
    from chaincomp.pipeline import build_data, build_module, fit, trainer_config
    from chaincomp.utils import seed_everything

    seed_everything(0)
    cfg = compose_cfg(
        "data=digits", "model=small_cnn", "model.width_mult=0.5", "trainer.max_epochs=4", *QUIET
    )
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    fit(module, dm, trainer_config(cfg))
    return cfg, dm, module.net


@pytest.fixture
def digits_module(digits_base):  # type: ignore[no-untyped-def]
    """A fresh CompressibleModule around a copy of the session's trained digits net; the
    global generators are seeded, so what a test draws (new heads, a student) does not depend
    on the tests that ran before it."""
    import copy

    from chaincomp.pipeline import build_module
    from chaincomp.utils import seed_everything

    cfg, dm, net = digits_base
    seed_everything(1)
    return build_module(cfg, dm, copy.deepcopy(net))


def make_ctx(cfg, dm, records=None, max_batches=None):  # type: ignore[no-untyped-def]
    """A StageContext whose fit runs a real Trainer.fit (optionally on a few batches)."""
    import dataclasses

    from omegaconf import OmegaConf

    from chaincomp.pipeline import fine_tuner, trainer_config
    from chaincomp.stages import StageContext

    tcfg = trainer_config(cfg)
    if max_batches is not None:
        tcfg = dataclasses.replace(tcfg, limit_train_batches=max_batches)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return StageContext(
        dm=dm, fit=fine_tuner(dm, tcfg), records=list(records or []), model_cfg=model_cfg
    )
