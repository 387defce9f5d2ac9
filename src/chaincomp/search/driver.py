"""``chaincomp sweep``: an Optuna study over chain orders and stage hyperparameters.

This module drives the sweep: :func:`sweep` creates or resumes the study, checks that its fixed
settings (orders, objective, parameter names) did not change, and runs :func:`work` in one
process or ``n_workers`` spawned processes; every worker reaps stale trials and runs trials until
``n_trials`` are counted or the timeout passes. The parts: the config (:mod:`.config`), the
storage and stale trials (:mod:`.storage`), the sampler (:mod:`.samplers`), one trial
(:mod:`.objective`) and the Pareto front (:mod:`.front`).

MLflow: a parent run for the sweep (reused on resume), a child run per trial (the chain), a
grandchild per step; trial number and run id are cross-referenced (trial user attr
``mlflow_run_id``; run tags ``optuna.trial`` / ``optuna.study``). The Pareto front is written as
``front.csv`` / ``front.md`` / ``front.png`` and logged on the parent after every trial;
``summary.json`` at the end.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from chaincomp.chain import chain_spec
from chaincomp.console import quiet
from chaincomp.data.datamodule import DataConfig
from chaincomp.errors import ChaincompError, ConfigError
from chaincomp.pipeline import config_section, tracking_config
from chaincomp.search.config import SearchConfig, directions
from chaincomp.search.front import front_rows, write_front
from chaincomp.search.objective import Objective
from chaincomp.search.samplers import make_pruner, make_sampler
from chaincomp.search.space import SearchSpace, build_space
from chaincomp.search.storage import (
    StaleHandler,
    counted,
    epochs_trained,
    fail_overdue,
    make_storage,
    overdue,
    reap_stale,
    waiting,
)
from chaincomp.tasks import TASKS
from chaincomp.tracking import NullTracker, Run, Tracker, make_tracker
from chaincomp.utils import write_json

log = logging.getLogger("chaincomp.search")


def _progress(
    study: optuna.Study,
    scfg: SearchConfig,
    trial: optuna.trial.FrozenTrial,
    rows: list[dict[str, Any]],
) -> None:
    from chaincomp.utils import console

    a = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        what = (
            f"{a['letters']}: val {a['val_metric']:.2f}, {a['val_bitops_ratio']:.1f}x fewer BitOps"
        )
    elif trial.state == TrialState.PRUNED:
        what = f"PRUNED {a.get('letters', '')} {a.get('pruned_reason', '')}"
    else:
        what = f"{trial.state.name}: {a.get('fail_reason', '')}"
    best = ", ".join(
        f"{r['order']} {r['val_metric']:.2f}@{r['val_bitops_ratio']:.0f}x" for r in rows[:6]
    )
    trials = study.get_trials(deepcopy=False)
    runs = sum(int(t.user_attrs.get("stage_runs", 0)) for t in trials)
    hits = sum(int(t.user_attrs.get("cached_steps", 0)) for t in trials)
    spent = f"{epochs_trained(study)}" + (f"/{scfg.budget_epochs}" if scfg.budget_epochs else "")
    seed = f" (seed: {a['seed']})" if "seed" in a else ""
    if "stagewise" in a:
        seed = f" (searching {a['stagewise']})"
    console().print(
        f"[{counted(study)}/{scfg.n_trials}] trial {trial.number}{seed} {what} | stage runs "
        f"{runs}, cache hits {100 * hits / max(runs + hits, 1):.0f}%, epochs {spent} | "
        f"front ({len(rows)}): {best}"
    )


def work(
    cfg: DictConfig, scfg: SearchConfig, out: Path, parent_run_id: str | None, worker: int = 0
) -> None:
    """One worker: run trials until ``n_trials`` are counted or the timeout passes."""
    tracker = make_tracker(tracking_config(cfg))
    parent = Run(getattr(tracker, "client", None), parent_run_id) if parent_run_id else None
    space = space_of(cfg, scfg)
    storage = make_storage(scfg, tracker)
    handler = StaleHandler(tracker, scfg.retry_stale)
    probe = optuna.load_study(study_name=scfg.name, storage=storage)
    seed = scfg.seed + 7919 * worker + 104729 * len(probe.trials)
    study = optuna.load_study(
        study_name=scfg.name,
        storage=storage,
        sampler=make_sampler(scfg, space, seed),
        pruner=make_pruner(scfg),
    )
    objective = Objective(cfg, scfg, space, out, tracker, parent)
    limit = min(scfg.n_trials, len(space.orders)) if scfg.sampler == "grid" else scfg.n_trials
    deadline = time.time() + scfg.timeout if scfg.timeout else None

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        rows = write_front(study, scfg, out, parent)
        _progress(study, scfg, trial, rows)

    while True:
        reap_stale(study, storage, handler, scfg.reap_other_hosts)
        done = counted(study) >= limit and not waiting(study)
        spent = scfg.budget_epochs is not None and epochs_trained(study) >= scfg.budget_epochs
        if done or spent or (deadline and time.time() > deadline):
            break
        study.optimize(
            objective, n_trials=1, catch=(Exception,), callbacks=[after], gc_after_trial=True
        )


def space_of(cfg: DictConfig, scfg: SearchConfig) -> SearchSpace:
    catalogue = config_section(cfg, "chain").get("steps") or {}
    return build_space(catalogue, scfg.stages, scfg.orders, scfg.subsets, scfg.min_stages)


def _worker_entry(
    cfg_yaml: str,
    scfg: SearchConfig,
    out: str,
    parent_run_id: str | None,
    worker: int,
    threads: int,
) -> None:
    import torch

    from chaincomp.data.formats import DECODE_WORKERS_ENV

    torch.set_num_threads(threads)
    # the worker's share of the cores for a first decode too (not 16 processes per worker)
    os.environ.setdefault(DECODE_WORKERS_ENV, str(threads))
    cfg = OmegaConf.create(cfg_yaml)
    assert isinstance(cfg, DictConfig)

    quiet(bool(cfg.get("verbose", False)))  # a spawned worker starts with the defaults
    work(cfg, scfg, Path(out), parent_run_id, worker)


def seed_trials(
    study: optuna.Study, scfg: SearchConfig, space: SearchSpace, cfg: DictConfig
) -> int:
    """Queue the seed chains as the study's first trials, once per study (a resumed study,
    or a second machine joining it, queues nothing); returns how many were queued."""
    if scfg.sampler == "grid" or study.user_attrs.get("seeded"):
        return 0
    chain = config_section(cfg, "chain")
    settings = {name: (entry or {}).get("settings") or {} for name, entry in chain["steps"].items()}
    entries: list[tuple[str, Any]] = []
    configured = "".join(str(s) for s in chain.get("order") or [])
    if scfg.seed_configured:
        if configured in space.orders:
            entries.append(("configured", configured))
        else:
            log.warning(
                "the configured chain %s is not among the study's orders: not seeded", configured
            )
    entries += [(f"seed_chains[{i}]", e) for i, e in enumerate(scfg.seed_chains)]
    for label, entry in entries:
        order, values = (entry, {}) if isinstance(entry, str) else (entry["order"], dict(entry))
        values.pop("order", None)
        key = "search.seed_chains" if label != "configured" else "chain.order"
        params = space.seed_params(order, settings, values, key)
        study.enqueue_trial(params, user_attrs={"seed": label}, skip_if_exists=True)
    study.set_user_attr("seeded", True)
    return len(entries)


def preflight_sweep(cfg: DictConfig, scfg: SearchConfig) -> None:
    """Before the first trial: the prefix cache is writable and every step the search may
    choose can run on every net a chain of them reaches (:func:`preflight_catalogue`), so a bad
    setting stops the sweep with one line instead of failing every trial."""
    import torch

    from chaincomp.chain.cache import PrefixCache
    from chaincomp.chain.preflight import preflight_catalogue
    from chaincomp.chain.replay import replay_info
    from chaincomp.pipeline import build_data, build_net

    chain = OmegaConf.to_container(cfg.chain, resolve=True)
    assert isinstance(chain, dict)
    spec = chain_spec({"chain": {**chain, "order": list(scfg.stages)}})
    PrefixCache(spec.cache_dir).check_writable()
    with torch.random.fork_rng(devices=[]):
        dm = build_data(cfg)
        net = build_net(cfg, dm)
        data = {
            "in_channels": dm.in_channels,
            "num_outputs": dm.num_outputs,
            "image_size": list(dm.image_size),
        }
        model_cfg = dict(config_section(cfg, "model"))
        preflight_catalogue(spec.steps, net, model_cfg, replay_info({"data": data}))


def sweep(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Create or resume the study, run the workers, write ``summary.json``; returns it."""
    scfg = SearchConfig.from_cfg(cfg)
    quiet(bool(cfg.get("verbose", False)))  # Optuna is imported now: its INFO lines too
    chain_spec(cfg)  # validate the chain catalogue before anything starts
    space = space_of(cfg, scfg)
    out = Path(output_dir)
    tracker = make_tracker(tracking_config(cfg))
    storage = make_storage(scfg, tracker)
    preflight_sweep(cfg, scfg)
    # the task's direction from its class: no data is loaded to learn it
    task = TASKS[DataConfig.from_dict(config_section(cfg, "data")).task]
    higher = task.higher_is_better
    study = optuna.create_study(
        study_name=scfg.name,
        storage=storage,
        load_if_exists=True,
        directions=directions(higher, scfg.objective),
    )
    fixed = {
        "orders": list(space.orders),
        "objective": scfg.objective,
        "params": space.param_names(),
    }
    for key, value in fixed.items():
        old = study.user_attrs.get(key)
        if old is not None and old != value:
            raise ConfigError(
                f"search.{'orders' if key == 'params' else key}",
                f"study {scfg.name!r} was created with {key}={old}, now {value}",
                "the study's own settings, or a new search.name",
            )
        study.set_user_attr(key, value)
    if study.metric_names is None:  # named objectives (optuna-dashboard, trials_dataframe)
        names = {
            "pareto": [f"val_{task.metric_name}", "val_bitops"],
            "metric": [f"val_{task.metric_name}"],
            "cost": ["val_bitops"],
        }[scfg.objective]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    seed_trials(study, scfg, space, cfg)
    parent_id = _parent_run(tracker, study, scfg, cfg)
    parent = Run(getattr(tracker, "client", None), parent_id) if parent_id else None
    status = "FINISHED"
    try:
        if scfg.n_workers == 1 and scfg.trial_timeout is None:
            work(cfg, scfg, out, parent_id)
        else:  # worker processes: a dead one is replaced, a hung one can be killed
            ctx = mp.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // scfg.n_workers)
            yaml = OmegaConf.to_yaml(cfg, resolve=True)

            def start(i: int) -> Any:
                proc = ctx.Process(
                    target=_worker_entry, args=(yaml, scfg, str(out), parent_id, i, threads)
                )
                proc.start()
                return proc

            # a worker that dies (a native crash, the OOM killer) is replaced: its successor
            # fails the dead worker's trial and re-queues it (storage.MAX_RERUNS times at most)
            restarts, died = 3 * scfg.n_workers, []
            procs = [start(i) for i in range(scfg.n_workers)]
            try:
                while any(p.is_alive() for p in procs):
                    time.sleep(1.0)
                    if scfg.trial_timeout is not None:  # a trial hung (in a native kernel)
                        alive = {p.pid: p for p in procs if p.is_alive() and p.pid is not None}
                        for number, pid in overdue(study, set(alive), scfg.trial_timeout):

                            def kill(p: Any = alive[pid]) -> None:
                                p.kill()
                                p.join(10)

                            if not fail_overdue(
                                study, storage, number, scfg.trial_timeout, tracker, kill
                            ):
                                continue  # it finished meanwhile: its worker lives on
                            log.warning(
                                "trial %d ran past search.trial_timeout (%g s): its worker was "
                                "killed and the trial failed",
                                number,
                                scfg.trial_timeout,
                            )
                    for i, p in enumerate(procs):
                        if p.is_alive() or not p.exitcode or restarts == 0:
                            continue
                        died.append(p.exitcode)
                        restarts -= 1
                        log.warning(
                            "sweep worker %d died (exit code %s); starting another", i, p.exitcode
                        )
                        procs[i] = start(i)
            finally:  # interrupted (Ctrl-C, SIGTERM): no worker outlives the sweep
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                        p.join(10)
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise ChaincompError(
                    f"{len(bad)} sweep worker(s) exited with codes {bad} "
                    f"(after {len(died)} replaced: {died})"
                )
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, SIGTERM
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if parent_id is not None and parent is not None and isinstance(tracker, Tracker):
            if status == "FINISHED":
                write_front(study, scfg, out, parent)
            tracker.client.set_terminated(parent_id, status)
    return summarize(study, scfg, out, parent_id)


def _parent_run(
    tracker: Tracker | NullTracker, study: optuna.Study, scfg: SearchConfig, cfg: DictConfig
) -> str | None:
    """The sweep's MLflow run: the one recorded on the study (resume) or a new one."""
    if not isinstance(tracker, Tracker):
        return None
    client = tracker.client
    old = study.user_attrs.get(f"mlflow_parent_run_id@{tracker.cfg.uri}")
    if old:
        try:
            client.update_run(old, status="RUNNING")
            client.set_tag(old, "chaincomp.resumed", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return str(old)
        except Exception:  # deleted run: start a new one
            pass
    info = client.create_run(
        tracker.experiment_id,
        run_name=f"sweep {scfg.name}",
        tags={
            "chaincomp.command": "sweep",
            "optuna.study": scfg.name,
            "optuna.storage": scfg.storage if not scfg.is_database else scfg.storage.split("@")[-1],
        },
    )
    run = Run(client, info.info.run_id)
    run.log_params(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    study.set_user_attr(f"mlflow_parent_run_id@{tracker.cfg.uri}", info.info.run_id)
    return str(info.info.run_id)


def summarize(
    study: optuna.Study, scfg: SearchConfig, out: Path, parent_id: str | None
) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    rows = front_rows(study, scfg)
    runs = sum(int(t.user_attrs.get("stage_runs", 0)) for t in trials)
    hits = sum(int(t.user_attrs.get("cached_steps", 0)) for t in trials)
    summary = {
        "study": scfg.name,
        "storage": scfg.storage if not scfg.is_database else scfg.storage.split("@")[-1],
        "objective": scfg.objective,
        "sampler": scfg.sampler,
        "n_trials": scfg.n_trials,
        "trials": len(trials),
        "states": states,
        "front": rows,
        "stage_runs": runs,
        "cached_steps": hits,
        "cache_hit_rate": hits / (runs + hits) if runs + hits else None,
        "stage_runs_saved_by_pruning": sum(
            int(t.user_attrs.get("steps_skipped", 0)) for t in trials
        ),
        "epochs_trained": epochs_trained(study),
        # seconds the trials waited for prefixes other workers were computing (chain.cache)
        "waited_s": round(sum(float(t.user_attrs.get("waited_s", 0.0)) for t in trials), 1),
        "budget_epochs": scfg.budget_epochs,
        "seeds": {str(t.user_attrs["seed"]): t.number for t in trials if "seed" in t.user_attrs},
        "mlflow_run_id": parent_id,
        "failed": [
            {"trial": t.number, "reason": t.user_attrs.get("fail_reason")}
            for t in trials
            if t.state == TrialState.FAIL
        ],
        "pruned": [
            {"trial": t.number, "reason": t.user_attrs.get("pruned_reason")}
            for t in trials
            if t.state == TrialState.PRUNED
        ],
    }
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["sweep", "work"]
