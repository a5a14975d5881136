"""Tracker pieces without a store: best-metric aliases, config flattening, the UI command line."""

from __future__ import annotations

import pytest

from detforge.cli.tracking import ui_command
from detforge.config import load_config
from detforge.errors import ConfigError
from detforge.tracking.registry import parse_model_ref
from detforge.tracking.tracker import BestAliases, alias_for_metric, flatten_config, run_environment


def test_alias_spelling_follows_mlflows_rule() -> None:
    assert alias_for_metric("segm/AP") == "best-segm-AP"
    assert alias_for_metric("bbox/AP50:min") == "best-bbox-AP50"
    assert alias_for_metric("keypoints/AP (medium)") == "best-keypoints-AP--medium-"


def test_best_aliases_move_per_metric_and_direction() -> None:
    cfg = load_config({"data": {"train": "x.json"}, "eval": {"best_metric": "bbox/AP", "best_metrics": ["loss:min"]}})
    best = BestAliases(cfg)
    assert best.improved({"bbox/AP": 0.1, "loss": 2.0}) == ["bbox/AP", "loss"]
    assert best.improved({"bbox/AP": 0.2, "loss": 3.0}) == ["bbox/AP"]
    assert best.improved({"bbox/AP": 0.2, "loss": 1.0}) == ["loss"]  # ties do not move an alias
    assert best.improved({"bbox/AP": -1.0, "loss": float("nan")}) == []  # COCO's "nothing to average"
    restored = BestAliases(cfg)
    restored.load_state_dict(best.state_dict())
    assert restored.improved({"bbox/AP": 0.2, "loss": 1.0}) == []


def test_an_unknown_best_metric_names_the_real_ones() -> None:
    cfg = load_config({"data": {"train": "x.json"}, "eval": {"best_metrics": ["bbox/AP5O"]}})
    with pytest.raises(ConfigError, match=r"bbox/AP5O not among .*bbox/AP50"):
        BestAliases(cfg).improved({"bbox/AP": 0.1, "bbox/AP50": 0.2})


def test_flattened_config_and_environment() -> None:
    flat = flatten_config(load_config({"data": {"train": "x.json"}}, ["train.lr=0.01"]))
    assert flat["train.lr"] == "0.01" and flat["data.train"] == "x.json" and flat["tracking.backend"] == "mlflow"
    env = run_environment()
    assert env["detforge.version.torch"] and env["detforge.machine.cpus"] != "0"


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [
        ("model:shapes", ("shapes", None, None)),
        ("model:shapes:v3", ("shapes", 3, None)),
        ("model:shapes:3", ("shapes", 3, None)),
        ("model:shapes@best-segm/AP", ("shapes", None, "best-segm/AP")),
    ],
)
def test_model_refs(ref: str, parsed: tuple[str, int | None, str | None]) -> None:
    assert parse_model_ref(ref) == parsed


def test_the_ui_binds_to_localhost_with_one_worker() -> None:
    command = ui_command("sqlite:////tmp/x.db", host="127.0.0.1", port=5001)
    assert command[1:] == ["server", "--backend-store-uri", "sqlite:////tmp/x.db", "--host", "127.0.0.1",
                           "--port", "5001", "--workers", "1"]  # fmt: skip
