"""The chain runner: baseline, then the steps in ``chain.order``, with a prefix cache.

``run_chain(cfg, output_dir)`` is what ``chaincomp run`` executes and what a search objective
calls. For a chain ``s_1 .. s_n`` the state after step k is named by a content hash of
(data, model, optim, baseline training, seed, settings of s_1..s_k). The runner starts from the
longest prefix already in the cache (loading it by *replay*: rebuild the structure from the
chain record, then load the weights with ``weights_only=True``) and computes the rest, storing
every new prefix. A cache entry is a directory ``<cache_dir>/<hash>/`` with ``weights.pt`` and
``entry.json`` (records and rows of every step so far), written to a temporary directory and
renamed into place, so concurrent workers never see half an entry.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from chaincomp.chain.cache import CacheStats, PrefixCache, entry_version, prefix_keys
from chaincomp.chain.preflight import preflight_chain
from chaincomp.chain.replay import replay, replay_info, save_chain, trainable_names
from chaincomp.chain.result import METRIC_KEYS, ChainResult, from_rows
from chaincomp.chain.spec import chain_spec
from chaincomp.console import StepProgressBar
from chaincomp.errors import ChaincompError, ConfigError
from chaincomp.pipeline import (
    build_data,
    build_module,
    config_section,
    fine_tuner,
    measure,
    trainer_config,
)
from chaincomp.stages import StageContext, StageRecord, record_from_json, stage_class
from chaincomp.tracking import MlflowMetricsCallback, NullTracker, Run, Tracker
from chaincomp.utils import seed_everything

log = logging.getLogger("chaincomp.chain")

#: seconds between two looks at a prefix another process is computing
LOCK_POLL_S = 0.5


def run_chain(
    cfg: DictConfig,
    output_dir: str | Path,
    tracker: Tracker | NullTracker | None = None,
    parent: Run | None = None,
    stats: CacheStats | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[str | None], None] | None = None,
) -> ChainResult:
    """Run ``cfg.chain`` on ``cfg.data`` x ``cfg.model``; returns its :class:`ChainResult`
    (with the final ``module``), also written as ``summary.json``, and the replayable chain
    ``chain/`` (entry.json + weights.pt) into ``output_dir``; ``chain/`` is also the chain run's
    artifact of that name (the compressed network, for :func:`~chaincomp.chain.load_chain`).

    MLflow: one run for the chain (child of ``parent`` when given), one child per step (the
    baseline included; a step taken from the cache is tagged ``chaincomp.cached=true``).
    ``on_step(row)`` is called after every step (the search uses it to report progress);
    ``on_start(run_id)`` once the chain's MLflow run exists (the search records it at once, so
    that a killed worker's runs can be closed).
    """
    spec = chain_spec(cfg)
    tracker = tracker or NullTracker()
    stats = stats if stats is not None else CacheStats()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    seed_everything(seed)
    tcfg = trainer_config(cfg)
    dm = build_data(cfg)
    module = build_module(cfg, dm)
    device = torch.device("cuda" if tcfg.uses_cuda else "cpu")
    module.to(device)
    keys = prefix_keys(cfg, spec)
    cache = PrefixCache(spec.cache_dir)
    cache.check_writable()
    entry: dict[str, Any] = {
        **entry_version(),
        "data": {
            "name": dm.cfg.name,
            "task": dm.task.name,
            "in_channels": dm.in_channels,
            "num_outputs": dm.num_outputs,
            "image_size": list(dm.image_size),
        },
        "model": config_section(cfg, "model"),
        "records": [],
        "rows": [],
        "keys": [],
    }
    # the dry pass (no training): bad settings stop here; the student built for the check
    # must not move the seeded RNG the baseline's training draws from
    with torch.random.fork_rng(devices=[]):
        preflight_chain(spec.steps, module.net, dict(entry["model"]), replay_info(entry))
        if spec.baseline_checkpoint:  # readable and of this architecture (checked on a copy)
            load_checkpoint(spec.baseline_checkpoint, copy.deepcopy(module.net))
    if parent is None:
        tracker.reap_dead()  # runs a killed predecessor left RUNNING
    name = run_name or f"chain {spec.letters or 'baseline'}"
    all_tags = {"chaincomp.command": "run", "chaincomp.order": spec.letters, **(tags or {})}
    with (
        tracker.run(name=name, parent=parent, tags=all_tags) as chain_run,
        cache.holding() as held,
    ):
        if on_start:
            on_start(chain_run.run_id)
        chain_run.log_params(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        chain_run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")

        def fine_tune(run: Run, prefix: str, label: str) -> Callable[..., float]:
            bar = [StepProgressBar(f"{name} · {label}")] if tcfg.enable_progress_bar else []
            return fine_tuner(dm, tcfg, [MlflowMetricsCallback(run, prefix), *bar])

        # the baseline, for steps that distil their fine-tune from it (kd_teacher: baseline):
        # kept once trained or loaded here, else read from its cache entry
        needs_baseline = any(getattr(st.settings, "uses_baseline", False) for st in spec.steps)
        kept: dict[str, torch.nn.Module] = {}

        def baseline_net() -> torch.nn.Module:
            if "net" not in kept:
                found0 = cache.load(keys[0]) if cache.has(keys[0]) else None
                if found0 is None:
                    raise ChaincompError(
                        "a step distils from the chain's baseline, which is neither trained in "
                        f"this run nor in the prefix cache ({spec.cache_dir}): run it with "
                        "chain.cache_dir=null, or without deleting cache entries"
                    )
                base, weights = found0
                net = replay_info(base).build(base["model"])
                net.load_state_dict(weights, strict=True)
                kept["net"] = net
            return kept["net"]

        # another process computing this chain's next uncached prefix (a sweep's worker): wait
        # for it, then take that prefix from the cache (module docstring of chain.cache)
        _wait_for_others(cache, keys, held, stats, name)
        # the longest cached prefix (index into keys); -1 = nothing, not even the baseline
        start, found, stale_before = -1, None, stats.stale
        for k in range(len(keys) - 1, -1, -1):
            if cache.has(keys[k]):
                found = cache.load(keys[k])
                if found is None:  # written by another cache format or code version
                    stats.stale += 1
                    continue
                start = k
                break
        if stats.stale > stale_before:
            log.warning(
                "%d cached prefix(es) of this chain were written by another cache format or code "
                "version: ignored, recomputed and replaced",
                stats.stale - stale_before,
            )
        if found is not None:
            cached, weights = found
            for row in cached["rows"]:
                row["cached"] = True
            entry.update(
                records=cached["records"],
                rows=cached["rows"],
                keys=cached["keys"],
                trainable=cached["trainable"],
            )
            replay(entry, weights, module)
            module.to(device)
            if needs_baseline and start == 0:
                kept["net"] = copy.deepcopy(module.net)
            stats.reused += start
            log.info(
                "%s: baseline%s from the cache",
                name,
                f" and steps 1-{start}" if start > 0 else "",
            )
        for k, row in enumerate(entry["rows"]):
            label = "baseline" if k == 0 else f"{k}:{row['name']}"
            with tracker.run(
                name=label,
                parent=chain_run,
                tags={"chaincomp.cached": "true", "chaincomp.cache_key": keys[k]},
            ) as r:
                r.log_metrics(_numeric(row))
            if on_step:
                on_step(row)

        records = [record_from_json(r) for r in entry["records"]]
        model_cfg = entry["model"]
        for rec in records:
            model_cfg = rec.net_config() or model_cfg
        for k in range(start + 1, len(keys)):
            t0 = time.perf_counter()
            if cache.claim(keys[k]):  # held already, unless a stale entry moved the start
                held.add(keys[k])
            if k == 0:
                label = "baseline"
                with tracker.run(
                    name=label,
                    parent=chain_run,
                    tags={"chaincomp.cached": "false", "chaincomp.cache_key": keys[0]},
                ) as run:
                    epochs = (
                        tcfg.max_epochs if spec.baseline_epochs is None else spec.baseline_epochs
                    )
                    if spec.baseline_checkpoint:
                        load_checkpoint(spec.baseline_checkpoint, module.net)
                        train_time = 0.0
                    else:
                        train_time = fine_tune(run, "baseline/", "baseline")(module, epochs)
                        stats.baselines_trained += 1
                        stats.epochs += epochs
                    t_eval = time.perf_counter()
                    measured = measure(module, dm)
                    row = {
                        "name": "baseline",
                        "stage": "baseline",
                        **measured,
                        "train_time_s": train_time,
                        "eval_time_s": time.perf_counter() - t_eval,
                        "cached": False,
                    }
                    run.log_metrics(_numeric(row))
                    if needs_baseline:
                        kept["net"] = copy.deepcopy(module.net)
            else:
                step = spec.steps[k - 1]
                stage = step.make()
                label = f"{k}:{step.name}"
                with tracker.run(
                    name=label,
                    parent=chain_run,
                    tags={
                        "chaincomp.cached": "false",
                        "chaincomp.cache_key": keys[k],
                        "chaincomp.stage": stage.name,
                    },
                ) as run:
                    ctx = StageContext(
                        dm=dm,
                        fit=fine_tune(
                            run,
                            f"{stage.name}/",
                            f"step {k}/{len(spec.steps)} {step.name} ({stage.name})",
                        ),
                        records=list(records),
                        model_cfg=model_cfg,
                        seed=seed,
                        baseline=baseline_net,
                    )
                    seed_everything(seed + k)
                    record = stage.run(module, ctx)
                    model_cfg = ctx.model_cfg
                    ctx.records.append(record)
                    amendments = later_effects(ctx, record, module)
                    module.to(device)
                    t_eval = time.perf_counter()
                    measured = measure(module, dm)
                    row = {
                        "name": step.name,
                        "stage": stage.name,
                        **measured,
                        "train_time_s": record.train_time_s,
                        "eval_time_s": time.perf_counter() - t_eval,
                        "cached": False,
                        **{f"{stage.name}.{key}": v for key, v in stage.summary().items()},
                    }
                    records += [record, *amendments]
                    entry["records"] = [r.to_json() for r in records]
                    run.log_params({"stage": stage.name, **stage.settings.as_dict()})
                    run.log_metrics(_numeric(row))
                    run.log_text(
                        json.dumps(
                            [r.to_json() for r in [record, *amendments]], indent=1, default=float
                        ),
                        "record.json",
                    )
                    stats.executed += 1
                    stats.epochs += int(stage.settings.epochs)
                    stats.executed_keys.append(keys[k])
            row["time_s"] = time.perf_counter() - t0
            row["other_time_s"] = row["time_s"] - row["train_time_s"] - row["eval_time_s"]
            log.info(
                "%s: %s: val %s %.2f, %.1fx fewer BitOps, %.1f s (fit %.1f, eval %.1f, other %.1f)",
                name,
                "baseline"
                if k == 0
                else f"step {k}/{len(spec.steps)} {row['name']} ({row['stage']})",
                dm.task.metric_name,
                row["val_metric"],
                entry["rows"][0]["bitops"] / max(row["bitops"], 1e-12) if entry["rows"] else 1.0,
                row["time_s"],
                row["train_time_s"],
                row["eval_time_s"],
                row["other_time_s"],
            )
            entry["rows"].append(row)
            entry["keys"].append(keys[k])
            entry["trainable"] = trainable_names(module.net)
            cache.store(keys[k], entry, module.net)
            # hand over hand: the next prefix is ours before this one is free, so a process
            # waiting on this one then waits on the next (if its chain goes on the same way)
            if k + 1 < len(keys) and cache.claim(keys[k + 1]):
                held.add(keys[k + 1])
            cache.release(keys[k])
            held.discard(keys[k])
            if on_step:
                on_step(row)

        result = from_rows(
            entry["rows"],
            task=dm.task.name,
            metric_name=dm.task.metric_name,
            higher_is_better=dm.task.higher_is_better,
            chain=spec.name,
            order=spec.order,
            letters=spec.letters,
            records=entry["records"],
            mlflow_run_id=chain_run.run_id,
            module=module,
        )
        save_chain(out / "chain", entry, module.net)
        result.save(out / "summary.json")
        chain_run.log_metrics(
            {
                **{k: getattr(result.last, k) for k in METRIC_KEYS},
                "bitops_ratio": result.bitops_ratio,
                "val_bitops_ratio": result.val_bitops_ratio,
                "macs_ratio": result.macs_ratio,
                "metric_delta": result.metric_delta,
                "val_metric_delta": result.val_metric_delta,
            }
        )
        chain_run.log_artifact(out / "summary.json")
        chain_run.log_artifact(out / "chain" / "entry.json")
        # the compressed network: download chain/ and chaincomp.chain.load_chain reads it
        chain_run.log_artifact(out / "chain" / "entry.json", "chain")
        chain_run.log_artifact(out / "chain" / "weights.pt", "chain")
    return result


def _wait_for_others(
    cache: PrefixCache, keys: list[str], held: set[str], stats: CacheStats, name: str
) -> None:
    """Until this process holds the compute lock of the chain's next uncached prefix (or the
    whole chain is cached): while another live process holds it, wait (polling every
    :data:`LOCK_POLL_S`); the prefix it computes is then in the cache."""
    t0, said = time.perf_counter(), False
    while True:
        nxt = next((k for k in range(len(keys) - 1, -1, -1) if cache.has(keys[k])), -1) + 1
        if nxt >= len(keys) or cache.claim(keys[nxt]):
            if nxt < len(keys):
                held.add(keys[nxt])
            break
        if not said:
            who = cache.holder(keys[nxt]) or {}
            log.info(
                "%s: waiting for %s, which process %s on %s is computing",
                name,
                "the baseline" if nxt == 0 else f"step {nxt}",
                who.get("pid"),
                who.get("host"),
            )
            said = True
        time.sleep(LOCK_POLL_S)
    if said:
        waited = time.perf_counter() - t0
        stats.waited_s += waited
        log.info("%s: waited %.1f s", name, waited)


def load_checkpoint(path: str, net: torch.nn.Module) -> None:
    """Load the baseline state dict ``path`` into ``net`` (strictly); a file that is not a
    state dict, or one of another architecture, is one :class:`ConfigError` naming
    ``chain.baseline.checkpoint``."""
    key, allowed = (
        "chain.baseline.checkpoint",
        "a state dict saved by `chaincomp train` (baseline.pt) for this model",
    )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(
            key, f"{path!r} is not a readable state dict ({reason})", allowed
        ) from None
    if not isinstance(state, Mapping):
        raise ConfigError(
            key, f"{path!r} holds a {type(state).__name__}, not a state dict", allowed
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        own = net.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        detail = "; ".join(
            f"{what} {len(keys)} (e.g. {keys[0]})"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("other shape", shapes),
            )
            if keys
        )
        raise ConfigError(
            key, f"{path!r} does not fit {type(net).__name__}: {detail}", allowed
        ) from None


def later_effects(ctx: StageContext, record: StageRecord, module: Any) -> list[StageRecord]:
    """After a step: every *other* record in force reacts (:meth:`Stage.after_step`: an exit
    threshold is re-chosen, quantization records the layers it took in); returns the
    amendment records, which are replayed right after the step's record."""
    out = []
    for rec in ctx.in_force():
        if rec is not record:
            amendment = stage_class(rec.stage).after_step(rec, module, ctx)
            if amendment is not None:
                out.append(amendment)
    return out


def _numeric(row: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[k] = float(v)
    return out
