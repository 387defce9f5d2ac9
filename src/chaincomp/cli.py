"""``chaincomp <command> [hydra overrides...]``.

Each command is a Hydra app over ``conf/`` (so every key can be overridden from the shell and
``hydra.run.dir=...`` chooses the run directory), writes ``summary.json`` into its run
directory and logs to MLflow.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from chaincomp.errors import ChaincompError
from chaincomp.utils import config_dir, console, write_json

if TYPE_CHECKING:
    from chaincomp.chain import ChainResult

SUMMARY_KEYS = (
    "task",
    "metric_name",
    "val_metric",
    "test_metric",
    "macs",
    "bitops",
    "params",
    "mlflow_run_id",
)


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    if isinstance(value, int) and abs(value) >= 1e4:
        return f"{value:.4e}"
    return "-" if value is None else str(value)


def print_summary(title: str, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _fmt(value))
    console().print(table)


def cmd_train(cfg: DictConfig) -> dict[str, Any]:
    """Train the baseline of ``data`` x ``model``; log it; write summary.json."""
    from chaincomp.pipeline import tracker_for, train_baseline

    out = _output_dir()
    tracker = tracker_for(cfg)
    name = (
        cfg.tracking.get("run_name") or f"train {cfg.data.name} {cfg.model.get('name', '')}".strip()
    )
    with tracker.run(name=name, tags={"chaincomp.command": "train"}) as run:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run.log_params(resolved)  # type: ignore[arg-type]
        run.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        summary = train_baseline(cfg, out, run)
        run.log_metrics({k: v for k, v in summary.items() if k not in ("epochs",)})
        write_json(out / "summary.json", summary)
        run.log_artifact(out / "summary.json")
    print_summary(f"baseline: {summary['dataset']} / {summary['model']}", summary)
    return summary


def cmd_cost(cfg: DictConfig) -> dict[str, Any]:
    """Print the per-layer cost table of the configured model at the data's input size."""
    from rich.table import Table

    from chaincomp.pipeline import build_data, build_net, cost_of, tracker_for

    out = _output_dir()
    dm = build_data(cfg)
    net = build_net(cfg, dm)
    report = cost_of(net, dm)
    table = Table(
        title=f"cost per sample: {cfg.model.get('name', '')} at {dm.in_channels}x{dm.image_size[0]}x{dm.image_size[1]}"
    )
    for col in ("layer", "kind", "MACs", "params", "w bits", "a bits", "BitOps"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for layer in report.layers:
        table.add_row(
            layer.name,
            layer.kind,
            f"{layer.macs:,}",
            f"{layer.params:,}",
            str(layer.weight_bits),
            str(layer.act_bits),
            f"{layer.bitops:.4e}",
        )
    table.add_section()
    table.add_row(
        "total", "", f"{report.macs:,}", f"{report.params:,}", "", "", f"{report.bitops:.4e}"
    )
    console().print(table)
    tracker = tracker_for(cfg)
    with tracker.run(
        name=f"cost {cfg.model.get('name', '')}", tags={"chaincomp.command": "cost"}
    ) as run:
        run.log_params(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        summary = {
            "task": dm.task.name,
            "metric_name": dm.task.metric_name,
            "val_metric": None,
            "test_metric": None,
            "macs": report.macs,
            "bitops": report.bitops,
            "params": report.params,
            "size_mb": report.size_mb,
            "layers": report.rows(),
            "mlflow_run_id": run.run_id,
        }
        run.log_metrics({k: summary[k] for k in ("macs", "bitops", "params", "size_mb")})
        write_json(out / "summary.json", summary)
        run.log_artifact(out / "summary.json")
    return summary


def step_note(step: Any) -> str:
    """What a step did that its numbers do not show: how many exits E kept and how many test
    samples left early (an E row equal to the row before means it kept none)."""
    exits = step.extra.get("early_exit.exits")
    if exits is None:
        return ""
    if not exits:
        return "0 exits kept (none within max_loss)"
    rates = step.extra.get("test_exit_rates") or []
    early = 100.0 * sum(rates[:-1]) if len(rates) > 1 else 0.0
    return f"{int(exits)} exit(s) kept, {early:.0f}% of test samples leave early"


def print_chain_table(result: ChainResult, dataset: str = "") -> None:
    """One row per step (baseline first): metric, cost and the ratios against the baseline."""
    from rich.table import Table

    base = result.baseline
    unit = result.metric_name
    table = Table(title=f"chain {'->'.join(result.order) or '(baseline only)'}: {dataset} {unit}")
    for col in (
        "step",
        "stage",
        f"val {unit}",
        f"test {unit}",
        "MACs",
        "BitOps",
        "params",
        "size MB",
        "BitOps x",
        "cached",
        "note",
    ):
        table.add_column(col, justify="left" if col in ("step", "stage") else "right")
    for r in result.steps:
        table.add_row(
            r.name,
            "-" if r.stage == "baseline" else r.stage,
            f"{r.val_metric:.2f}",
            f"{r.test_metric:.2f}",
            f"{r.macs:.4g}",
            f"{r.bitops:.4g}",
            f"{int(r.params):,}",
            f"{r.size_mb:.4f}",
            f"{base.bitops / max(r.bitops, 1e-12):.1f}",
            "yes" if r.cached else "",
            step_note(r),
        )
    console().print(table)
    console().print(
        f"BitOps reduction {result.bitops_ratio:.1f}x, test {unit} change "
        f"{result.metric_delta:+.2f} (baseline {base.test_metric:.2f} -> "
        f"{result.last.test_metric:.2f})"
    )


def cmd_run(cfg: DictConfig) -> dict[str, Any]:
    """Run the chain ``cfg.chain`` (baseline, then the steps in ``chain.order``); returns its
    ``summary.json`` dict (the :class:`ChainResult` schema) with the dataset and model named."""
    from chaincomp.chain import run_chain
    from chaincomp.pipeline import tracker_for

    out = _output_dir()
    result = run_chain(cfg, out, tracker_for(cfg), run_name=cfg.tracking.get("run_name"))
    print_chain_table(result, str(cfg.data.name))
    return {
        **result.to_json(),
        "dataset": cfg.data.name,
        "model": str(cfg.model.get("name", cfg.model.get("_target_"))),
    }


def cmd_sweep(cfg: DictConfig) -> dict[str, Any]:
    """Create or resume the Optuna study ``search.name`` and run its trials."""
    from rich.table import Table

    from chaincomp.search import sweep

    summary = sweep(cfg, _output_dir())
    table = Table(
        title=f"study {summary['study']}: Pareto front (validation), {summary['trials']} trials {summary['states']}"
    )
    cols = ("trial", "order", "val_metric", "val_bitops_ratio", "test_metric", "bitops_ratio")
    for col in cols:
        table.add_column(col, justify="left" if col == "order" else "right")
    for row in summary["front"]:
        table.add_row(*(_fmt(row.get(c)) for c in cols))
    console().print(table)
    return summary


# The runs table as chaincomp's link opens it: MLflow's "model training" view (not its GenAI
# start page), the key columns shown, runs oldest first (so a chain's steps read in chain order).
UI_VIEW_KEY = "chaincomp"
UI_COLUMNS = (
    "tags.`chaincomp.order`",
    "metrics.`val_metric`",
    "metrics.`test_metric`",
    "metrics.`bitops_ratio`",
    "metrics.`val_bitops_ratio`",
    "metrics.`size_mb`",
    "tags.`chaincomp.pareto`",
)


def ui_link(base: str, experiment_id: str | None) -> str:
    """The MLflow UI page of the experiment's runs in the "model training" view with
    chaincomp's columns (the view :func:`prepare_ui_view` stores), or the UI's start page."""
    base = base.rstrip("/")
    if not experiment_id:
        return f"{base}/"
    query = f"workflowType=machine_learning&viewStateShareKey={UI_VIEW_KEY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def prepare_ui_view(client: Any, experiment_id: str) -> None:
    """Tag the experiment as model training and store chaincomp's runs-table view as an MLflow
    shared view state (what the UI's "Share" button stores), which :func:`ui_link` names."""
    import json

    state = {
        "selectedColumns": list(UI_COLUMNS),
        "orderByKey": "attributes.start_time",
        "orderByAsc": True,
    }
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    client.set_experiment_tag(
        experiment_id, f"mlflow.sharedViewState.{UI_VIEW_KEY}", json.dumps(state)
    )


def cmd_ui(cfg: DictConfig) -> int:
    """Serve the MLflow UI for ``tracking.uri`` on 127.0.0.1 (``+port=5000``) with one web
    worker and no background job workers, and print the link to the experiment's runs."""
    import subprocess

    from chaincomp.pipeline import tracking_config
    from chaincomp.tracking import Tracker

    uri = str(cfg.tracking.uri)
    port = int(cfg.get("port", 5000))
    tracker = Tracker(tracking_config(cfg))  # opens (or creates) the store: one-line errors
    exp = str(tracker.experiment_id)
    prepare_ui_view(tracker.client, exp)
    if uri.startswith(("http://", "https://")):
        print(f"tracking.uri is a server already: open {ui_link(uri, exp)}")
        return 0
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    link = ui_link(f"http://127.0.0.1:{port}", exp)
    print(f"MLflow UI for {uri}: {link}  (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def cmd_report(cfg: DictConfig) -> dict[str, Any]:
    """Tables and plots of a study (``report.source``) read back from MLflow (``tracking.uri``)
    into ``<report.out_dir>/<study>/results/<report.label>/``."""
    from chaincomp.report import report

    written = report(cfg)
    for study, path in written.items():
        print(f"{study}: {path}")
    return {study: str(path) for study, path in written.items()}


COMMANDS: dict[str, Callable[[DictConfig], Any]] = {
    "train": cmd_train,
    "cost": cmd_cost,
    "run": cmd_run,
    "sweep": cmd_sweep,
    "ui": cmd_ui,
    "report": cmd_report,
}

USAGE = """usage: chaincomp <command> [key=value ...] [hydra options]

commands:
  train   train the baseline of data x model (e.g. chaincomp train data=digits model=small_cnn)
  cost    print the per-layer MACs / params / BitOps table of a model
  run     run a compression chain (e.g. chaincomp run chain=dpqe, chaincomp run chain.order=[Q,P])
  sweep   an Optuna study over orders and settings (chaincomp sweep search.n_trials=30 search.n_workers=2)
  report  tables and plots of a study from MLflow (chaincomp report experiment=orders_fashion)
  ui      serve the MLflow UI for tracking.uri on 127.0.0.1 (chaincomp ui +port=5000)

Every key of conf/ can be overridden (data=fashion_mnist model=resnet18 trainer.max_epochs=5);
hydra.run.dir=... chooses the run directory; --cfg job prints the composed config.
"""


HELP: dict[str, str] = {
    "train": """usage: chaincomp train [key=value ...]

Train the baseline of data x model, measure it (validation and test metric, MACs, BitOps,
parameters, size) and save it.

writes: runs/train/<time>-<pid>/{summary.json, baseline.pt}; an MLflow run with the metrics.

common overrides:
  data=fashion_mnist                 the dataset (digits, mnist, fashion_mnist, cifar10, imagefolder)
  model=resnet10                     the network (conf/model/*.yaml, or model=custom model._target_=pkg.Net)
  trainer.max_epochs=5               training length
  optim.lr=0.05                      peak learning rate
  tracking=none                      no MLflow""",
    "cost": """usage: chaincomp cost [key=value ...]

Print the per-layer MACs / parameters / bits / BitOps table of the configured model at the
data's input size (nothing is trained).

writes: runs/cost/<time>-<pid>/summary.json (the layers); an MLflow run.

common overrides:
  model=resnet18                     the network
  data=cifar10                       the input size and classes
  model.width_mult=0.5               a thinner network
  model=resnet10 model.blocks=[2,2,2,2]   a model argument
  tracking=none                      no MLflow""",
    "run": """usage: chaincomp run [key=value ...]

Run a compression chain: train (or load, or take from the cache) the baseline, then apply the
steps of chain.order (D distill, P prune, Q quantize, E early exit, L low-rank) one after the
other, each measured on validation and test; print the per-step table.

writes: runs/run/<time>-<pid>/{summary.json, chain/} (chain/ reloads with chaincomp.chain.load_chain);
        one MLflow run for the chain, a child run per step; prefix states in chain.cache_dir.

common overrides:
  chain.order=[P,Q]                  which steps, in which order
  chain.steps.P.settings.ratio=0.5   a step's setting (conf/stage/<stage>.yaml lists them)
  chain.steps.Q.settings.w_bits=2    bit widths
  +model@chain.steps.D.settings.student=resnet18   the D student
  chain.baseline.checkpoint=runs/train/.../baseline.pt   start from a trained baseline""",
    "sweep": """usage: chaincomp sweep [key=value ...]

Create or resume the Optuna study search.name over chain orders and stage settings: the
configured chain is trial 0, every trial is a chain (sharing the prefix cache), scored on
validation; print the Pareto front (metric vs BitOps).

writes: runs/sweep/<time>-<pid>/{summary.json, front.csv, front.md, front.png, trials/};
        the study in search.storage; MLflow: sweep -> trial -> step runs.

common overrides:
  search.n_trials=30                 trials the study aims at (a resumed study counts old ones)
  search=orders                      every order of D, P, Q, E at the configured settings (grid)
  search.n_workers=2                 local worker processes
  search.objective=cost search.max_metric_loss=1.0   fewest BitOps within 1 point
  search.budget_epochs=200           stop once the trials trained 200 epochs""",
    "report": """usage: chaincomp report [key=value ...]

Read the chains of a study back from MLflow (tracking.uri) and write its tables and figures
(pairwise, precedence, insertion, all orders), every choice made on validation.

writes: <report.out_dir>/<study>/results/<report.label>/{*.md, *.csv, *.png}

common overrides:
  experiment=orders_fashion          the study's experiment config (its source and label)
  tracking.uri=sqlite:///path.db     the store to read
  report.studies=[all_orders]        which tables
  report.label=mine                  the results folder name
  report.out_dir=experiments         where the results go""",
    "ui": """usage: chaincomp ui [key=value ...]

Serve the MLflow UI for tracking.uri on 127.0.0.1 and print the link to the runs table.

common overrides:
  +port=5001                         another port
  tracking.uri=sqlite:///path.db     another store
  tracking.experiment=chaincomp      the experiment the link opens
  experiment=orders_fashion          a study's store
  tracking=mlflow                    the default store (sqlite:///mlflow.db)""",
}

HELP_TAIL = """
every key of conf/ can be overridden (chaincomp {cmd} --cfg job prints the composed config;
--hydra-help shows Hydra's options); -v / verbose=true keeps the libraries' messages."""


def _drop_if_empty(out: Path) -> None:
    """Remove a run directory that holds nothing but Hydra's own files (a command that failed
    before writing anything), so failures leave no empty ``runs/<cmd>/<time>/``."""
    try:
        own = {".hydra", f"{out.name}.log"} | {p.name for p in out.glob("*.log")}
        if (
            out.is_dir()
            and all(p.name in own for p in out.iterdir())
            and all(p.stat().st_size == 0 for p in out.glob("*.log"))
        ):
            shutil.rmtree(out, ignore_errors=True)
            out.parent.rmdir()  # runs/<cmd>/ when it held only this one (else OSError)
    except OSError:
        pass


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM: runs close as KILLED, the exit status is 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def _killed_note(cfg: DictConfig) -> str:
    """What an interrupted command says about its MLflow runs: nothing when tracking is off
    (never raises: it runs inside the handlers that set the exit status)."""
    try:
        tracking = cfg.get("tracking")
        enabled = bool(tracking.get("enabled", False)) if hasattr(tracking, "get") else False
    except Exception:
        return ""
    return "; its MLflow runs are closed as KILLED" if enabled else ""


def _guarded(command: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    from chaincomp.console import quiet

    quiet(bool(cfg.get("verbose", False)))
    try:
        result = fn(cfg)
    except KeyboardInterrupt:
        print(
            f"chaincomp {command}: interrupted{_killed_note(cfg)}",
            file=sys.stderr,
        )
        sys.exit(130)
    except SystemExit as exc:
        # SIGTERM: ours (Terminated) or Lightning's SIGTERMException (a SystemExit of code 0
        # raised by its own handler during fit): a scheduler must not see success
        if isinstance(exc, Terminated) or type(exc).__name__ == "SIGTERMException":
            print(
                f"chaincomp {command}: terminated (SIGTERM){_killed_note(cfg)}",
                file=sys.stderr,
            )
            sys.exit(128 + signal.SIGTERM)
        raise
    except ChaincompError as exc:
        if command in WRITES_RUN_DIR:
            _drop_if_empty(_output_dir())
        print(f"chaincomp {command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if command in WRITES_RUN_DIR:
        run_id = result.get("mlflow_run_id") if isinstance(result, dict) else None
        print(f"run directory: {_output_dir()}" + (f"  MLflow run: {run_id}" if run_id else ""))
    return result


#: commands whose run directory holds their results (summary.json)
WRITES_RUN_DIR = ("train", "cost", "run", "sweep")


def hydra_argv(args: list[str], extra: list[str]) -> list[str]:
    """``args`` (the user's overrides and Hydra options) with the CLI's own overrides ``extra``
    placed where Hydra's argument parser takes them as overrides: right after the user's first
    override (``key=value``, ``+key=value``, ``~key``), or first when there is none. Hydra
    reads the overrides as one positional run, so appending them after an option (``chaincomp
    run experiment=x --cfg job``) would be rejected, and after ``--info`` read as its value."""
    for i, arg in enumerate(args):
        if ("=" in arg or arg.startswith("~")) and not arg.startswith("-"):
            return [*args[: i + 1], *extra, *args[i + 1 :]]
    return [*extra, *args]


def main(argv: list[str] | None = None) -> int:
    import hydra

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = args[0], args[1:]
    if command in HELP and ("--help" in overrides or "-h" in overrides):
        print(HELP[command] + HELP_TAIL.format(cmd=command))
        return 0
    extra = [f"hydra.job.name={command}"]
    if "-v" in overrides or "--verbose" in overrides:
        overrides = [a for a in overrides if a not in ("-v", "--verbose")]
        extra.append("verbose=true")
    if command not in COMMANDS:
        print(
            f"chaincomp: error: command: unknown {command!r}; allowed: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    task = functools.partial(_guarded, command, COMMANDS[command])
    functools.update_wrapper(task, COMMANDS[command])
    signal.signal(signal.SIGTERM, _on_sigterm)
    if not OmegaConf.has_resolver("chaincomp.pid"):
        OmegaConf.register_new_resolver("chaincomp.pid", os.getpid)
    sys.argv = [f"chaincomp-{command}", *hydra_argv(overrides, extra)]
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(task)
    app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
