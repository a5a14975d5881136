"""A checkpoint as an MLflow pyfunc model: loaded in-process, and served by ``mlflow models serve`` from a
registered version's alias (the documented flow), answering a real balloon image as the Predictor does.

The server is started once (~20-30 s on a busy 2-core machine): serving ``models:/NAME@alias`` downloads the
registered model directory and serves it, so it covers serving a directory too.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # type: ignore[import-untyped]
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import detforge
from detforge.data.images import load_image_rgb
from detforge.errors import CheckpointError
from detforge.inference.predictor import Predictor
from detforge.inference.pyfunc import (
    build_request,
    decode_request,
    encode_image,
    model_checkpoint_path,
    request_detections,
    save_pyfunc_model,
)
from helpers import free_port, stop_process_group

MLFLOW = Path(sys.executable).with_name("mlflow")  # the venv's; `mlflow models serve` also needs its bin on PATH
ALIAS = "best-bbox-AP50"


def _train_config(dataset: Path, out: Path) -> dict[str, Any]:
    """Two iterations of the smallest detector: weights that are not random, in a few seconds."""
    return {
        "data": {"train": str(dataset), "min_size": [64], "max_size": 64, "num_workers": 0},  # no val: no eval
        # score threshold 0 inside the model: an untrained model's scores are flat and low
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {"max_iter": 2, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 2},
        "tracking": {"backend": "none"},
        "output": {"dir": str(out)},
    }


@pytest.fixture(scope="module")
def model_dir(module_tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    checkpoint = detforge.train(_train_config(module_tiny_dataset, run)).final_checkpoint
    assert checkpoint is not None
    return save_pyfunc_model(checkpoint, run / "pyfunc", score_threshold=0.5)


@pytest.fixture
def balloon(shared_data: Path) -> Path:
    images = sorted((shared_data / "balloon" / "val").glob("*.jpg"))
    if not images:
        pytest.skip("no balloon validation images")
    return images[0]


def test_saving_is_fast_and_refuses_a_checkpoint_without_metadata(model_dir: Path, tmp_path: Path) -> None:
    checkpoint = model_checkpoint_path(model_dir)
    assert checkpoint == model_dir / "artifacts" / "model_final.pt"
    started = time.perf_counter()
    save_pyfunc_model(checkpoint, tmp_path / "again")
    assert time.perf_counter() - started < 2.0
    requirements = (tmp_path / "again" / "requirements.txt").read_text()
    assert "detforge==" in requirements and "torch==" in requirements

    import torch

    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no detforge metadata"):
        save_pyfunc_model(tmp_path / "plain.pt", tmp_path / "plain")


def test_loaded_pyfunc_model_gives_the_predictors_detections(model_dir: Path, balloon: Path) -> None:
    model = mlflow.pyfunc.load_model(str(model_dir))
    # the same image as base64 text and as raw bytes, at the saved default threshold and at 0
    rows = pd.DataFrame({"image": [encode_image(balloon), balloon.read_bytes()]})
    default, zero = model.predict(rows), model.predict(rows, params={"score_threshold": 0.0})

    predictor = Predictor.load(model_checkpoint_path(model_dir), score_threshold=0.0)
    expected = predictor.predict([load_image_rgb(balloon)])[0]
    assert zero == [expected.to_json()] * 2
    assert len(zero[0]) > 0
    assert default == [expected.select(expected.scores >= 0.5).to_json()] * 2


def test_bad_images_are_refused_with_the_row_and_the_reason(model_dir: Path) -> None:
    model = mlflow.pyfunc.load_model(str(model_dir))
    with pytest.raises(MlflowException, match="row 0: 'image' is not valid base64"):
        model.predict(pd.DataFrame({"image": ["not an image!"]}))
    with pytest.raises(MlflowException, match="row 0: 5 bytes that are not an image file"):
        model.predict(pd.DataFrame({"image": [encode_image(b"hello")]}))


def test_request_bodies_round_trip(balloon: Path) -> None:
    body = build_request([balloon, b"raw"], score_threshold=0.25)
    assert body["params"] == {"score_threshold": 0.25}
    assert decode_request(json.dumps(body)) == [balloon.read_bytes(), b"raw"]
    assert decode_request({"inputs": {"image": [encode_image(b"x")]}}) == [b"x"]
    assert decode_request({"dataframe_records": [{"image": encode_image(b"y")}]}) == [b"y"]


# ---------------------------------------------------------------------------------------------------------
# serving


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def _serving(model_uri: str, log: Path, env: dict[str, str]) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1 (its own process group, killed on exit)."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        str(MLFLOW), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
    ]  # fmt: skip
    # it execs `uvicorn` found on PATH: the venv's bin goes first
    env = {**os.environ, **env, "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _answers(url):
            tail = log.read_text(errors="replace")[-3000:]
            assert proc.poll() is None, f"mlflow models serve exited:\n{tail}"
            assert time.monotonic() < deadline, f"mlflow models serve not up after 90 s:\n{tail}"
            time.sleep(0.2)
        yield url
    finally:
        stop_process_group(proc)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _register(model_dir: Path, root: Path) -> tuple[str, str]:
    """Log ``model_dir`` to a run of a fresh SQLite store and register it with an alias, as the tracker does;
    return (tracking URI, model name)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(model_dir), "models/iter_0000002")
    client.create_registered_model("balloons")
    source = f"{run.info.artifact_uri}/models/iter_0000002"
    version = client.create_model_version("balloons", source, run_id=run.info.run_id)
    client.set_registered_model_alias("balloons", ALIAS, version.version)
    client.set_terminated(run.info.run_id)
    return uri, "balloons"


@pytest.mark.slow
@pytest.mark.skipif(not MLFLOW.is_file(), reason="the mlflow command is not installed beside this Python")
def test_a_registered_version_served_by_alias_answers_http_requests(
    model_dir: Path, balloon: Path, tmp_path: Path
) -> None:
    uri, name = _register(model_dir, tmp_path)
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(
        pd.DataFrame({"image": [encode_image(balloon)]}), params={"score_threshold": 0.0}
    )[0]
    env = {"MLFLOW_TRACKING_URI": uri}
    with _serving(f"models:/{name}@{ALIAS}", tmp_path / "serve.log", env) as url:
        found = request_detections(url, balloon, score_threshold=0.0)
        assert found and {"label", "class_index", "score", "box"} <= set(found[0])
        assert found == expected
        assert all(d["label"] in ("circle", "square") and len(d["box"]) == 4 for d in found)

        # the other request formats, and the saved default threshold (0.5) when no params are given
        status, inputs = _post(url, {"inputs": {"image": [encode_image(balloon)]}, "params": {"score_threshold": 0}})
        assert status == 200 and inputs["predictions"] == [expected]
        status, split = _post(url, build_request([balloon, balloon]))
        assert status == 200 and split["predictions"] == [[d for d in expected if d["score"] >= 0.5]] * 2

        status, error = _post(url, {"dataframe_split": {"columns": ["image"], "data": [["not an image!"]]}})
        assert status == 400 and "row 0: 'image' is not valid base64" in error["message"]
