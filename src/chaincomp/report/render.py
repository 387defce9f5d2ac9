"""Tables and files: number formatting, Markdown tables and blocks, atomic text and figure
writes, and the long per-step table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from chaincomp import utils
from chaincomp.report.analysis import state_of
from chaincomp.report.load import Chain
from chaincomp.utils import atomic_write, pyplot


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if abs(v) >= 1e5 or (abs(v) >= 1000 and v.is_integer()):
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    return utils.markdown_table(rows, keys, _fmt)


def markdown(*blocks: str) -> str:
    """Markdown blocks (paragraphs, headings, tables, fenced code) separated by blank lines, so
    that every table and heading renders as one (a table glued to a paragraph does not)."""
    return "\n\n".join(b.strip("\n") for b in blocks if b.strip()) + "\n"


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def save_figure(fig: Any, path: Path) -> None:
    plt = pyplot()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


STEP_KEYS = (
    "chain",
    "kept",
    "k",
    "step",
    "val_metric",
    "test_metric",
    "val_delta",
    "test_delta",
    "val_bitops_ratio",
    "test_bitops_ratio",
    "val_bitops",
    "bitops",
    "macs",
    "params",
    "size_mb",
    "run_id",
)


def step_rows(chains: Sequence[Chain], kept: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """One row per step of every chain (the long table); ``kept``: whether the chain's run is
    among the run ids ``kept`` (its order's best by validation; all when not given)."""
    keep = None if kept is None else set(kept)
    out = []
    for c in chains:
        for k, row in enumerate(c.rows):
            s = state_of(c, k)
            out.append(
                {
                    "chain": c.order,
                    "kept": keep is None or c.run_id in keep,
                    "k": k,
                    "step": row.name,
                    "val_metric": row.val_metric,
                    "test_metric": row.test_metric,
                    "val_delta": s.delta,
                    "test_delta": s.test_delta,
                    "val_bitops_ratio": s.bitops_ratio,
                    "test_bitops_ratio": s.test_bitops_ratio,
                    "val_bitops": row.val_bitops,
                    "bitops": row.bitops,
                    "macs": row.macs,
                    "params": row.params,
                    "size_mb": row.size_mb,
                    "run_id": c.run_id,
                }
            )
    return out


def matrix_rows(matrix: Sequence[Sequence[float]], stages: Sequence[str]) -> list[dict[str, Any]]:
    """An order-effect matrix as table rows: one per stage X, its cell under each stage Y."""
    return [
        {"": x, **{y: matrix[i][j] for j, y in enumerate(stages)}} for i, x in enumerate(stages)
    ]
