"""L, the low-rank stage: the factorization is exact at full rank, costs what an independent
count says, and chains with D, P, Q, E in any order (cold equals warm, replay exact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from chaincomp.chain import load_chain, run_chain
from chaincomp.layers.quant import QuantConv2d
from chaincomp.pipeline import build_data, build_module
from chaincomp.stages import stage_class
from chaincomp.stages.lowrank import LowRank, break_even_rank, factorize

from .conftest import compose_cfg, make_ctx
from .test_chain import FAST
from .test_cold_warm import _check_order, baseline_ckpt, optimizer_groups  # noqa: F401


def test_full_rank_factorization_reproduces_the_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    pair = factorize(conv, 6)  # full rank of a 10 x 54 matrix is 10; 6 channels in: rank <= 10
    full = factorize(conv, min(conv.weight.reshape(10, -1).shape))
    assert torch.allclose(full(x), conv(x), atol=1e-5)
    assert not torch.allclose(pair(x), conv(x), atol=1e-3)  # truncation changes the output
    # the truncated pair is the best rank-6 approximation (Eckart-Young): its weight error is
    # the norm of the dropped singular values
    w = conv.weight.reshape(10, -1)
    approx = (pair[1].weight.reshape(10, 6) @ pair[0].weight.reshape(6, -1)).detach()
    dropped = torch.linalg.svdvals(w)[6:]
    assert torch.linalg.norm(w - approx).item() == pytest.approx(dropped.norm().item(), rel=1e-4)


def test_stage_factors_eligible_convs_and_counts_their_macs(digits_base, digits_module) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    convs = {n: m for n, m in digits_module.net.named_modules() if isinstance(m, nn.Conv2d)}
    stage = LowRank.from_config({"epochs": 0, "rank_ratio": 0.25})
    record = stage.run(digits_module, make_ctx(cfg, dm))
    first = next(iter(convs))  # the stem conv is left alone
    assert first not in record.ranks and record.ranks
    macs_saved = 0
    for name, rank in record.ranks.items():
        conv = convs[name]
        full = min(conv.out_channels, conv.in_channels * 9)
        assert rank == -(-full // 4) and rank < break_even_rank(conv)  # ceil(0.25 * full)
        pair = digits_module.net.get_submodule(name)
        assert [tuple(p.weight.shape) for p in pair] == [
            (rank, conv.in_channels, 3, 3),
            (conv.out_channels, rank, 1, 1),
        ]
        # MACs per output pixel: k*k*C_in*C_out before, k*k*C_in*r + r*C_out after
        sizes: list[int] = []
        hook = pair.register_forward_hook(lambda m, i, o, seen=sizes: seen.append(o[0, 0].numel()))
        digits_module.net.eval()
        with torch.no_grad():
            digits_module.net(dm.example_input(1))
        hook.remove()
        out_pixels = sizes[0]
        before = 9 * conv.in_channels * conv.out_channels * out_pixels
        after = (9 * conv.in_channels * rank + rank * conv.out_channels) * out_pixels
        macs_saved += before - after
    assert record.macs[0] - record.macs[1] == macs_saved


def test_chain_d_l_p_q_e_runs_prunes_and_quantizes_the_factors(tmp_path: Path) -> None:
    cfg = compose_cfg(
        *FAST,
        "chain.order=[D,L,P,Q,E]",
        "chain.steps.E.settings.max_loss=3.0",
        f"chain.cache_dir={tmp_path / 'cache'}",
        "chain.steps.D.settings.width_mult=1.0",
    )
    summary = run_chain(cfg, tmp_path / "run")
    assert summary.order == ("D", "L", "P", "Q", "E")
    records = summary.records
    ranks = records[1]["ranks"]
    assert records[1]["stage"] == "lowrank" and ranks
    net = summary.module.net
    name = next(iter(ranks))
    pair = net.backbone.get_submodule(name) if hasattr(net, "backbone") else net.get_submodule(name)
    assert all(isinstance(m, QuantConv2d) for m in pair)  # Q wrapped both factors
    assert pair[0].out_channels < ranks[name]  # P removed rank channels of the factor pair
    assert summary.bitops_ratio > 1
    dm = build_data(cfg)
    replayed = load_chain(tmp_path / "run" / "chain", build_module(cfg, dm))
    x, _ = next(iter(dm.loader("test", "cpu")))
    net.eval()
    replayed.eval()
    with torch.no_grad():
        assert torch.equal(net(x), replayed(x))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["letters"] == "DLPQE"


@pytest.mark.parametrize("order", ["QL", "LQ", "EL", "LE", "LD"])
def test_cold_equals_warm_with_lowrank(
    order: str,
    baseline_ckpt: Path,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    optimizer_groups: list,  # noqa: F811
) -> None:
    _check_order(order, baseline_ckpt, tmp_path / "cache", tmp_path, optimizer_groups)


def test_lowrank_is_found_through_its_yaml_target() -> None:
    assert stage_class("L") is LowRank and stage_class("lowrank") is LowRank
    assert stage_class("chaincomp.stages.lowrank.LowRank") is LowRank


def test_the_search_can_choose_lowrank() -> None:
    from omegaconf import OmegaConf

    from chaincomp.search.space import build_space

    cfg = compose_cfg(*FAST, "search.stages=[D,L,P,Q,E]")
    catalogue = OmegaConf.to_container(cfg.chain.steps, resolve=True)
    space = build_space(catalogue, list(cfg.search.stages), None, False, 1)  # type: ignore[arg-type]
    assert len(space.orders) == 120 and "DLPQE" in space.orders
    assert "lowrank.rank_ratio" in space.param_names()
