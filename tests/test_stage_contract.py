"""The stage contract, run over every conf/stage/*.yaml (one suite, every implementation).

For each stage file: the YAML's settings build the stage; applying it to a tiny trained net keeps
the forward working; the summary is finite; bad values fail with a message naming the key;
replay from the record rebuilds a net whose outputs equal the compressed one's.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from chaincomp.chain import replay
from chaincomp.errors import ConfigError
from chaincomp.pipeline import build_module
from chaincomp.stages import RecordError, Stage, record_from_json, stage_class, stages

from .conftest import CONF, make_ctx

STAGE_FILES = sorted(CONF.glob("stage/*.yaml"))

# per stage: (key, bad value) pairs that construction must reject
BAD_VALUES: dict[str, list[tuple[str, Any]]] = {
    "distill": [
        ("alpha", 1.5),
        ("temperature", 0.0),
        ("width_mult", 0.0),
        ("epochs", -1),
        ("cutout", -1),
    ],
    "prune": [
        ("ratio", 1.0),
        ("ratio", 0.0),
        ("importance", "l3"),
        ("steps", 0),
        ("macs_target", 1.2),
        ("kd_alpha", 1.0),
        ("kd_temperature", 0.0),
        ("cutout", 2.5),
    ],
    "quantize": [
        ("w_bits", 0),
        ("w_bits", 9),
        ("a_bits", 1),
        ("calibration", "mse"),
        ("first_bits", 0),
        ("kd_alpha", -0.1),
        ("kd_teacher", "teacher"),
        ("cutout", True),
    ],
    "early_exit": [
        ("head", "mlp"),
        ("threshold", -0.1),
        ("train", "sometimes"),
        ("points", [2, 1]),
        ("cutout", -3),
    ],
    "lowrank": [
        ("rank_ratio", 0.0),
        ("rank_ratio", 1.5),
        ("energy", 0.0),
        ("min_channels", 0),
        ("kd_alpha", 1.0),
        ("cutout", "8"),
    ],
}


def _load(path: Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def _fast(settings: dict[str, Any]) -> dict[str, Any]:
    return {**settings, "epochs": min(1, settings.get("epochs", 1))}


def test_every_stage_has_a_yaml_and_bad_values() -> None:
    assert {p.stem for p in STAGE_FILES} == set(stages())
    assert set(BAD_VALUES) == set(stages())
    for path in STAGE_FILES:  # each file names its class, the way Hydra instantiates it
        cls = stage_class(_load(path)["_target_"])
        assert cls.name == path.stem and stage_class(cls.letter) is cls


@pytest.fixture(params=STAGE_FILES, ids=lambda p: p.stem)
def stage_yaml(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _load(request.param)


def test_yaml_builds_the_stage(stage_yaml: dict[str, Any]) -> None:
    cls = stage_class(stage_yaml["stage"])
    stage = cls.from_config(stage_yaml["settings"])
    assert isinstance(stage, Stage) and isinstance(stage.settings, cls.Settings)
    # the YAML lists every setting (so it documents the stage) and the search space is a subset
    assert set(stage_yaml["settings"]) == set(stage.settings.as_dict())
    assert set(stage_yaml.get("search", {})) <= set(stage.settings.as_dict())


def test_bad_values_name_the_key(stage_yaml: dict[str, Any]) -> None:
    cls = stage_class(stage_yaml["stage"])
    for key, value in BAD_VALUES[cls.name]:
        with pytest.raises(ConfigError, match=rf"stage\.{cls.name}\.{key}: .*allowed"):
            cls.from_config({**stage_yaml["settings"], key: value})
    with pytest.raises(ConfigError, match=rf"stage\.{cls.name}\.nonsense: unknown key"):
        cls.from_config({"nonsense": 1})


def test_apply_forward_summary_replay(
    stage_yaml: dict[str, Any], digits_base, digits_module
) -> None:  # type: ignore[no-untyped-def]
    cfg, dm, _ = digits_base
    cls = stage_class(stage_yaml["stage"])
    stage = cls.from_config(_fast(stage_yaml["settings"]))
    module = digits_module
    ctx = make_ctx(cfg, dm, max_batches=4)
    record = stage.run(module, ctx)
    assert isinstance(record, cls.Record) and record.stage == cls.name
    # typed, versioned records: the JSON round-trip is exact; another version is refused
    data = json.loads(json.dumps(record.to_json()))
    assert data["stage"] == cls.name and data["version"] == cls.Record.VERSION
    assert record_from_json(data) == record
    with pytest.raises(RecordError, match="version"):
        record_from_json({**data, "version": cls.Record.VERSION + 1})
    with pytest.raises(RecordError, match="unknown keys"):
        record_from_json({**data, "nonsense": 1})

    x, _ = next(iter(dm.loader("test", "cpu")))
    module.eval()
    with torch.no_grad():
        out = module(x)
    assert out.shape == (len(x), dm.num_outputs) and torch.isfinite(out).all()
    summary = stage.summary()
    assert summary and all(math.isfinite(v) for v in summary.values())

    entry = {
        "data": {
            "in_channels": dm.in_channels,
            "num_outputs": dm.num_outputs,
            "image_size": list(dm.image_size),
        },
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "records": [data],
    }
    fresh = build_module(cfg, dm)
    replay(entry, module.net.state_dict(), fresh)
    fresh.eval()
    with torch.no_grad():
        again = fresh(x)
    assert torch.equal(out, again)


def test_every_stage_trains_on_its_cutout(stage_yaml: dict[str, Any], digits_base) -> None:  # type: ignore[no-untyped-def]
    """``settings.cutout`` reaches every fit of every stage: the batches its fits train on are
    the data's own batches with a square of zeros (the mean) per image; the data's setting
    (no Cutout) is back after the step."""
    cfg, dm, net = digits_base
    assert dm.cfg.cutout == 0
    cls = stage_class(stage_yaml["stage"])
    stage = cls.from_config({**_fast(stage_yaml["settings"]), "cutout": 3})
    module = build_module(cfg, dm, copy.deepcopy(net))
    ctx = make_ctx(cfg, dm, max_batches=2)
    seen: list[torch.Tensor] = []

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if batch_idx == 0:
                seen.append(batch[0].detach().cpu().clone())

    real = ctx.fit

    def fit(module: Any, epochs: int, callbacks: Any = (), lr: Any = None) -> float:
        return float(real(module, epochs, callbacks=[*callbacks, FirstBatch()], lr=lr))

    stage.run(module, dataclasses.replace(ctx, fit=fit))
    assert seen, "the stage trained on no batch"
    assert dm.cfg.cutout == 0
    plain, _ = next(iter(dm.loader("train", "cpu")))  # a new loader's first pass: the same draws
    for x in seen:
        assert x.shape == plain.shape
        assert torch.equal(torch.where(x == 0, plain, x), plain)  # differs only by zeros
        assert ((x != plain).flatten(1).any(1)).float().mean() > 0.9  # nearly every image cut


def test_whole_floats_become_ints_for_optional_int_settings() -> None:
    """``8.0`` is accepted for an ``int | None`` setting as for an ``int`` one; ``8.5`` is not."""
    settings: Any = stage_class("prune").from_config({"cutout": 8.0, "round_to": 4.0}).settings
    assert (settings.cutout, settings.round_to) == (8, 4)
    assert isinstance(settings.cutout, int) and isinstance(settings.round_to, int)
    with pytest.raises(ConfigError, match=r"stage\.prune\.cutout"):
        stage_class("prune").from_config({"cutout": 8.5})
