"""The W&B tracker, run offline: what a training run leaves in its ``.wandb`` file and W&B folder."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image as PILImage
from pycocotools import mask as mask_util

import detforge
from detforge.config import Config
from detforge.data.formats.coco import load_coco
from detforge.evaluation.coco import EvalResult
from detforge.tracking.datasets import log_dataset
from detforge.tracking.store import TrackingError
from detforge.tracking.tracker import RunContext
from detforge.tracking.wandb_tracker import WandbTracker

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # the records of a .wandb file

_BLOCK, _HEADER = 32768, 7  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, silent W&B whose every folder is in ``tmp_path`` (no network, nothing in the home folder)."""
    home = tmp_path / "wandb-home"
    for name, sub in [("WANDB_DIR", "dir"), ("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache")]:
        monkeypatch.setenv(name, str(home / sub))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # should anything try the network: nobody there
    monkeypatch.setenv("NETRC", str(home / "netrc"))  # no such file: no stored key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    return home


def _records(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pending += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _read_run(run_dir: Path, *, timeout: float = 10.0) -> dict[str, Any]:
    """History (step -> key -> value), config, artifacts and exit code of a finished offline run folder.

    ``run.finish()`` can return before wandb-core has written the run's last records, so this waits for the
    exit record.
    """
    deadline = time.monotonic() + timeout
    while (run := _parse_run(run_dir))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return run


def _parse_run(run_dir: Path) -> dict[str, Any]:
    history: dict[int, dict[str, Any]] = defaultdict(dict)
    config: dict[str, Any] = {}
    artifacts, exit_code = [], None
    files = list(run_dir.glob("run-*.wandb"))  # wandb-core may not have created it yet
    for record in _records(files[0]) if files else ():
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:  # a media value is spread over nested keys: (key, field)
                *parents, last = list(item.nested_key) or [item.key]
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[last] = json.loads(item.value_json)
            history[int(row["_step"])].update(row)
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"history": dict(history), "config": config, "artifacts": artifacts, "exit_code": exit_code}


def _train_config(data: str, out: Path) -> dict[str, Any]:
    return {
        "data": {"train": data, "val": data, "min_size": [64], "max_size": 64, "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {"max_iter": 4, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 2, "log_period": 2},
        "eval": {"period": 2, "best_metric": "bbox/AR100", "best_metrics": ["bbox/AP"]},
        "tracking": {"backend": "wandb", "experiment": "tiny-exp", "num_eval_images": 2, "score_threshold": 0.0},
        "output": {"dir": str(out)},
    }


def test_training_run_records_metrics_images_tables_and_artifacts_offline(
    tiny_dataset: Path, tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = log_dataset("tiny-shapes", tiny_dataset, reference=True).ref  # the store is the test's own
    cfg = _train_config(ref, tmp_path / "run")
    for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(name)  # the tracker then keeps W&B's staging and cache in output.dir/wandb
    detforge.train(cfg)

    out = tmp_path / "run"
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    run = _read_run(run_dir)
    assert json.loads((out / "tracking" / "wandb_run.json").read_text())["id"] in run_dir.name
    assert run["exit_code"] == 0

    history = run["history"]
    assert [s for s in sorted(history) if "train/loss" in history[s]] == [2, 4]  # train.log_period=2
    assert {"train/lr", "time/step"} <= set(history[2])
    for step in (2, 4):
        row = history[step]
        assert 0.0 <= row["eval/bbox/AP"] <= 1.0 and "eval/bbox/AR100" in row
        assert row["eval/per_class_ap"]["_type"] == "table-file"
        images = row["eval/predictions"]
        assert images["count"] == 2 and all((run_dir / "files" / f).is_file() for f in images["filenames"])
        assert {"predictions", "ground_truth"} == set(images["all_boxes"][0])
    table = json.loads((run_dir / "files" / history[4]["eval/per_class_ap"]["path"]).read_text())
    assert table["columns"] == ["class", "bbox AP"] and [r[0] for r in table["data"]] == ["circle", "square"]

    config = run["config"]
    assert config["model"]["arch"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert config["datasets"] == {"train": "dataset:tiny-shapes:v1", "val": "dataset:tiny-shapes:v1"}
    assert "detforge.machine.python" in config["environment"]
    assert config["train_precision"] == "fp32"

    (dataset,) = [a for a in run["artifacts"] if a.type == "dataset"]
    assert dataset.name == "tiny-shapes" and "detforge-v1" in dataset.aliases
    assert dataset.user_created and dataset.use_after_commit  # an input of the run once synced
    assert json.loads(dataset.metadata)["ref"] == "dataset:tiny-shapes:v1"

    models = [a for a in run["artifacts"] if a.type == "model"]
    assert all(a.name == "tiny-exp" and "latest" in a.aliases for a in models)
    assert "best-bbox-AR100" in models[0].aliases and "best-bbox-AP" in models[0].aliases
    assert "final" in models[-1].aliases and json.loads(models[-1].metadata)["iteration"] == 4
    assert json.loads(models[0].metadata)["datasets"]["train"] == "dataset:tiny-shapes:v1"
    staged = [Path(entry.local_path) for a in models for entry in a.manifest.contents]
    assert all(p.is_file() and p.is_relative_to(out / "wandb" / "data") for p in staged)  # kept for `wandb sync`
    assert not list((out / "tracking").glob("wandb_model_*.pt"))  # the tracker's own copy is gone
    assert "WANDB_DATA_DIR" not in os.environ  # the tracker's redirection ends with the run


def _context(tmp_path: Path) -> RunContext:
    config = Config.model_validate(
        {"data": {"train": "unused.json"}, "tracking": {"backend": "wandb", "experiment": "unit"}}
    )
    return RunContext(config, tmp_path / "out", class_names=["a"])


def _trainer(iteration: int = 0, failure: BaseException | None = None) -> Any:
    return SimpleNamespace(iteration=iteration, failure=failure, stop_reason=None, max_iter=10)


def test_eval_images_carry_predicted_and_true_masks(tiny_dataset: Path, tmp_path: Path, wandb_env: Path) -> None:
    val = load_coco(tiny_dataset)
    square = np.zeros((64, 64), dtype=np.uint8)
    square[8:28, 8:28] = 1  # the square of img_01, class 'square' (category 2, label 2)
    rle = mask_util.encode(np.asfortranarray(square))
    rle["counts"] = rle["counts"].decode("ascii")
    results = [{"image_id": 1, "category_id": 2, "bbox": [8, 8, 20, 20], "score": 0.9, "segmentation": rle}]
    evaluation = EvalResult({"segm/AP": 0.5}, per_class={"segm": {"circle": -1.0, "square": 0.5}}, results=results)
    config = Config.model_validate(
        {
            "data": {"train": str(tiny_dataset)},
            "eval": {"best_metric": "segm/AP"},
            "tracking": {"backend": "wandb", "num_eval_images": 1, "register_models": False},
        }
    )
    tracker = WandbTracker(RunContext(config, tmp_path / "out", val=val, class_names=val.class_names))
    trainer: Any = SimpleNamespace(**vars(_trainer(iteration=2)), last_evaluation=evaluation)
    tracker.on_fit_start(trainer)
    tracker.on_eval_end(trainer, evaluation.metrics)
    tracker.on_fit_end(trainer)

    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    row = _read_run(run_dir)["history"][2]
    assert row["eval/segm/AP"] == 0.5 and row["per_class/segm/square"] == 0.5
    assert "per_class/segm/circle" not in row  # no ground truth: no AP to plot
    masks = row["eval/predictions"]["all_masks"][0]
    predicted = np.asarray(PILImage.open(run_dir / "files" / masks["predictions"]["path"]))
    truth = np.asarray(PILImage.open(run_dir / "files" / masks["ground_truth"]["path"]))
    assert set(np.unique(predicted)) == {0, 2} and (predicted == 2).sum() == 400
    assert set(np.unique(truth)) == {0, 1, 2}  # img_01 has a square and a circle


def test_without_api_key_or_mode_it_goes_offline_at_once_and_says_so(
    tmp_path: Path, wandb_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    tracker = WandbTracker(_context(tmp_path))
    started = time.perf_counter()
    tracker.on_fit_start(_trainer())
    elapsed = time.perf_counter() - started
    assert tracker.offline and elapsed < 10.0
    tracker.on_fit_end(_trainer(failure=RuntimeError("boom")))

    err = capsys.readouterr().err
    assert "no W&B API key" in err and "recorded offline" in err
    assert f"wandb sync {(tmp_path / 'out' / 'wandb').resolve()}" in err.replace("\n", "")
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    assert _read_run(run_dir)["exit_code"] == 1  # the training failed


def test_resumed_training_continues_the_same_run(tmp_path: Path, wandb_env: Path) -> None:
    first = WandbTracker(_context(tmp_path))
    first.on_fit_start(_trainer())
    run_id = first.run.id
    first.on_fit_end(_trainer(failure=KeyboardInterrupt()))

    resumed = WandbTracker(_context(tmp_path))
    resumed.on_fit_start(_trainer(iteration=4))
    assert resumed.run.id == run_id
    resumed.on_fit_end(_trainer())
    assert len(list((tmp_path / "out" / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2  # synced as one run

    fresh = WandbTracker(_context(tmp_path))
    fresh.on_fit_start(_trainer())  # iteration 0: a new training, a new run
    assert fresh.run.id != run_id
    fresh.on_fit_end(_trainer())


def test_missing_wandb_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(TrackingError, match=r"pip install 'detforge\[wandb\]'"):
        WandbTracker(_context(tmp_path))
