"""The whole versioned flow from the CLI: dataset versions -> stage 1 -> fine-tune -> evaluation -> lineage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.tracking.lineage import build_lineage, to_mermaid
from detforge.tracking.registry import get_model_version
from detforge.tracking.store import Store

runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def write_config(path: Path, **sections: object) -> Path:
    config = {
        "data": {"min_size": [64], "max_size": 64, "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {"max_iter": 2, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 2},
        "eval": {"period": 2, "best_metric": "bbox/AR100"},
        "tracking": {"flush_seconds": 0.2, "num_eval_images": 1, "report_images": 2},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value)  # type: ignore[union-attr]
    path.write_text(yaml.safe_dump(config))
    return path


def test_two_stage_fine_tune_lineage_lists_every_ancestor(
    store: Store, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    run("data", "log", "shapes", tiny_dataset)  # v1
    run("data", "subset", "dataset:shapes", "--fraction", "0.75", "--out", tmp_path / "a.json", "--log", "shapes")
    run("data", "filter", "dataset:shapes:v2", "--categories", "square", "--out", tmp_path / "b.json",
        "--log", "shapes")  # fmt: skip
    stage1 = write_config(
        tmp_path / "stage1.yaml",
        data={"train": "dataset:shapes:v2", "val": "dataset:shapes:v2"},
        tracking={"model_name": "stage1"},
        output={"dir": str(tmp_path / "stage1")},
    )
    run("train", stage1)
    stage2 = write_config(
        tmp_path / "stage2.yaml",
        data={"train": "dataset:shapes@latest", "val": "dataset:shapes:v3"},
        model={"weights": "model:stage1@best-bbox/AR100"},
        tracking={"model_name": "stage2"},
        output={"dir": str(tmp_path / "stage2")},
    )
    run("train", stage2)
    text = run("eval", stage2, "model.weights=model:stage2@latest", f"output.dir={tmp_path / 'eval'}")
    assert "evaluation recorded" in text
    assert (tmp_path / "eval" / "eval" / "report.html").is_file()

    final = get_model_version("model:stage2", store=store)
    parent = get_model_version("model:stage1@best-bbox-AR100", store=store)
    assert final.parent == parent.ref and final.datasets == {"train": "dataset:shapes:v3", "val": "dataset:shapes:v3"}
    assert f"weights: {parent.ref}" in (tmp_path / "stage2" / "config.yaml").read_text()  # the alias, pinned once

    tree = run("lineage", "model:stage2", "--mermaid", tmp_path / "l.md", "--png", tmp_path / "l.png")
    for ref in ("dataset:shapes:v1", "dataset:shapes:v2", "dataset:shapes:v3", parent.ref, final.ref):
        assert ref in tree, tree
    assert "fine-tuned from" in tree and "filter" in tree and "subset" in tree and "detforge eval" in tree
    assert len(re.findall(r"\brun\b", tree)) >= 2  # both training runs
    mermaid = (tmp_path / "l.md").read_text()
    assert mermaid.startswith("flowchart LR") and mermaid.count("-->") >= 7
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    graph = build_lineage(final.ref, store=store)
    kinds = sorted(node.kind for node in graph.nodes.values())
    assert kinds.count("dataset") == 3 and kinds.count("run") == 2 and kinds.count("model") == 2
    assert kinds.count("evaluation") >= 2  # in-training evaluation and the `detforge eval` run
    assert to_mermaid(graph).count("[(") == 3  # datasets drawn as cylinders

    versions = run("models", "versions", "stage2")
    assert "latest" in versions and parent.ref in versions
    assert "stage1" in run("models", "list") and "stage2" in run("models", "list")
    assert "champion" in run("models", "alias", "stage1", f"v{parent.version}", "champion")
    assert "no alias 'nope'" in run("lineage", "model:stage1@nope", code=2)
