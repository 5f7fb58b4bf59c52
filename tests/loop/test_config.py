"""The strict config schema and its loader: every mistake names file, key and expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop.config import Config
from loop.config_load import ConfigError, load_config, parse_yaml

REPO = Path(__file__).resolve().parents[2]
ALL_CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_there_are_configs_to_check():
    names = {p.name for p in ALL_CONFIGS}
    assert {"tiny.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.campaign.name


def test_tiny_values_and_defaults():
    cfg = load_config(REPO / "configs/tiny.yaml")
    assert cfg.rm.lr == pytest.approx(1e-4)  # `1e-4` is a float (YAML 1.2), not a string
    assert cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt == 8
    assert cfg.ppo.kl.controller == "adaptive"  # a default below an explicit section
    assert cfg.ppo.kl.target == 6.0


def test_overrides_get_yaml_types(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", [
        "ppo.kl.target=3", "ppo.lr=1e-6", "ppo.whiten_advantages=false",
        "storage.db_url=sqlite:///x.db", "campaign.run_dir=null", "rm.ensemble.combine=min",
    ])
    assert cfg.ppo.kl.target == 3.0 and isinstance(cfg.ppo.kl.target, float)
    assert cfg.ppo.lr == 1e-6
    assert cfg.ppo.whiten_advantages is False
    assert cfg.storage.db_url == "sqlite:///x.db"
    assert cfg.campaign.run_dir is None
    assert cfg.rm.ensemble.combine == "min"


def test_override_creates_a_missing_section(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\n")
    assert load_config(path, ["labeling.biases.length=0.25"]).labeling.biases.length == 0.25


def test_wrong_type_from_override_names_file_key_and_type():
    path = REPO / "configs/tiny.yaml"
    msg = error_of(path, ["ppo.lr=abc"])
    assert msg == f"{path}, override 'ppo.lr=abc': ppo.lr: expected a valid number, got 'abc'"


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nrollout:\n  workers: two\n")
    assert error_of(path) == f"{path}: rollout.workers: expected a valid integer, got 'two'"


def test_float_where_int_expected_is_refused(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nrollout: {workers: 2.5}\n")
    assert "rollout.workers: expected a valid integer, got 2.5" in error_of(path)


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nppo: {lrr: 0.1}\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}: ppo.lrr: unknown key; did you mean 'lr'? expected one of:")
    assert "clip_range" in msg


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nrewards: {}\n")
    assert error_of(path) == (f"{path}: rewards: unknown key; expected one of: campaign, models, "
                              "rollout, labeling, rm, ppo, monitors, storage, resources, metrics")


def test_out_of_range_values(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\n")
    assert "ppo.kl.target: expected greater than 0, got -1" in error_of(path, ["ppo.kl.target=-1"])
    assert "rm.zero_stage: expected 0, 1, 2 or 3, got 4" in error_of(path, ["rm.zero_stage=4"])
    assert "rollout.samples_per_prompt: expected greater than or equal to 2, got 1" in \
        error_of(path, ["rollout.samples_per_prompt=1"])
    assert "rm.label_smoothing: expected less than 0.5, got 0.5" in \
        error_of(path, ["rm.label_smoothing=0.5"])


def test_literal_choice(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nlabeling: {judge: oracle}\n")
    assert error_of(path) == (f"{path}: labeling.judge: expected 'gold', 'simulated', "
                              "'verifier' or 'http', got 'oracle'")


def test_missing_required_name(tmp_path):
    path = write(tmp_path, "campaign: {seed: 1}\n")
    assert error_of(path) == f"{path}: campaign.name: required key is missing"


def test_cross_field_rule(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\n")
    msg = error_of(path, ["ppo.minibatch_size=100"])
    assert msg == (f"{path}: ppo.minibatch_size=100 exceeds the rollout batch of 16 sequences "
                   "(rollout.prompts_per_iteration × rollout.samples_per_prompt)")


def test_several_errors_one_line_each(tmp_path):
    path = write(tmp_path, "campaign: {name: x}\nppo: {lr: x, epochs: 0}\n")
    lines = error_of(path).splitlines()
    assert lines == [f"{path}: ppo.lr: expected a valid number, got 'x'",
                     f"{path}: ppo.epochs: expected greater than or equal to 1, got 0"]


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = write(tmp_path, "campaign:\n  name: x\n  seed: [1, 2\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:4:1: invalid YAML:")


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- 1\n- 2\n")
    assert error_of(path) == f"{path}: expected a mapping of sections at the top level, got list"


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"


@pytest.mark.parametrize("bad", ["ppo.lr", "=3", "ppo..lr=3", ".lr=1"])
def test_malformed_override(tmp_path, bad):
    path = write(tmp_path, "campaign: {name: x}\n")
    assert error_of(path, [bad]) == (f"{path}, override {bad!r}: expected KEY=VALUE with a "
                                     "dotted key, e.g. ppo.kl.target=6.0")


def test_override_into_a_value():
    path = REPO / "configs/tiny.yaml"
    assert error_of(path, ["ppo.lr.x=1"]) == (
        f"{path}, override 'ppo.lr.x=1': ppo.lr is a value, not a section")


def test_config_is_frozen():
    cfg = load_config(REPO / "configs/tiny.yaml")
    with pytest.raises(Exception, match="frozen"):
        cfg.ppo.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(("text", "expected"), [
    ("1e-5", 1e-5), ("-2.5E+3", -2500.0), ("3", 3), ("3.0", 3.0), (".5", 0.5), ("abc", "abc"),
    ("1_000", 1000), ("true", True), ("null", None), ("1.2.3", "1.2.3"),
])
def test_yaml_scalars(text, expected):
    value = parse_yaml(text, "t")
    assert value == expected and type(value) is type(expected)
