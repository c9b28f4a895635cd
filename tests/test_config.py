"""Typed Hydra configuration: every shipped YAML composes and validates; bad values name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from dpm_dist.cli.common import CONFIG_MODULE
from dpm_dist.config import DPMConfig, register_configs, to_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the source of truth; composed through the package


def _compose(overrides: list[str]) -> DPMConfig:
    register_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return to_config(compose("train", overrides=overrides))


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / name).glob("*.yaml"))


def test_every_yaml_starts_with_the_command_that_runs_it():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert len(files) >= 12
    for path in files:
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
        assert lines[0].startswith("# dpm-"), f"{path} does not start with its command"


@pytest.mark.parametrize("experiment", _group("experiment"))
def test_every_experiment_composes(experiment):
    cfg = _compose([f"experiment={experiment}"])
    assert isinstance(cfg, DPMConfig)
    assert list(cfg.model.img_size) == list(cfg.data.img_size)


@pytest.mark.parametrize("engine", _group("engine"))
@pytest.mark.parametrize("model", _group("model"))
def test_every_model_and_engine_composes(model, engine):
    cfg = _compose([f"model={model}", f"engine={engine}"])
    assert cfg.engine.gradient_clipping == 0.0  # never DeepSpeed's silent default of 1.0


@pytest.mark.slow
def test_paper_presets_follow_spec_section_8():
    occ = _compose(["experiment=occluded_duke"])
    assert (list(occ.model.stride), occ.loss.margin, occ.loss.beta, occ.optim.epochs) == ([11, 11], 0.5, 0.1, 150)
    assert occ.model.grid == (22, 11) and occ.model.tap_blocks == [2, 4, 10, 12] and occ.model.sie_coe == 3.0
    assert (occ.data.num_ids, occ.data.num_instances, occ.optim.base_lr, occ.eval.period) == (16, 4, 0.008, 10)
    for name in ("market1501", "dukemtmc"):
        cfg = _compose([f"experiment={name}"])
        assert (list(cfg.model.stride), cfg.loss.margin, cfg.model.grid) == ([12, 12], 0.3, (21, 10))
    assert _compose(["experiment=market1501"]).optim.epochs == 50
    for name in ("occluded_duke", "market1501", "dukemtmc", "market_to_occluded_reid", "msmt17"):
        cfg = _compose([f"experiment={name}"])  # the official optimiser and test feature
        assert (cfg.optim.name, cfg.eval.neck_feat, cfg.eval.distance) == ("sgd", "before", "masked_cosine"), name
    assert _compose(["experiment=dukemtmc"]).optim.epochs == 150
    oreid = _compose(["experiment=market_to_occluded_reid"])
    assert (oreid.loss.beta, oreid.data.color_jitter, oreid.data.eval_root, oreid.loss.margin) == (
        0.01,
        True,
        "shards/occluded_reid",
        0.3,
    )
    assert _compose(["experiment=msmt17"]).data.dataset == "msmt17"
    assert _compose([]).name == "tiny_synthetic"  # the default is the CPU demo


def test_search_fields_are_plain_overrides():
    cfg = _compose(["loss.alpha=0.3", "loss.beta=0.05", "loss.margin=0.4", "loss.scale=16"])
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.margin, cfg.loss.scale) == (0.3, 0.05, 0.4, 16.0)


@pytest.mark.parametrize(
    "override,field",
    [
        ("loss.alpha=1.5", "loss.alpha"),
        ("loss.margin=-0.1", "loss.margin"),
        ("model.stride=[17,17]", "model.stride"),
        ("data.dataset=cuhk03", "data.dataset"),
        ("engine.zero_stage=3", "engine.zero_stage"),
        ("engine.update_mode=fast", "engine.update_mode"),
        ("data.img_size=[256,128]", "data.img_size"),
        ("data.num_instances=1", "data.num_instances"),
        ("eval.distance=manhattan", "eval.distance"),
        ("eval.neck_feat=middle", "eval.neck_feat"),
        ("optim.name=adam", "optim.name"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=rf"config field `{field}`"):
        _compose([override])


def test_type_errors_are_caught_by_the_schema():
    with pytest.raises(Exception, match="loss.alpha|alpha"):
        _compose(["loss.alpha=high"])


def test_every_config_field_is_documented():
    import dataclasses
    from pathlib import Path

    from dpm_dist import config as C

    text = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    sections = {
        "model": C.ModelConfig,
        "loss": C.LossConfig,
        "data": C.DataConfig,
        "optim": C.OptimConfig,
        "engine": C.EngineConfig,
        "eval": C.EvalConfig,
        "log": C.LogConfig,
    }
    missing = [
        f"{name}.{f.name}"
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if f"`{f.name}`" not in text
    ]
    assert not missing, f"docs/configuration.md does not name: {', '.join(missing)}"


# ---- mistakes in the overrides: one line naming the field, never a silently ignored key ------------------------


def test_a_key_added_with_plus_that_is_not_a_field_is_refused_naming_the_nearest_field():
    with pytest.raises(ValueError) as info:
        _compose(["+optim.base_lrr=0.1", "+loss.alpah=0.9"])
    message = str(info.value)
    assert "`optim.base_lrr` (did you mean `optim.base_lr`?)" in message
    assert "`loss.alpah` (did you mean `loss.alpha`?)" in message
    assert "\n" not in message and "+optim" not in message


def test_a_plain_dict_with_a_stray_key_is_refused_too():
    with pytest.raises(ValueError, match=r"unknown config field `data\.rooot` \(did you mean `data\.root`\?\)"):
        to_config({"data": {"rooot": "x"}})
    with pytest.raises(ValueError, match=r"unknown config field `nonsense`:"):
        to_config({"nonsense": 1})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.base_lrr=0.1", "unknown config field `optim.base_lrr` (did you mean `optim.base_lr`?)"),
        ("eval.distanse=cosine", "unknown config field `eval.distanse` (did you mean `eval.distance`?)"),
        ("eval.max_rank=abc", "config field `eval.max_rank` (expects int): Value 'abc'"),
        ("model.img_size=3", "config field `model.img_size` (expects list[int])"),
        ("loss.alpha=null", "config field `loss.alpha` (expects float)"),
        ("experiment=nope", "Could not find 'experiment/nope' (available: dukemtmc, "),
        ("optim.base_lr=[1", "config overrides: "),
    ],
)
def test_composition_errors_are_one_line_naming_the_field(override, expected):
    from dpm_dist.cli.common import check_overrides

    with pytest.raises(ValueError) as info:
        check_overrides(["--cfg", "job", override])
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert "To append to your config use" not in str(info.value)


def test_a_per_rank_p_on_the_command_line_is_refused_where_the_preset_states_the_global_batch():
    """data.num_ids is not used while data.global_num_ids is set (the paper presets): refused naming the field, not
    silently ignored; with data.global_num_ids given too, or on a preset without a global batch, it is accepted."""
    from dpm_dist.cli.common import check_overrides

    with pytest.raises(
        ValueError, match=r"^config field `data.num_ids`: not used: the preset sets data.global_num_ids=16"
    ):
        check_overrides(["experiment=occluded_duke", "data.num_ids=2"])
    check_overrides(["experiment=occluded_duke", "data.num_ids=2", "data.global_num_ids=0"])
    check_overrides(["experiment=occluded_duke", "data.global_num_ids=8"])
    check_overrides(["experiment=tiny", "data.num_ids=2"])
