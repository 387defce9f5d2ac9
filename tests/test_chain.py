"""The chain runner: config validation, summary, prefix cache (counted), replay, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chaincomp.chain import (
    CacheStats,
    ChainResult,
    chain_spec,
    load_chain,
    prefix_keys,
    run_chain,
)
from chaincomp.cost import count_cost
from chaincomp.errors import ConfigError
from chaincomp.pipeline import build_data, build_module, measure

from .conftest import QUIET, compose_cfg

FAST = (
    "data=digits",
    "model=small_cnn",
    "model.width_mult=0.5",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "chain.steps.D.settings.epochs=1",
    "chain.steps.P.settings.epochs=1",
    "chain.steps.Q.settings.epochs=1",
    "chain.steps.E.settings.epochs=1",
    "chain.steps.Q.settings.calib_batches=2",
    *QUIET,
)


# enough training on digits that every order ends with a working classifier
SLOW = (
    "trainer.limit_train_batches=null",
    "trainer.max_epochs=8",
    "chain.steps.D.settings.epochs=15",
    "chain.steps.P.settings.epochs=3",
    "chain.steps.Q.settings.epochs=3",
    "chain.steps.E.settings.epochs=2",
)


def _cfg(tmp_path: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return compose_cfg(*FAST, f"chain.cache_dir={tmp_path / 'cache'}", *overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("chain.order=[D,X]", "chain.order"),
        ("chain.steps.P.settings.ratio=1.5", "chain.steps.P.settings.ratio"),
        ("chain.steps.Q.settings.w_bits=0", "chain.steps.Q.settings.w_bits"),
        ("+chain.steps.P.settings.speed=3", "chain.steps.P.settings.speed"),
        ("chain.steps.E.stage=exit", "chain.steps.E.stage"),
        ("chain.baseline.epochs=-2", "chain.baseline.epochs"),
    ],
)
def test_bad_chain_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": "):
        chain_spec(compose_cfg(override))


def test_prefix_keys_depend_on_content_not_names(tmp_path: Path) -> None:
    a = prefix_keys(_cfg(tmp_path), chain_spec(_cfg(tmp_path)))
    b = prefix_keys(
        _cfg(tmp_path, "chain.order=[D,P,E,Q]"), chain_spec(_cfg(tmp_path, "chain.order=[D,P,E,Q]"))
    )
    assert a[:3] == b[:3] and a[3] != b[3]
    c = _cfg(tmp_path, "chain.steps.Q.settings.w_bits=4")  # the default value: same key
    assert prefix_keys(c, chain_spec(c)) == a
    d = _cfg(tmp_path, "chain.steps.P.settings.ratio=0.4")
    assert prefix_keys(d, chain_spec(d))[:2] == a[:2] and prefix_keys(d, chain_spec(d))[2] != a[2]
    # a step's own Cutout keeps the baseline and the steps before it; data.cutout is the
    # baseline's (every key changes)
    f = _cfg(tmp_path, "chain.steps.P.settings.cutout=8")
    assert prefix_keys(f, chain_spec(f))[:2] == a[:2] and prefix_keys(f, chain_spec(f))[2] != a[2]
    g = _cfg(tmp_path, "data.cutout=8")
    assert all(x != y for x, y in zip(prefix_keys(g, chain_spec(g)), a, strict=True))
    # kernels that round differently train another baseline on the CPU
    for kernel in ("channels_last", "cpu_onednn", "cpu_fast_batchnorm"):
        e = _cfg(tmp_path, f"trainer.{kernel}=false")
        assert prefix_keys(e, chain_spec(e))[0] != a[0], kernel


def test_chain_runs_caches_and_replays(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "chain.order=[P,Q,E]", "chain.steps.E.settings.max_loss=3.0")
    stats = CacheStats()
    result = run_chain(cfg, tmp_path / "run1", stats=stats)
    assert stats.executed == 3 and stats.baselines_trained == 1
    assert result.order == ("P", "Q", "E") and result.letters == "PQE"
    assert [s.name for s in result.steps] == ["baseline", "P", "Q", "E"]
    assert [s.stage for s in result.steps[1:]] == ["prune", "quantize", "early_exit"]
    assert result.task == "classify" and result.higher_is_better
    assert [r["stage"] for r in result.records][:3] == ["prune", "quantize", "early_exit"]
    assert result.bitops_ratio > 64  # 4/4-bit inner layers after pruning
    # summary.json is the whole result: read back, it equals what run_chain returned
    assert ChainResult.load(tmp_path / "run1" / "summary.json") == result

    # the same chain again: nothing is executed, every step comes from the cache
    stats2 = CacheStats()
    again = run_chain(cfg, tmp_path / "run2", stats=stats2)
    assert stats2.executed == 0 and stats2.reused == 3 and stats2.baselines_trained == 0
    assert all(s.cached for s in again.steps)

    # replay from the saved chain: identical outputs, and the replayed net *re-measured* (a
    # fresh evaluation and cost count, not the stored numbers) gives the stored last row
    module = result.module
    dm = build_data(cfg)
    fresh = load_chain(tmp_path / "run1" / "chain", build_module(cfg, dm))
    x, _ = next(iter(dm.loader("test", "cpu")))
    module.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(module(x), fresh(x))
    row = measure(fresh, dm)
    for key in ("val_metric", "test_metric", "bitops", "val_bitops", "macs", "params"):
        assert row[key] == getattr(again.last, key) == getattr(result.last, key), key
    # the ratio against an independent count: the baseline net rebuilt and counted afresh
    base_net = build_module(cfg, dm).net
    base_bitops = count_cost(base_net, dm.example_input(1)).bitops
    assert result.bitops_ratio == pytest.approx(base_bitops / row["bitops"], rel=1e-12)


def _orders_execution_count(
    tmp_path: Path, letters: str, *overrides: str
) -> tuple[int, int, list[ChainResult]]:
    stats = CacheStats()
    summaries = []
    for i, order in enumerate(itertools.permutations(letters)):
        cfg = _cfg(tmp_path, *overrides, f"chain.order=[{','.join(order)}]")
        summaries.append(
            dataclasses.replace(run_chain(cfg, tmp_path / f"o{i}", stats=stats), module=None)
        )
    return stats.executed, stats.baselines_trained, summaries


def test_prefix_cache_runs_each_distinct_prefix_once(tmp_path: Path) -> None:
    # 6 orders of {P, Q, E}: 18 stage steps, 3 + 6 + 6 = 15 distinct prefixes
    executed, baselines, summaries = _orders_execution_count(tmp_path, "PQE")
    assert executed == 15 and baselines == 1
    assert all(s.bitops_ratio > 1 for s in summaries)


def _chain_after_barrier(cfg, out: str, barrier, queue) -> None:  # type: ignore[no-untyped-def]
    """A worker of the test below: run the chain once every worker is ready; put its stats."""
    stats = CacheStats()
    barrier.wait(timeout=120)
    run_chain(cfg, out, stats=stats)
    queue.put((stats.baselines_trained, stats.executed, stats.waited_s))


def test_concurrent_chains_train_a_shared_prefix_once(tmp_path: Path) -> None:
    # two processes start P->Q and P->E at the same moment on one cache: without the compute
    # lock both train the baseline and P; with it one waits and takes both from the cache
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(
            target=_chain_after_barrier,
            args=(_cfg(tmp_path, f"chain.order=[P,{last}]"), str(tmp_path / last), barrier, queue),
        )
        for last in ("Q", "E")
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert sum(r[0] for r in results) == 1  # one baseline trained, not two
    assert sum(r[1] for r in results) == 3  # P once, then Q and E: 3 stage runs, not 4
    assert sorted(r[2] > 0 for r in results) == [False, True]  # exactly one waited
    assert not list((tmp_path / "cache").glob("*.lock"))  # every lock released


def test_compute_lock_follows_its_holder(tmp_path: Path) -> None:
    import os

    from chaincomp.chain.cache import PrefixCache
    from chaincomp.tracking import BOOT, HOST

    cache, key = PrefixCache(tmp_path), "k" * 20
    code = (
        "import sys, time; from chaincomp.chain.cache import PrefixCache; "
        "print(PrefixCache(sys.argv[1]).claim(sys.argv[2]), flush=True); time.sleep(120)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), key], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "True"
        assert not cache.claim(key)  # a live process holds it
        assert cache.holder(key) == {"host": HOST, "boot": BOOT, "pid": child.pid}
        cache.release(key)  # not ours: stays
        assert cache.holder(key) is not None
    finally:
        child.kill()
        child.wait()
    assert cache.holder(key) is None  # its holder died: free, and taken over
    assert cache.claim(key) and cache.claim(key)  # held, and re-entrant
    cache.release(key)
    assert not (tmp_path / f"{key}.lock").exists()
    # another boot of this host: gone; another host: honoured until FOREIGN_LOCK_S old
    lock = tmp_path / f"{key}.lock"
    lock.write_text(json.dumps({"host": HOST, "boot": "another-boot", "pid": os.getpid() + 1}))
    assert BOOT == "" or cache.holder(key) is None
    lock.write_text(json.dumps({"host": "elsewhere", "boot": "b", "pid": 1}))
    assert not cache.claim(key)
    old = lock.stat().st_mtime - PrefixCache.FOREIGN_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cache.claim(key)
    # a lock file still being written counts as held while fresh
    cache.release(key)
    lock.write_text("")
    assert not cache.claim(key)
    old = lock.stat().st_mtime - PrefixCache.FRESH_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cache.claim(key)
    # the cache turned off: nothing to lock
    assert PrefixCache(None).claim(key) and PrefixCache(None).holder(key) is None


@pytest.mark.slow
def test_all_24_orders_on_digits(tmp_path: Path) -> None:
    # 24 orders of {D, P, Q, E}: 96 stage steps, 4 + 12 + 24 + 24 = 64 distinct prefixes. Every
    # order must end far above chance (10 %); QEDP and EQDP end near 61 %: pruning half of a
    # quarter-width 4-bit student is the order effect the study is about
    executed, baselines, summaries = _orders_execution_count(tmp_path, "DPQE", *SLOW)
    assert executed == 64 and baselines == 1
    assert len({s.letters for s in summaries}) == 24
    for s in summaries:
        assert s.bitops_ratio > 50 and s.last.test_metric > 50, (s.letters, s.last.test_metric)


def test_cli_run_writes_summary_and_prints_table(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "chaincomp.cli",
        "run",
        *FAST,
        "chain.order=[Q,E]",
        f"chain.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["order"] == ["Q", "E"] and len(summary["stages"]) == 2
    assert "BitOps reduction" in res.stdout and "quantize" in res.stdout
    assert (tmp_path / "out" / "chain" / "weights.pt").is_file()


def test_cli_run_rejects_an_unknown_step(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "chaincomp.cli",
        "run",
        *FAST,
        "chain.order=[Q,Z]",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert "chain.order: unknown step 'Z'; allowed: D, E, L, P, Q" in res.stderr
    assert not (tmp_path / "out" / "summary.json").exists()  # stopped before any training


def test_each_step_says_where_its_time_went(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit / evaluation / other seconds per step: a slow evaluation shows up as eval time, not
    as other time, and the three parts make up the step's wall time."""
    import time

    import chaincomp.chain.runner as runner

    real = runner.measure

    def slow_measure(*args, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(2.0)  # long against other work, even on a loaded 2-core machine
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "measure", slow_measure)
    result = run_chain(_cfg(tmp_path, "chain.order=[P]"), tmp_path / "run")
    for step in result.steps:
        assert step.eval_time_s >= 2.0 and 0 <= step.other_time_s < 2.0, step
        assert step.train_time_s > 0
        parts = step.train_time_s + step.eval_time_s + step.other_time_s
        assert parts == pytest.approx(step.time_s, rel=1e-9)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"train_time_s", "eval_time_s", "other_time_s", "time_s"} <= set(saved["stages"][0])


def test_a_stage_trained_in_phases_logs_one_point_per_epoch_in_order(tmp_path: Path) -> None:
    """D after Q trains twice (float warm-up, then calibrated and quantized): MLflow gets one
    ``distill/val/accuracy`` point per epoch at steps 0..epochs-1 (the two fits used to both
    log at steps 0.., so the curve came back interleaved)."""
    from mlflow import MlflowClient

    db = tmp_path / "m.db"
    cfg = _cfg(
        tmp_path,
        "chain.order=[Q,D]",
        "chain.steps.D.settings.epochs=4",  # quant_warmup 0.5: two fits of 2 epochs
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{db}",
    )
    from chaincomp.pipeline import tracking_config
    from chaincomp.tracking import Tracker

    run_chain(cfg, tmp_path / "run", tracker=Tracker(tracking_config(cfg)))
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (d_run,) = [
        r
        for r in client.search_runs([exp.experiment_id])
        if r.data.tags.get("chaincomp.stage") == "distill"
    ]
    history = client.get_metric_history(d_run.info.run_id, "distill/val/accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
