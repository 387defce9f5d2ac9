"""The figures: the Pareto front of every chain and prefix, one chain's waterfall and the
order-effect matrix, each saved atomically as PNG."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from chaincomp.report.analysis import State, pareto, ratio
from chaincomp.report.load import Chain
from chaincomp.report.render import save_figure
from chaincomp.utils import pyplot


def _metric_name(hib: bool) -> str:
    return "accuracy (%)" if hib else "MAE (degrees)"


def plot_pareto(
    chains: Sequence[Chain], states: Mapping[str, State], hib: bool, path: Path, title: str
) -> None:
    """Every state on (validation BitOps reduction, validation metric) and their front."""
    plt = pyplot()

    pts = [s for o, s in states.items() if o]
    xy = [(s.metric, s.bitops_ratio) for s in pts]
    front = pareto(xy, hib)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = "vsDoP*Xh"  # one per chain length, as many steps as the chains have
    for n in sorted({len(s.order) for s in pts}):
        marker = markers[(n - 1) % len(markers)]
        sel = [s for s in pts if len(s.order) == n]
        if sel:
            ax.scatter(
                [s.bitops_ratio for s in sel],
                [s.metric for s in sel],
                marker=marker,
                alpha=0.6,
                label=f"{n} step{'s' if n > 1 else ''}",
            )
    fx = [pts[i].bitops_ratio for i in front]
    fy = [pts[i].metric for i in front]
    ax.plot(fx, fy, "k--", lw=1, label="Pareto front (validation)")
    for i in front:
        ax.annotate(
            pts[i].order,
            (pts[i].bitops_ratio, pts[i].metric),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    base = chains[0].base.val_metric
    ax.axhline(base, color="grey", lw=0.8, ls=":", label=f"baseline {base:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("validation BitOps reduction (baseline / chain, expected per sample)")
    ax.set_ylabel(f"validation {_metric_name(hib)}")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_waterfall(chain: Chain, hib: bool, path: Path, title: str) -> None:
    """One chain step by step: test BitOps reduction (bars), validation and test metric."""
    plt = pyplot()

    labels = ["baseline", *[f"+{r.name}" for r in chain.rows[1:]]]
    ratios = [ratio(chain.base.bitops, r.bitops) for r in chain.rows]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    bars = ax.bar(labels, ratios, color="tab:blue", alpha=0.7)
    ax.set_yscale("log")
    ax.set_ylabel("test BitOps reduction (x, log)")
    for b, r in zip(bars, ratios, strict=True):
        ax.annotate(
            f"{r:.1f}x",
            (b.get_x() + b.get_width() / 2, r),
            ha="center",
            fontsize=8,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax2 = ax.twinx()
    ax2.plot(
        labels, [r.val_metric for r in chain.rows], "s--", color="tab:orange", label="validation"
    )
    ax2.plot(labels, [r.test_metric for r in chain.rows], "o-", color="tab:red", label="test")
    ax2.set_ylabel(_metric_name(hib), color="tab:red")
    ax2.legend(fontsize=7)
    ax.set_title(title)
    save_figure(fig, path)


def plot_matrix(
    matrix: Sequence[Sequence[float]], stages: Sequence[str], hib: bool, path: Path, title: str
) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    grid = [[float(v) for v in line] for line in matrix]
    vals = [v for line in grid for v in line if not math.isnan(v)]
    lim = max([abs(v) for v in vals] or [1.0])
    cmap = "RdBu" if hib else "RdBu_r"
    im = ax.imshow(grid, cmap=cmap, vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(stages)), [f"before {s}" for s in stages], fontsize=8)
    ax.set_yticks(range(len(stages)), stages)
    for i, line in enumerate(matrix):
        for j, v in enumerate(line):
            if not math.isnan(v):
                ax.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"mean Δ validation {_metric_name(hib)}")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
