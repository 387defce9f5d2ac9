"""``chaincomp sweep``: an Optuna study over chain orders and stage hyperparameters.

Every trial calls the same :func:`~chaincomp.chain.run_chain` as ``chaincomp run`` (so it shares
the prefix cache) and is scored on the *validation* split: metric vs expected BitOps (a Pareto
front), or one objective under a cost budget / metric-loss constraint.

Storage: a journal file by default (Optuna's JournalStorage; safe for several local processes),
or any database URL (``postgresql://...``, with Optuna's heartbeat) for several machines. Running
the same command again with the same study name resumes it: finished trials stay, the study runs
until ``n_trials`` trials are finished or running. A trial whose worker died (this host: its pid
is gone; other hosts: the database heartbeat) is marked FAIL, its MLflow runs are closed as
KILLED, and (``retry_stale``) it is re-queued with the same parameters.

MLflow: a parent run for the sweep (reused on resume), a child run per trial (the chain), a
grandchild per step; trial number and run id are cross-referenced (trial user attr
``mlflow_run_id``; run tags ``optuna.trial`` / ``optuna.study``). The Pareto front is written as
``front.csv`` / ``front.md`` / ``front.png`` and logged on the parent after every trial.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from chaincomp.chain import chain_spec, run_chain
from chaincomp.errors import ChaincompError, ConfigError
from chaincomp.pipeline import config_section, tracking_config
from chaincomp.search.space import SearchSpace, build_space
from chaincomp.tracking import NullTracker, Run, Tracker, make_tracker
from chaincomp.utils import atomic_write, markdown_table, pyplot, write_csv, write_json

OBJECTIVES = ("pareto", "metric", "cost")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
HOST = socket.gethostname()


class TrialDiverged(ChaincompError):
    """The chain finished with a non-finite metric or cost."""


@dataclass(frozen=True)
class SearchConfig:
    """``conf/search/*.yaml``. ``stages``: step names from the chain catalogue; ``orders``:
    explicit orders (strings) instead of all permutations (``subsets``: also of subsets of at
    least ``min_stages`` steps); ``objective``: pareto (metric and BitOps) | metric (best
    metric with ``bitops_budget``) | cost (fewest BitOps within ``max_metric_loss`` of the
    baseline); ``max_metric_loss`` is also a constraint of pareto when set; ``sampler``: tpe |
    nsga2 | random | grid (all orders at the chain's fixed settings); ``storage``: a journal
    file path or a database URL; ``n_workers`` local processes."""

    name: str = "chaincomp"
    stages: tuple[str, ...] = ("D", "P", "Q", "E")
    orders: tuple[str, ...] | None = None
    subsets: bool = False
    min_stages: int = 1
    objective: str = "pareto"
    max_metric_loss: float | None = None
    bitops_budget: float | None = None
    sampler: str = "tpe"
    n_startup_trials: int = 8
    n_trials: int = 20
    timeout: float | None = None
    n_workers: int = 1
    storage: str = ".chaincomp/optuna.journal"
    seed: int = 0
    retry_stale: bool = True
    heartbeat_interval: int = 10
    grace_period: int = 30

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, allowed: Any) -> ConfigError:
            return ConfigError(f"search.{key}", f"invalid value {value!r}", allowed)

        if self.objective not in OBJECTIVES:
            raise bad("objective", self.objective, OBJECTIVES)
        if self.sampler not in SAMPLERS:
            raise bad("sampler", self.sampler, SAMPLERS)
        if self.objective == "metric" and self.bitops_budget is None:
            raise ConfigError("search.bitops_budget", "required by objective=metric", "> 0")
        if self.objective == "cost" and self.max_metric_loss is None:
            raise ConfigError("search.max_metric_loss", "required by objective=cost", ">= 0")
        if self.bitops_budget is not None and not self.bitops_budget > 0:
            raise bad("bitops_budget", self.bitops_budget, "null or > 0")
        if self.max_metric_loss is not None and self.max_metric_loss < 0:
            raise bad("max_metric_loss", self.max_metric_loss, "null or >= 0")
        if self.n_trials < 1:
            raise bad("n_trials", self.n_trials, ">= 1")
        if self.n_workers < 1:
            raise bad("n_workers", self.n_workers, ">= 1")
        if self.timeout is not None and not self.timeout > 0:
            raise bad("timeout", self.timeout, "null or > 0 seconds")
        if not self.name:
            raise bad("name", self.name, "a study name")

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SearchConfig:
        values = config_section(cfg, "search")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"search.{unknown[0]}", "unknown key", sorted(known))
        for key in ("stages", "orders"):
            if isinstance(values.get(key), list):
                values[key] = tuple(str(v) for v in values[key])
        return cls(**values)

    @property
    def is_database(self) -> bool:
        return "://" in self.storage


def directions(task_higher_is_better: bool, objective: str) -> list[Any]:
    metric = "maximize" if task_higher_is_better else "minimize"
    return {"pareto": [metric, "minimize"], "metric": [metric], "cost": ["minimize"]}[objective]


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    return trial.user_attrs.get("constraints", [0.0])


def make_storage(scfg: SearchConfig, tracker: Tracker | NullTracker) -> optuna.storages.BaseStorage:
    if scfg.is_database:
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        # optuna >= 4.9 renamed failed_trial_callback to heartbeat_stale_trial_callback
        key = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        )
        return optuna.storages.RDBStorage(
            scfg.storage,
            heartbeat_interval=scfg.heartbeat_interval,
            grace_period=scfg.grace_period,
            **{key: StaleHandler(tracker, scfg.retry_stale)},  # type: ignore[arg-type]
        )
    from optuna.storages.journal import JournalFileBackend

    path = Path(scfg.storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_sampler(scfg: SearchConfig, space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    constrained = scfg.max_metric_loss is not None or scfg.bitops_budget is not None
    cfunc = _constraints if constrained else None
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({"order": list(space.orders)}, seed=seed)
    if scfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if scfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cfunc)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=scfg.n_startup_trials,
        multivariate=True,
        group=True,  # conditional stage parameters
        constant_liar=True,  # parallel workers do not all try the same point
        constraints_func=cfunc,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def close_runs(tracker: Tracker | NullTracker, run_id: str | None, status: str = "KILLED") -> None:
    """Terminate a chain run and every descendant still RUNNING (a killed worker's runs)."""
    if not run_id or not isinstance(tracker, Tracker):
        return
    client = tracker.client
    todo = [run_id]
    while todo:
        rid = todo.pop()
        children = client.search_runs(
            [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'"
        )
        todo.extend(r.info.run_id for r in children)
        if client.get_run(rid).info.status == "RUNNING":
            client.set_tag(rid, "error", "worker died during the trial")
            client.set_terminated(rid, status)


class StaleHandler:
    """What happens to a trial whose worker died: MLflow runs closed, optionally re-queued."""

    def __init__(self, tracker: Tracker | NullTracker, retry: bool):
        self.tracker, self.retry = tracker, retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        close_runs(self.tracker, trial.user_attrs.get("mlflow_run_id"))
        retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
        if self.retry and trial.number not in retried:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def reap_stale(
    study: optuna.Study, storage: optuna.storages.BaseStorage, handler: StaleHandler
) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone; returns their numbers.

    Uses the public storage API (trial ids looked up by study name and trial number)."""
    reaped = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host != HOST or pid is None or pid == os.getpid() or _alive(int(pid)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", f"worker pid {pid} died")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker reaped it first
        handler(study, storage.get_trial(trial_id))
        reaped.append(t.number)
    return reaped


def non_dominated(
    trials: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> list[optuna.trial.FrozenTrial]:
    """The trials no other trial dominates (at least as good in every objective, better in one);
    of trials with equal values, every one is kept."""
    sign = [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in directions]

    def key(t: optuna.trial.FrozenTrial) -> list[float]:
        return [s * v for s, v in zip(sign, t.values, strict=True)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    keys = [key(t) for t in trials]
    return [t for t, k in zip(trials, keys, strict=True) if not any(dominates(o, k) for o in keys)]


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all but failed trials that were re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


class Objective:
    """One trial = one chain: suggest order and settings, run_chain, score on validation."""

    def __init__(
        self,
        cfg: DictConfig,
        scfg: SearchConfig,
        space: SearchSpace,
        out: Path,
        tracker: Tracker | NullTracker,
        parent: Run | None,
    ):
        self.cfg, self.scfg, self.space, self.out = cfg, scfg, space, out
        self.tracker, self.parent = tracker, parent

    def trial_config(self, order: str, overrides: Mapping[str, Mapping[str, Any]]) -> DictConfig:
        cfg = copy.deepcopy(self.cfg)
        OmegaConf.set_readonly(cfg, False)
        OmegaConf.set_struct(cfg, False)
        cfg.chain.order = list(order)
        for step, values in overrides.items():
            for key, value in values.items():
                cfg.chain.steps[step].settings[key] = value
        return cfg

    def __call__(self, trial: optuna.Trial) -> Any:
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", os.getpid())
        order, overrides = self.space.suggest(trial, with_params=self.scfg.sampler != "grid")
        cfg = self.trial_config(order, overrides)
        run_ids: list[str | None] = []

        def started(run_id: str | None) -> None:
            run_ids.append(run_id)
            trial.set_user_attr("mlflow_run_id", run_id)

        try:
            summary = run_chain(
                cfg,
                self.out / "trials" / f"{trial.number:04d}",
                self.tracker,
                parent=self.parent,
                run_name=f"trial {trial.number} {order}",
                tags={"optuna.study": self.scfg.name, "optuna.trial": trial.number},
                on_start=started,
            )
            summary.pop("module", None)
            val, bitops = summary["val_metric"], summary["val_bitops"]
            if not (math.isfinite(val) and math.isfinite(bitops)):
                raise TrialDiverged(f"non-finite result: val_metric={val}, val_bitops={bitops}")
        except BaseException as exc:
            reason = f"{type(exc).__name__}: {exc}"[:500]
            trial.set_user_attr("fail_reason", reason)
            if (
                isinstance(exc, TrialDiverged)
                and run_ids
                and run_ids[0]
                and isinstance(self.tracker, Tracker)
            ):
                self.tracker.client.set_tag(run_ids[0], "error", reason)
                self.tracker.client.set_terminated(run_ids[0], "FAILED")
            _free_accelerator_memory()
            raise
        base = summary["baseline"]
        higher = summary["metric_name"] == "accuracy"
        loss = (base["val_metric"] - val) if higher else (val - base["val_metric"])
        constraints = []
        if self.scfg.max_metric_loss is not None:
            constraints.append(loss - self.scfg.max_metric_loss)
        if self.scfg.bitops_budget is not None:
            constraints.append(bitops - self.scfg.bitops_budget)
        for key, value in {
            "letters": order,
            "test_metric": summary["test_metric"],
            "val_metric": val,
            "val_bitops": bitops,
            "bitops": summary["bitops"],
            "bitops_ratio": summary["bitops_ratio"],
            "val_bitops_ratio": summary["val_bitops_ratio"],
            "metric_delta": summary["metric_delta"],
            "val_metric_loss": loss,
            "baseline_val_metric": base["val_metric"],
            "baseline_val_bitops": base["val_bitops"],
            "constraints": constraints or [0.0],
            "run_dir": str(self.out / "trials" / f"{trial.number:04d}"),
        }.items():
            trial.set_user_attr(key, value)
        if self.scfg.objective == "pareto":
            return val, bitops
        return val if self.scfg.objective == "metric" else bitops


def _free_accelerator_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def front_rows(study: optuna.Study, scfg: SearchConfig) -> list[dict[str, Any]]:
    """The Pareto front (or, for one objective, the best feasible trials), best first."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    feasible = [t for t in done if all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))]
    if not feasible:
        return []
    if scfg.objective == "pareto":
        front = non_dominated(feasible, study.directions)
    else:
        reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
        front = sorted(feasible, key=lambda t: t.value, reverse=reverse)[:10]  # type: ignore[arg-type, return-value]
    rows = []
    for t in front:
        a = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "order": a.get("letters"),
                "val_metric": a.get("val_metric"),
                "val_bitops": a.get("val_bitops"),
                "val_bitops_ratio": a.get("val_bitops_ratio"),
                "test_metric": a.get("test_metric"),
                "bitops_ratio": a.get("bitops_ratio"),
                "metric_delta": a.get("metric_delta"),
                "mlflow_run_id": a.get("mlflow_run_id"),
                **{k: v for k, v in t.params.items() if k != "order"},
            }
        )
    rows.sort(key=lambda r: r["val_bitops"])
    return rows


def write_front(
    study: optuna.Study, scfg: SearchConfig, out: Path, parent: Run | None
) -> list[dict[str, Any]]:
    """front.csv / front.md / front.png in ``out`` (atomically), logged on the parent run."""
    rows = front_rows(study, scfg)
    lead = [
        "trial",
        "order",
        "val_metric",
        "val_bitops_ratio",
        "test_metric",
        "bitops_ratio",
        "metric_delta",
        "val_bitops",
    ]
    rest = sorted({k for r in rows for k in r} - {*lead, "mlflow_run_id"})
    keys = [*lead, *rest, "mlflow_run_id"]

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "front.csv", rows, keys)
    table = markdown_table(rows, keys, _cell)
    atomic_write(out / "front.md", lambda p: p.write_text(table))
    atomic_write(out / "front.png", lambda p: _plot(study, rows, p))
    if parent is not None and parent.run_id:
        for name in ("front.csv", "front.md", "front.png"):
            parent.log_artifact(out / name)
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _plot(study: optuna.Study, rows: list[dict[str, Any]], path: str | Path) -> None:
    plt = pyplot()
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(
        [t.user_attrs["val_bitops"] for t in done],
        [t.user_attrs["val_metric"] for t in done],
        c="lightgray",
        label="trials",
    )
    if rows:
        ax.plot(
            [r["val_bitops"] for r in rows],
            [r["val_metric"] for r in rows],
            "o-",
            c="C3",
            label="Pareto front",
        )
        for r in rows:
            ax.annotate(str(r["order"]), (r["val_bitops"], r["val_metric"]), fontsize=7)
    if done:
        a = done[0].user_attrs
        ax.scatter(
            [a["baseline_val_bitops"]],
            [a["baseline_val_metric"]],
            marker="*",
            s=150,
            c="k",
            label="baseline",
        )
    ax.set_xscale("log")
    ax.set_xlabel("expected BitOps per sample (validation)")
    ax.set_ylabel("validation metric")
    ax.set_title(f"study {study.study_name}: {len(done)} trials")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


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
    else:
        what = f"{trial.state.name}: {a.get('fail_reason', '')}"
    best = ", ".join(
        f"{r['order']} {r['val_metric']:.2f}@{r['val_bitops_ratio']:.0f}x" for r in rows[:6]
    )
    console().print(
        f"[{counted(study)}/{scfg.n_trials}] trial {trial.number} {what} | front ({len(rows)}): {best}"
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
        study_name=scfg.name, storage=storage, sampler=make_sampler(scfg, space, seed)
    )
    objective = Objective(cfg, scfg, space, out, tracker, parent)
    limit = min(scfg.n_trials, len(space.orders)) if scfg.sampler == "grid" else scfg.n_trials
    deadline = time.time() + scfg.timeout if scfg.timeout else None

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        rows = write_front(study, scfg, out, parent)
        _progress(study, scfg, trial, rows)

    while True:
        reap_stale(study, storage, handler)
        if counted(study) >= limit or (deadline and time.time() > deadline):
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

    torch.set_num_threads(threads)
    cfg = OmegaConf.create(cfg_yaml)
    assert isinstance(cfg, DictConfig)
    work(cfg, scfg, Path(out), parent_run_id, worker)


def sweep(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Create or resume the study, run the workers, write ``summary.json``; returns it."""
    scfg = SearchConfig.from_cfg(cfg)
    chain_spec(cfg)  # validate the chain catalogue before anything starts
    space = space_of(cfg, scfg)
    out = Path(output_dir)
    tracker = make_tracker(tracking_config(cfg))
    storage = make_storage(scfg, tracker)
    from chaincomp.pipeline import build_data

    higher = build_data(cfg).task.higher_is_better
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
    parent_id = _parent_run(tracker, study, scfg, cfg)
    parent = Run(getattr(tracker, "client", None), parent_id) if parent_id else None
    status = "FINISHED"
    try:
        if scfg.n_workers == 1:
            work(cfg, scfg, out, parent_id)
        else:
            ctx = mp.get_context("spawn")
            threads = max(1, (os.cpu_count() or 1) // scfg.n_workers)
            yaml = OmegaConf.to_yaml(cfg, resolve=True)
            procs = [
                ctx.Process(
                    target=_worker_entry, args=(yaml, scfg, str(out), parent_id, i, threads)
                )
                for i in range(scfg.n_workers)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            bad = [p.exitcode for p in procs if p.exitcode]
            if bad:
                raise ChaincompError(f"{len(bad)} sweep worker(s) exited with codes {bad}")
    except KeyboardInterrupt:
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
    summary = {
        "study": scfg.name,
        "storage": scfg.storage if not scfg.is_database else scfg.storage.split("@")[-1],
        "objective": scfg.objective,
        "sampler": scfg.sampler,
        "n_trials": scfg.n_trials,
        "trials": len(trials),
        "states": states,
        "front": rows,
        "mlflow_run_id": parent_id,
        "failed": [
            {"trial": t.number, "reason": t.user_attrs.get("fail_reason")}
            for t in trials
            if t.state == TrialState.FAIL
        ],
    }
    write_json(out / "summary.json", summary)
    return summary


__all__ = ["SearchConfig", "sweep", "work"]
