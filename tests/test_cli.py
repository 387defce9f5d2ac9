"""End to end through the console script: summary.json, MLflow contents, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from chaincomp.cli import SUMMARY_KEYS as CLI_SUMMARY_KEYS

from .conftest import chaincomp_cli

SUMMARY_KEYS = set(CLI_SUMMARY_KEYS)


def chaincomp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return chaincomp_cli(*args, cwd=cwd)


def test_train_writes_summary_and_logs_to_mlflow(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = chaincomp(
        "train",
        "data=digits",
        "model=small_cnn",
        "trainer.max_epochs=3",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["task"] == "classify" and summary["metric_name"] == "accuracy"
    assert summary["val_metric"] > 80 and summary["test_metric"] > 80
    # SmallCNN (16, 32, 64) on 8x8x1 digits, counted by hand (3x3 convs, "same" padding):
    # stem 9*1*16*64 + stage 0 (8x8) 2 * 9*16*16*64 + stage 1 (4x4) 9*16*32*16 + 9*32*32*16
    # + stage 2 (2x2) 9*32*64*4 + 9*64*64*4 + head 64*10
    assert summary["macs"] == 9216 + 294912 + 73728 + 147456 + 73728 + 147456 + 640 == 747136
    assert summary["bitops"] == 747136 * 32 * 32  # float: 32-bit weights x 32-bit activations
    assert (tmp_path / "mlflow.db").is_file()  # the default store: sqlite in the working directory
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.name"] == "digits"
    assert run.data.params["model._target_"] == "chaincomp.models.SmallCNN"
    assert run.data.metrics["test_metric"] == pytest.approx(summary["test_metric"])
    assert "baseline/val/accuracy" in run.data.metrics  # per-epoch metrics from the Trainer
    history = client.get_metric_history(run.info.run_id, "baseline/val/accuracy")
    assert [m.step for m in history] == [0, 1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    assert (run_dir / "baseline.pt").is_file()


def test_cost_command_prints_table_and_writes_summary(tmp_path: Path) -> None:
    proc = chaincomp(
        "cost",
        "model=resnet18",
        "data=digits",
        f"hydra.run.dir={tmp_path / 'c'}",
        "tracking.enabled=false",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stages.3.1.conv2" in proc.stdout and "total" in proc.stdout
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["val_metric"] is None and summary["mlflow_run_id"] is None
    # an independent count: PyTorch's FLOP counter (2 FLOPs per multiply-accumulate) on the
    # same network, built from the config as the command builds it
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from chaincomp.pipeline import build_data, build_net

    from .conftest import compose_cfg

    cfg = compose_cfg("model=resnet18", "data=digits", "tracking.enabled=false")
    net = build_net(cfg, build_data(cfg)).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        net(torch.zeros(1, 1, 8, 8))
    assert summary["macs"] == flops.get_total_flops() // 2 > 0
    assert summary["params"] == sum(p.numel() for p in net.parameters())
    assert summary["bitops"] == summary["macs"] * 32 * 32
    fc = next(r for r in summary["layers"] if r["name"] == "head.fc")
    assert fc["macs"] == 512 * 10  # the final linear: 512 features -> 10 classes


@pytest.mark.parametrize(
    "args,expected",
    [
        (["train", "data=svhn"], "Could not find 'data/svhn'"),
        (["train", "data.batch_size=0"], "data.batch_size: 0 is not positive; allowed: >= 1"),
        (["train", "optim.name=adam"], "optim.name: unknown optimizer 'adam'; allowed: adamw, sgd"),
        (["train", "data.colour=3"], "data.colour"),
        (["train", "model=custom", "model._target_=torch.nn.Identity"], "does not fit the task"),
        (["train", "data=imagefolder"], "data.path"),
        (["frobnicate"], "command: unknown 'frobnicate'; allowed: train, cost"),
    ],
)
def test_bad_input_gets_one_clear_error(tmp_path: Path, args: list[str], expected: str) -> None:
    proc = chaincomp(*args, "tracking.enabled=false", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_failed_run_is_marked_failed_in_mlflow(tmp_path: Path) -> None:
    proc = chaincomp(
        "train",
        "data=imagefolder",
        f"data.path={tmp_path / 'missing'}",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("chaincomp")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "no imagefolder dataset there" in runs[0].data.tags["error"]


@pytest.mark.parametrize("command", ["train", "cost", "run", "sweep", "report", "ui"])
def test_command_help_describes_it_before_any_config(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "chaincomp.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"usage: chaincomp {command} [key=value ...]"
    assert "common overrides:" in lines and len(lines) < 40  # no config dump
    overrides = lines[lines.index("common overrides:") + 1 :]
    assert sum(1 for line in overrides if line.startswith("  ") and "=" in line) == 5


@pytest.mark.parametrize(
    "args",
    [
        ["data=digits", "optim.lr=0.3", "--cfg", "job", "-v"],  # the README's order: options last
        ["--cfg", "job", "data=digits", "optim.lr=0.3", "-v"],
        ["-v", "--cfg", "job"],
        ["--cfg", "job", "~seed", "-v"],  # a deletion override (no "=")
    ],
)
def test_cfg_job_prints_the_composed_config_wherever_the_options_stand(
    tmp_path: Path, args: list[str]
) -> None:
    """``--cfg job`` prints the config and runs nothing, before or after the overrides (the
    CLI's own overrides, the job name and ``-v``'s ``verbose=true``, used to land after the
    options, where Hydra's parser rejected them)."""
    proc = chaincomp("run", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verbose: true" in proc.stdout
    if "optim.lr=0.3" in args:
        assert "lr: 0.3" in proc.stdout and "name: digits" in proc.stdout
    keys = {line.split(":")[0] for line in proc.stdout.splitlines() if not line.startswith(" ")}
    assert ("seed" in keys) == ("~seed" not in args) and "data" in keys
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "mlflow.db").exists()
