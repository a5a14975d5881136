"""`detforge demo --quick`: the whole lifecycle at toy sizes, checked through the store it leaves behind."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.tracking.datasets import get_dataset_version
from detforge.tracking.lineage import build_lineage
from detforge.tracking.registry import list_model_versions
from detforge.tracking.store import open_store


def test_quick_demo_leaves_versions_models_report_predictions_and_lineage(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(work), "--quick"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "detforge ui" in result.output and "Lineage of the final model" in result.output

    store = open_store(root=work / ".detforge")
    balanced = get_dataset_version("dataset:shapes:v3", store=store)
    assert balanced.operation and balanced.operation["name"] == "balance"
    assert balanced.parents == ("dataset:shapes:v2",)
    assert get_dataset_version("dataset:shapes-train:v2", store=store).parents == ("dataset:shapes-train:v1",)

    stage1 = list_model_versions("shapes-stage1", store=store)
    stage2 = list_model_versions("shapes-stage2", store=store)
    aliases = {a for v in stage1 for a in v.aliases}
    assert {"best-bbox-AP50", "best-segm-AP"} <= aliases
    assert stage2 and all(v.parent and v.parent.startswith("model:shapes-stage1:v") for v in stage2)
    assert (work / "evaluation" / "eval" / "report.html").is_file()
    assert (work / "predictions" / "shapes.mp4").is_file() and (work / "predictions" / "results.json").is_file()

    graph = build_lineage("model:shapes-stage2@latest", store=store)
    refs = set(graph.nodes)
    for ref in ("dataset:shapes:v1", "dataset:shapes:v2", "dataset:shapes:v3", "dataset:shapes-train:v1",
                "dataset:shapes-train:v2", "dataset:shapes-val:v1", stage2[-1].ref):  # fmt: skip
        assert ref in refs, sorted(refs)
    assert any(node.kind == "evaluation" for node in graph.nodes.values())
