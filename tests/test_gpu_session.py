"""benchmarks/gpu_session.sh, the script a GPU lease runs, rehearsed on the CPU at tiny size.

A lease gives minutes: a call that fails on a script error or a stale override spends them for
nothing. This runs the script's chain phase and two concurrent variants of the headline
experiment (ResNet-34 / CIFAR-10 at 1/16 width on 256 images), as the planned calls do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from .conftest import needs_shared

pytestmark = [pytest.mark.slow, needs_shared]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_session.sh"
TINY = (
    "trainer=cpu trainer.precision=32-true data.max_train_samples=256 data.val_size=256 "
    "data.batch_size=64 data.eval_batch_size=1000 model.width_mult=0.0625 "
    "chain.steps.D.settings.student.width_mult=0.0625 trainer.max_epochs=1 "
    "chain.steps.D.settings.epochs=1 chain.steps.P.settings.epochs=1 "
    "chain.steps.Q.settings.epochs=1 chain.steps.E.settings.epochs=1"
)


def _session(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        **os.environ,
        "PY": sys.executable,
        "OUT": str(tmp_path / "out"),
        "RUNS": str(tmp_path / "runs"),  # not /tmp's shared run folders
        "WHEELS": str(tmp_path / "no-wheels"),  # this .venv's packages, not a carried .whl/
        "CHAINCOMP_CACHE_DIR": str(tmp_path / "cache"),
        "BENCH": "0",
        "CHAIN_LIMIT": "600",
        "VARIANT_LIMIT": "600",
        "CHAIN_ARGS": TINY,
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], cwd=REPO, env=full, capture_output=True, text=True, timeout=900
    )


def test_chain_then_concurrent_variants_share_a_new_step(tmp_path: Path) -> None:
    """The chain, then two variants at once that both need a D the chain did not run: each
    variant's summary comes back with its own settings, and the new D is trained once (one
    variant computes it, the other waits for it or finds it cached)."""
    variants = "chain.steps.D.settings.epochs=3;chain.steps.D.settings.epochs=3 chain.steps.P.settings.epochs=2"
    proc = _session(tmp_path, VARIANTS=variants, VARIANT_JOBS="2")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "headline: rc=0" in (out / "headline.log").read_text()
    chain = json.loads((out / "summary.json").read_text())
    assert chain["letters"] == "DPQE"
    # what a lease returns: the variants' files packed (benchmarks/pack_out.sh), 5 files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.txt", "headline.log", "summary.json", "headline_run.tgz", "variants.tgz"]
    )
    with tarfile.open(out / "variants.tgz") as tar:
        tar.extractall(tmp_path / "variants", filter="data")
    # each chain's result is also a line of the call's output
    b = chain["baseline"]
    assert (
        f"headline: DPQE baseline {b['val_metric']:.2f} / {b['test_metric']:.2f}, final "
        f"{chain['val_metric']:.2f} / {chain['test_metric']:.2f} (val / test), "
        f"{chain['bitops_ratio']:.1f}x fewer BitOps"
    ) in proc.stdout
    computed = []
    for i, overrides in enumerate(variants.split(";"), start=1):
        log = (tmp_path / "variants" / f"variant-{i}.log").read_text()
        assert f"variant {i} ({overrides}): rc=0" in log
        summary = json.loads((tmp_path / "variants" / f"variant-{i}.json").read_text())
        assert f"variant {i}: DPQE baseline " in log
        assert f"{summary['bitops_ratio']:.1f}x fewer BitOps" in log
        steps = {s["name"]: s for s in summary["stages"]}
        assert list(steps) == ["D", "P", "Q", "E"]
        # the phase-1 chain's D (1 epoch) is not this D (3 epochs): only the baseline is shared
        assert summary["baseline"]["cached"] is True
        computed.append(not steps["D"]["cached"])
        assert steps["P"]["cached"] is False  # P differs between the two (1 and 2 epochs)
    assert computed.count(True) == 1, computed
    assert (out / "headline_run.tgz").stat().st_size > 0
    assert (tmp_path / "runs" / "headline_run" / "summary.json").is_file()


def test_bad_variant_jobs_is_one_clear_error(tmp_path: Path) -> None:
    proc = _session(tmp_path, CHAIN="0", VARIANTS="seed=1", VARIANT_JOBS="0")
    assert proc.returncode == 2
    assert "VARIANT_JOBS=0: a whole number >= 1" in proc.stderr
    assert not list((tmp_path / "out").glob("variant-*"))
