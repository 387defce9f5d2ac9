"""benchmarks/pack_out.sh: a GPU lease's output folder fits what the lease returns.

A lease returns at most 8 files of at most 16 MiB from $OUT, and leaves the rest out; the
planned call of four headline variants after the chain writes 12. pack_out.sh (run by
gpu_session.sh on exit) packs them so that nothing is lost and the carried files keep their
names.
"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "pack_out.sh"

CHAIN = ["env.txt", "headline.log", "summary.json", "headline_run.tgz"]
VARIANTS = [f"variant-{i}.{ext}" for i in range(1, 5) for ext in ("log", "json")]
ORDERS = [
    "orders.log",
    "orders-summary.json",
    "orders.journal",
    "orders-chains.tgz",
    "orders-report.tgz",
]
BENCH = ["bench.log", "bench-resnet18.log", "bench-resnet34.log"]


def _fill(out: Path, names: list[str]) -> None:
    out.mkdir()
    for name in names:
        (out / name).write_text(f"content of {name}\n")


def _pack(out: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def _members(archive: Path) -> dict[str, str]:
    with tarfile.open(archive) as tar:
        return {
            m.name: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def test_the_chain_and_four_variants_come_back_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fill(out, CHAIN + VARIANTS)  # 12 files: 4 would not return
    proc = _pack(out)
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([*CHAIN, "variants.tgz"])
    assert _members(out / "variants.tgz") == {n: f"content of {n}\n" for n in VARIANTS}
    assert "WARNING" not in proc.stderr
    assert "holds 5 files" in proc.stdout


def test_every_phase_at_once_keeps_the_carried_files_by_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["profile.log", "decode.log"]
    _fill(out, CHAIN + VARIANTS + ORDERS + BENCH + extra)  # 22 files
    proc = _pack(out)
    left = sorted(p.name for p in out.iterdir())
    assert len(left) <= 8, left
    # ORDERS_FROM carries these two as they are; env.txt says which card
    assert {"orders.journal", "orders-chains.tgz", "env.txt"} <= set(left)
    logs = _members(out / "logs.tgz")
    loose = ["headline.log", "summary.json", "orders.log", "orders-summary.json", "bench.log"]
    assert set(logs) == set(loose + extra)
    assert logs["summary.json"] == "content of summary.json\n"
    assert not any(name.startswith("bench-") for name in left + list(logs))  # in bench.log
    assert "WARNING" not in proc.stderr


def test_few_files_stay_as_they_are(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fill(out, ["env.txt", *ORDERS])  # an order-study lease: 6 files
    _pack(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["env.txt", *ORDERS])
    assert (out / "orders.log").read_text() == "content of orders.log\n"


def test_what_would_not_return_is_named(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fill(out, ["env.txt", "a b.log"])
    with open(out / "big.tgz", "wb") as f:
        f.truncate(16 * 1024 * 1024 + 1)
    proc = _pack(out)
    assert "big.tgz is over 16 MiB" in proc.stderr
    assert "a b.log: the lease returns names of letters, digits" in proc.stderr
    assert (out / "big.tgz").is_file()  # left in place, not packed or dropped


def test_a_benchmark_cut_off_keeps_its_log(tmp_path: Path) -> None:
    """bench-<model>.log is appended to bench.log when the model's run ends; one cut off before
    that (the call stopped mid-benchmark) is appended on packing, not dropped."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.log").write_text("resnet18 figures\nbench resnet18: rc=0 80 s\n")
    (out / "bench-resnet18.log").write_text("resnet18 figures\nbench resnet18: rc=0 80 s\n")
    (out / "bench-resnet34.log").write_text("resnet34 half a run\n")
    _pack(out)
    assert sorted(p.name for p in out.iterdir()) == ["bench.log"]
    assert (out / "bench.log").read_text() == (
        "resnet18 figures\nbench resnet18: rc=0 80 s\nresnet34 half a run\n"
    )


def test_a_second_pass_keeps_what_the_first_packed(tmp_path: Path) -> None:
    """gpu_session.sh packs after the variants and again on exit: a variant file written in
    between (a line appended to a log) joins the archive, nothing of the first pass is lost."""
    out = tmp_path / "out"
    _fill(out, CHAIN + VARIANTS)
    _pack(out)
    (out / "variant-4.log").write_text("variant 4: rc=124 330 s\n")
    _pack(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*CHAIN, "variants.tgz"])
    members = _members(out / "variants.tgz")
    assert set(members) == set(VARIANTS)
    assert members["variant-4.log"] == "variant 4: rc=124 330 s\n"
    assert members["variant-1.json"] == "content of variant-1.json\n"


def test_more_than_64_mib_together_is_named(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for i in range(5):  # 5 x 14 MiB: each file fits, together they do not
        with open(out / f"part{i}.tgz", "wb") as f:
            f.truncate(14 * 1024 * 1024)
    proc = _pack(out)
    assert "bytes together: the lease returns 64 MiB" in proc.stderr
    assert "over 16 MiB" not in proc.stderr
