"""The MLflow tracker end to end on the embedded store: run records, images, reports, model versions, refs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import detforge
from detforge.models.weights import load_state_dict_file
from detforge.tracking.registry import get_model_version, list_model_versions, resolve_model
from detforge.tracking.store import Store, TrackingError


def tracked_config(tiny_dataset: Path, out: Path, **tracking: Any) -> dict[str, Any]:
    return {
        "data": {"train": str(tiny_dataset), "val": str(tiny_dataset), "min_size": [64], "max_size": 64,
                 "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {"max_iter": 4, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 2, "log_period": 1},
        "eval": {"period": 2, "best_metric": "bbox/AR100", "best_metrics": ["bbox/AP50"]},
        "tracking": {"model_name": "tiny", "flush_seconds": 0.2, "num_eval_images": 2, **tracking},
        "output": {"dir": str(out)},
    }  # fmt: skip


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, module_tiny_dataset: Path) -> tuple[Store, Path, str]:
    """One tracked training (4 iterations, evaluations at 2 and 4) in a store of its own."""
    root = tmp_path_factory.mktemp("tracked")
    dataset = module_tiny_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETFORGE_WORKDIR", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        from detforge.tracking.store import open_store

        detforge.train(tracked_config(dataset, root / "run"))
        store = open_store()
    run_id = json.loads((root / "run" / "tracking" / "run.json").read_text())["run_id"]
    return store, root / "run", run_id


def test_the_run_records_config_environment_datasets_and_finishes(tracked_run: tuple[Store, Path, str]) -> None:
    store, _, run_id = tracked_run
    run = store.client().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_iter"] == "4" and run.data.params["model.arch"].startswith("fasterrcnn")
    tags = run.data.tags
    assert tags["detforge.kind"] == "training" and tags["detforge.version.torch"]
    assert tags["detforge.train_precision"] == "fp32"  # train.amp=off, no channels_last: the resolved precision
    assert tags["detforge.dataset.train"] == tags["detforge.dataset.val"] == "dataset:instances:v1"
    assert "config.yaml" in [a.path for a in store.client().list_artifacts(run_id)]


def test_every_step_and_evaluation_is_a_metric_point(tracked_run: tuple[Store, Path, str]) -> None:
    store, _, run_id = tracked_run
    client = store.client()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "eval/bbox/AP")] == [2, 4]
    assert client.get_metric_history(run_id, "per_class/bbox/circle")


def test_prediction_images_and_evaluation_reports_are_artifacts(tracked_run: tuple[Store, Path, str]) -> None:
    store, out, run_id = tracked_run
    client = store.client()
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    points = {(name.split("+")[0], name.split("+")[2]) for name in (Path(p).name for p in images if p.endswith(".png"))}
    # one key per validation image, a point per evaluation: the UI's step slider
    assert points == {(key, step) for key in ("val-00-img_01", "val-01-img_02") for step in ("2", "4")}, images
    report = [a.path for a in client.list_artifacts(run_id, "evaluations/iter_0000004")]
    for name in ("report.html", "metrics.json", "pr_curves.png", "confusion_matrix.png", "per_class_ap.csv"):
        assert f"evaluations/iter_0000004/{name}" in report
    assert not list((out / "tracking" / "images").glob("*.jpg"))  # sent, then removed from the run folder
    assert (out / "tracking" / "spool.done").read_text() == str(
        len((out / "tracking" / "spool.jsonl").read_text().splitlines())
    )


def test_checkpoints_become_model_versions_with_metrics_datasets_and_aliases(
    tracked_run: tuple[Store, Path, str],
) -> None:
    store, _, run_id = tracked_run
    versions = list_model_versions("tiny", store=store)
    assert [v.iteration for v in versions][-1] == 4  # the final checkpoint is registered too
    assert all(v.run_id == run_id and v.datasets == {"train": "dataset:instances:v1", "val": "dataset:instances:v1"}
               for v in versions)  # fmt: skip
    best = get_model_version("model:tiny@best-bbox/AR100", store=store)  # the metric's own spelling works
    assert best == get_model_version("model:tiny@best-bbox-AR100", store=store)
    assert "best-bbox-AP50" in {a for v in versions for a in v.aliases}
    assert "bbox/AR100" in best.metrics and best.parent is None
    assert get_model_version("model:tiny@latest", store=store).version == versions[-1].version
    assert get_model_version("model:tiny", store=store).version == versions[-1].version


def test_a_model_ref_downloads_once_and_a_tampered_copy_is_fetched_again(tracked_run: tuple[Store, Path, str]) -> None:
    store, _, _ = tracked_run
    path = resolve_model("model:tiny@best-bbox-AR100", store=store)
    state = load_state_dict_file(path)
    assert any(k.startswith("roi_heads.box_predictor") for k in state)
    good = path.read_bytes()
    path.write_bytes(good[:-10] + b"x" * 10)
    assert resolve_model("model:tiny@best-bbox-AR100", store=store).read_bytes() == good


def test_bad_model_refs_say_what_exists(tracked_run: tuple[Store, Path, str]) -> None:
    store, _, _ = tracked_run
    with pytest.raises(TrackingError, match=r"no alias 'best-segm-AP' \(aliases: .*best-bbox-AR100"):
        get_model_version("model:tiny@best-segm/AP", store=store)
    with pytest.raises(TrackingError, match=r"no registered model 'tyni' .*models: tiny"):
        get_model_version("model:tyni", store=store)
    with pytest.raises(TrackingError, match=r"has versions v1\.\.v\d+, not v99"):
        get_model_version("model:tiny:v99", store=store)
    with pytest.raises(TrackingError, match="Expected model:NAME"):
        get_model_version("model:", store=store)


def test_tracking_none_touches_no_store(tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DETFORGE_WORKDIR", str(tmp_path))
    cfg = tracked_config(tiny_dataset, tmp_path / "run", backend="none")
    cfg["train"]["max_iter"], cfg["eval"]["period"] = 2, 0
    detforge.train(cfg)
    assert not (tmp_path / ".detforge").exists() and not (tmp_path / "run" / "tracking").exists()


def test_registered_versions_are_servable_pyfunc_models(
    tracked_run: tuple[Store, Path, str], module_tiny_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc
    import pandas as pd

    from detforge.inference.pyfunc import encode_image

    store, _, _ = tracked_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    model = mlflow.pyfunc.load_model("models:/tiny@best-bbox-AR100")  # what `mlflow models serve -m` loads
    image = encode_image(module_tiny_dataset.parent / "images" / "img_01.png")
    answer = model.predict(pd.DataFrame({"image": [image]}), params={"score_threshold": 0.0})
    assert len(answer) == 1 and answer[0] and all({"label", "score", "box"} <= set(d) for d in answer[0])


def test_a_resumed_run_does_not_send_the_points_it_already_sent_again(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFORGE_WORKDIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from detforge.tracking.store import open_store

    config = tracked_config(tiny_dataset, tmp_path / "run")
    detforge.train(config)
    # As if the process had died after sending every point up to iteration 4 but before its last checkpoint
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000002.pt")
    detforge.train(config, resume=True)  # iterations 3 and 4 (and the evaluation at 4) are made again

    run_id = json.loads((tmp_path / "run" / "tracking" / "run.json").read_text())["run_id"]
    client = open_store().client()
    keys = client.get_run(run_id).data.metrics
    assert "train/loss" in keys and "eval/bbox/AP50" in keys
    for key in keys:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: points sent twice, at steps {sorted(steps)}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3, 4]
