"""Shared fixtures: offline data roots, an isolated cache, Hydra composition."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def compose_cfg(*overrides: str) -> DictConfig:
    """The config ``chaincomp`` would build for these overrides (no run directory)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def cfg_factory():  # type: ignore[no-untyped-def]
    return compose_cfg
