"""Cold equals warm: a chain resumed from any cached prefix is the chain run in one go.

For each order, the chain is run *cold* (no cache at all) and *warm* (its prefixes computed
first, by shorter chains, into a cache the chain then resumes from). Both must end with the same
state dict, the same ``requires_grad`` map, the same optimizer parameter groups in every
fine-tune after the cached prefix, and the same metrics and costs in every row. The replay of
the saved chain must give the same state and trainable map. CPU, deterministic.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from chaincomp.chain import CACHE_FORMAT, CacheStats, chain_spec, load_chain, prefix_keys, run_chain
from chaincomp.chain.cache import PrefixCache
from chaincomp.chain.result import METRIC_KEYS, ChainResult
from chaincomp.module import CompressibleModule
from chaincomp.pipeline import build_data, build_module, save_weights

from .conftest import compose_cfg
from .test_chain import FAST


@pytest.fixture(scope="module")
def baseline_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits baseline of FAST, trained once and loaded by every chain here."""
    out = tmp_path_factory.mktemp("baseline")
    summary = run_chain(compose_cfg(*FAST, "chain.order=[]", "chain.cache_dir=null"), out)
    return save_weights(summary.module.net, out / "baseline.pt")


@pytest.fixture
def optimizer_groups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[list[str]]]]:
    """Every ``configure_optimizers`` call records its parameter groups (by parameter name)."""
    calls: list[list[list[str]]] = []
    original = CompressibleModule.configure_optimizers

    def spy(self: CompressibleModule) -> Any:
        out = original(self)
        names = {id(p): n for n, p in self.named_parameters()}
        calls.append([[names[id(p)] for p in g["params"]] for g in out["optimizer"].param_groups])
        return out

    monkeypatch.setattr(CompressibleModule, "configure_optimizers", spy)
    yield calls


def _cfg(ckpt: Path, order: str, cache: Path | None, *extra: str) -> Any:
    return compose_cfg(
        *FAST,
        f"chain.baseline.checkpoint={ckpt}",
        f"chain.order=[{','.join(order)}]",
        f"chain.cache_dir={cache or 'null'}",
        *extra,
    )


def _trainable(module: CompressibleModule) -> list[str]:
    return [n for n, p in module.net.named_parameters() if p.requires_grad]


def _assert_same_state(a: CompressibleModule, b: CompressibleModule, what: str) -> None:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert list(sa) == list(sb), what
    diff = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not diff, f"{what}: tensors differ: {diff[:5]}"
    assert _trainable(a) == _trainable(b), f"{what}: requires_grad maps differ"


def _rows(result: ChainResult) -> list[dict[str, Any]]:
    return [{k: getattr(s, k) for k in METRIC_KEYS} for s in result.steps]


def _check_order(order: str, ckpt: Path, cache: Path, tmp: Path, groups: list, *extra: str) -> None:
    """Run ``order`` cold, then warm from the cache its prefixes were written into."""
    groups.clear()
    cold = run_chain(_cfg(ckpt, order, None, *extra), tmp / f"cold-{order}")
    cold_groups = list(groups)
    for k in range(1, len(order)):  # the prefixes, each resumed from the one before
        run_chain(_cfg(ckpt, order[:k], cache, *extra), tmp / f"warm-{order[:k]}")
    groups.clear()
    stats = CacheStats()
    warm = run_chain(_cfg(ckpt, order, cache, *extra), tmp / f"warm-{order}", stats=stats)
    assert stats.reused == len(order) - 1 and stats.executed == 1, order
    assert groups, f"{order}: the last step trained nothing"
    assert groups == cold_groups[-len(groups) :], f"{order}: optimizer parameter groups differ"
    _assert_same_state(cold.module, warm.module, order)
    assert _rows(cold) == _rows(warm), order
    cfg = _cfg(ckpt, order, None)
    replayed = load_chain(tmp / f"warm-{order}" / "chain", build_module(cfg, build_data(cfg)))
    _assert_same_state(cold.module, replayed, f"replay of {order}")


@pytest.mark.parametrize("first", "DPQE")
def test_cold_equals_warm_every_ordered_pair(
    first: str, baseline_ckpt: Path, tmp_path: Path, optimizer_groups: list
) -> None:
    for second in "DPQE".replace(first, ""):
        _check_order(first + second, baseline_ckpt, tmp_path / "cache", tmp_path, optimizer_groups)


def test_cold_equals_warm_when_fine_tunes_distil_from_the_baseline(
    baseline_ckpt: Path, tmp_path: Path, optimizer_groups: list
) -> None:
    """Cold, Q's teacher is the baseline kept from the run; warm, it is read from the cache."""
    kd = (
        "chain.steps.Q.settings.kd_alpha=0.5",
        "chain.steps.Q.settings.kd_teacher=baseline",
        "chain.steps.P.settings.kd_alpha=0.5",
    )
    for order in ("DQ", "PQ"):
        _check_order(order, baseline_ckpt, tmp_path / "cache", tmp_path, optimizer_groups, *kd)


@pytest.mark.slow
def test_cold_equals_warm_all_24_orders(
    baseline_ckpt: Path, tmp_path: Path, optimizer_groups: list
) -> None:
    for order in itertools.permutations("DPQE"):
        _check_order("".join(order), baseline_ckpt, tmp_path / "cache", tmp_path, optimizer_groups)


def test_entry_of_another_cache_version_is_recomputed(
    baseline_ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(baseline_ckpt, "PQ", cache)
    first = run_chain(cfg, tmp_path / "a")
    key = prefix_keys(cfg, chain_spec(cfg))[1]  # the entry after P
    path = cache / key / "entry.json"
    entry = json.loads(path.read_text())
    assert entry["version"] == CACHE_FORMAT
    entry["version"] = CACHE_FORMAT - 1  # as if an older format had written it
    path.write_text(json.dumps(entry))
    (cache / prefix_keys(cfg, chain_spec(cfg))[2]).rename(tmp_path / "moved")  # drop the PQ entry
    assert PrefixCache(cache).load(key) is None
    stats = CacheStats()
    with caplog.at_level("WARNING", logger="chaincomp.chain"):
        again = run_chain(cfg, tmp_path / "b", stats=stats)
    # the baseline entry is current and reused; P is recomputed (not loaded), then Q
    assert stats.stale == 1 and stats.reused == 0 and stats.executed == 2
    assert sum("another cache format or code version" in r.message for r in caplog.records) == 1
    assert json.loads(path.read_text())["version"] == CACHE_FORMAT  # replaced by a current one
    assert _rows(again) == _rows(first)  # recomputed deterministically


def test_entry_of_other_code_is_never_found(
    baseline_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import chaincomp.chain.cache as cache_mod

    cfg = _cfg(baseline_ckpt, "Q", tmp_path / "cache")
    keys = prefix_keys(cfg, chain_spec(cfg))
    monkeypatch.setattr(cache_mod, "code_fingerprint", lambda: "another-version")
    assert prefix_keys(cfg, chain_spec(cfg))[0] != keys[0]  # the key changes with the code
