"""The typed config: YAML + dotted overrides, unknown keys with suggestions, types and ranges."""

from __future__ import annotations

from pathlib import Path

import pytest

from detforge.config import load_config, parse_overrides, save_config
from detforge.errors import ConfigError


def test_yaml_then_overrides_on_the_same_paths(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: a.json\ntrain:\n  lr: 0.01\n  steps: [100]\n")
    cfg = load_config(path, ["train.lr=0.005", "train.steps=[300,400]", "model.arch=maskrcnn_resnet50_fpn_v2"])
    assert cfg.train.lr == 0.005 and cfg.train.steps == [300, 400]
    assert cfg.model.arch == "maskrcnn_resnet50_fpn_v2" and cfg.data.train == "a.json"


def test_unknown_key_names_the_closest_valid_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'train\.max_itr'\. Did you mean 'train\.max_iter'"):
        load_config({"data": {"train": "a.json"}}, ["train.max_itr=10"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian'\. Did you mean 'train'"):
        load_config({"data": {"train": "a.json"}, "trian": {}})


def test_names_from_other_tools_get_a_pointer() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs.*'train\.max_iter'.*not epochs"):
        load_config({"data": {"train": "a.json"}}, ["train.epochs=12"])
    with pytest.raises(ConfigError, match="number of classes comes from the dataset"):
        load_config({"data": {"train": "a.json"}}, ["model.num_classes=3"])


def test_wrong_types_and_ranges_say_expected_and_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'train\.lr'.*valid number.*found 'fast'"):
        load_config({"data": {"train": "a.json"}}, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"'train\.batch_size'.*greater than 0.*found 0"):
        load_config({"data": {"train": "a.json"}}, ["train.batch_size=0"])
    with pytest.raises(ConfigError, match=r"train\.steps must be increasing.*\[300, 200\]"):
        load_config({"data": {"train": "a.json"}}, ["train.steps=[300,200]"])
    with pytest.raises(ConfigError, match="missing key 'data'"):
        load_config({})


def test_bad_override_syntax_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config({"data": {"train": "a.json"}}, ["train.lr=0.1"])
    path = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(path) == cfg


def test_docs_config_reference_is_up_to_date() -> None:
    from detforge.config import config_reference

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text() == config_reference(), "run: detforge config-reference --out docs/config.md"
