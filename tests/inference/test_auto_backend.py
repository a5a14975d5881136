"""`predict --backend auto`: ONNX Runtime from a cached export when the job is big enough, else PyTorch."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou
from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.errors import CheckpointError, ConfigError
from detforge.inference import auto, export
from detforge.inference.auto import choose_backend
from detforge.inference.run import predict

VideoFactory = Callable[[Path, int], Path]
runner = CliRunner()


MIN_ITEMS_TO_EXPORT = 20  # auto's is 200: fewer frames keep the tests fast, the rule is the same
INT8_ARCHS = auto.ONNX_INT8


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DETFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "MIN_ITEMS_TO_EXPORT", MIN_ITEMS_TO_EXPORT)
    return tmp_path / "cache"


def frames_of(jsonl: Path) -> list[list[dict[str, Any]]]:
    return [json.loads(line)["detections"] for line in jsonl.read_text().splitlines()]


def assert_same_frames(a: list[list[dict[str, Any]]], b: list[list[dict[str, Any]]]) -> None:
    """Most detections of ``a`` have one in ``b`` with IoU > 0.9, the same label and a score within 1e-3.

    test_export checks ONNX Runtime against PyTorch closely on real images. Here a 4-iteration model scores
    every box about 0.30 (near ties to 1e-4), and the 20-detection cap cuts through those ties: which of two
    near-duplicates NMS keeps, and which box is the 20th, flips with a 1e-5 difference (measured: 85 % matched;
    an unrelated model matches almost nothing).
    """
    assert len(a) == len(b)
    matched = total = 0
    for first, second in zip(a, b, strict=True):
        total += len(first)
        if not first or not second:
            continue
        iou = box_iou(torch.tensor([d["box"] for d in first]), torch.tensor([d["box"] for d in second])).numpy()
        for i, found in enumerate(first):
            j = int(np.argmax(iou[i]))
            same = second[j]["label"] == found["label"] and abs(second[j]["score"] - found["score"]) <= 1e-3
            matched += bool(iou[i, j] > 0.9 and same)
    assert total > 0 and matched >= 0.8 * total, f"{matched} of {total} detections matched"


def test_a_big_job_runs_on_onnx_runtime_from_one_cached_export_with_pytorchs_detections(
    checkpoint: Path, tmp_path: Path, synthetic_video: VideoFactory, _own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = synthetic_video(tmp_path / "clip.mp4", MIN_ITEMS_TO_EXPORT)
    hashed: list[Path] = []
    real_sha256 = auto.sha256_file
    monkeypatch.setattr(auto, "sha256_file", lambda path: hashed.append(Path(path)) or real_sha256(path))
    auto_run = predict(checkpoint, [video], tmp_path / "auto", score_threshold=0.05)
    assert hashed == [checkpoint]  # the cache name is worked out once, however many steps need it
    assert "ONNX Runtime" in auto_run.model and f"{MIN_ITEMS_TO_EXPORT} images and frames" in auto_run.model
    assert auto_run.frames == MIN_ITEMS_TO_EXPORT and not auto_run.skipped
    exports = list((_own_cache / "onnx").glob("*.onnx"))
    assert len(exports) == 1 and "-s0.05-" in exports[0].name and "-int8-" in exports[0].name  # auto.ONNX_INT8
    assert "(fasterrcnn_mobilenet_v3_large_320_fpn, int8) on ONNX Runtime" in auto_run.model

    # Auto's int8 path is the int8 export a user makes with `detforge export --quantize int8` (test_export checks
    # that export against the float one, and the float one against PyTorch, on a trained model: int8 moves scores
    # by ~0.02, more than this 4-iteration model's near-ties can take).
    explicit = export.export_model(checkpoint, tmp_path / "int8.onnx", score_threshold=0.05, quantize="int8")
    by_hand = predict(explicit, [video], tmp_path / "by_hand", score_threshold=0.05, backend="onnxruntime")
    assert "ONNX" in by_hand.model
    assert frames_of(tmp_path / "auto" / "clip.jsonl") == frames_of(tmp_path / "by_hand" / "clip.jsonl")

    # A small job now reuses the cached export (from the CLI), and nothing new is exported.
    image = tmp_path / "frame.png"
    Image.new("RGB", (81, 63), (30, 30, 30)).save(image)
    result = runner.invoke(
        app, ["predict", str(checkpoint), str(image), "--out", str(tmp_path / "cli"), "--score-threshold", "0.05"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"model: {checkpoint} (" in output and "ONNX Runtime" in output and "cached int8 ONNX export" in output
    assert list((_own_cache / "onnx").glob("*.onnx")) == exports

    # Without int8, auto's float export gives PyTorch's detections.
    monkeypatch.setattr(auto, "ONNX_INT8", frozenset())
    float_run = predict(checkpoint, [video], tmp_path / "float", score_threshold=0.05)
    assert "(fasterrcnn_mobilenet_v3_large_320_fpn) on ONNX Runtime" in float_run.model
    eager = predict(
        checkpoint, [video], tmp_path / "eager", score_threshold=0.05, backend="torch", precision="fp32", batch_size=1
    )
    assert "ONNX" not in eager.model
    assert_same_frames(frames_of(tmp_path / "float" / "clip.jsonl"), frames_of(tmp_path / "eager" / "clip.jsonl"))
    both = sorted((_own_cache / "onnx").glob("*.onnx"))
    assert len(both) == 2 and sum("-int8-" in path.name for path in both) == 1

    # A float export (as --backend onnxruntime makes) serves auto when no int8 one is cached.
    monkeypatch.setattr(auto, "ONNX_INT8", INT8_ARCHS)
    next(path for path in both if "-int8-" in path.name).unlink()
    choice = choose_backend(str(checkpoint), device="cpu", score_threshold=0.05, images=1, videos=[])
    assert choice.backend == "onnxruntime" and "a cached float ONNX export" in choice.reason
    assert choice.export == next(path for path in both if "-fp32-" in path.name) and choice.quantize is None


def test_small_jobs_missing_onnx_and_failed_exports_run_in_pytorch(
    checkpoint: Path, tmp_path: Path, synthetic_video: VideoFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = synthetic_video(tmp_path / "small.mp4", 3)
    run = predict(checkpoint, [small], tmp_path / "small")
    assert "ONNX" not in run.model.split(";")[0] and "3 images and frames, fewer than 20" in run.model

    big = synthetic_video(tmp_path / "big.mp4", MIN_ITEMS_TO_EXPORT)

    def failing_export(*args: object, **kwargs: object) -> Path:
        raise CheckpointError("model.pt: onnx export of fasterrcnn failed (RuntimeError: boom).")

    monkeypatch.setattr(export, "export_model", failing_export)
    run = predict(checkpoint, [big], tmp_path / "fallback")
    assert run.frames == MIN_ITEMS_TO_EXPORT and "ONNX export failed, so PyTorch runs it" in run.model
    assert "boom" in run.model
    with pytest.raises(CheckpointError, match="boom"):  # asked for by name: the failure is the user's to see
        predict(checkpoint, [big], tmp_path / "forced", backend="onnxruntime")

    explicit = predict(checkpoint, [big], tmp_path / "fp32", precision="fp32")  # asked for PyTorch's fp32
    assert "(fp32" in explicit.model and "--precision fp32 asked for PyTorch's fp32" in explicit.model
    low = choose_backend(str(checkpoint), device="cpu", score_threshold=0.01, images=500, videos=[])
    assert low.backend == "torch" and "below 0.05" in low.reason

    monkeypatch.setattr(auto, "_arch", lambda model: "maskrcnn_resnet50_fpn")  # int8 measured fastest, same AP
    choice = choose_backend(str(checkpoint), device="cpu", score_threshold=0.5, images=500, videos=[])
    assert (choice.backend, choice.quantize) == ("onnxruntime", "int8") and "exporting to int8 ONNX" in choice.reason
    monkeypatch.setattr(auto, "_arch", lambda model: "maskrcnn_mobilenet_v3_large_fpn")  # not measured faster
    choice = choose_backend(str(checkpoint), device="cpu", score_threshold=0.5, images=500, videos=[])
    assert choice.backend == "torch" and "not measured faster than PyTorch for maskrcnn_mobilenet" in choice.reason

    monkeypatch.setattr(auto, "_onnx_installed", lambda: False)
    choice = choose_backend(str(checkpoint), device="cpu", score_threshold=0.5, images=500, videos=[])
    assert choice.backend == "torch" and "not installed" in choice.reason


def test_the_choice_follows_device_file_type_and_checkpoint_content(checkpoint: Path, tmp_path: Path) -> None:
    assert choose_backend("model.onnx", device="cpu", score_threshold=0.5, images=1, videos=[]).backend == "onnxruntime"
    onnx_on_gpu = choose_backend("model.onnx", device="cuda", score_threshold=0.5, images=1, videos=[])
    assert onnx_on_gpu.backend == "onnxruntime" and "ONNX Runtime runs here without cuda" in onnx_on_gpu.reason
    on_gpu = choose_backend(str(checkpoint), device="cuda:0", score_threshold=0.5, images=10_000, videos=[])
    assert on_gpu.backend == "torch" and "CPU only" in on_gpu.reason
    # The cache is keyed by content and threshold: a changed checkpoint or threshold never reuses an export.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    changed = tmp_path / "changed.pt"
    changed.write_bytes(checkpoint.read_bytes() + b"\0")

    def name(model: Path, threshold: float, quantize: str | None = None) -> Path:
        return auto._cached_export_paths(str(model), threshold, [quantize])[0]

    assert name(copy, 0.5) == name(checkpoint, 0.5)
    assert name(changed, 0.5) != name(checkpoint, 0.5)
    assert name(checkpoint, 0.3) != name(checkpoint, 0.5)
    import onnxruntime  # an int8 export is ONNX Runtime's quantizer's work: its version is in the name

    int8 = name(checkpoint, 0.5, "int8").name
    assert "-int8-" in int8 and f"-ort{onnxruntime.__version__}" in int8 and "-ort" not in name(checkpoint, 0.5).name
    image = tmp_path / "frame.png"
    Image.new("RGB", (81, 63), (30, 30, 30)).save(image)
    with pytest.raises(ConfigError, match="backend: expected auto, torch or onnxruntime, found 'tensorrt'"):
        predict(checkpoint, [image], tmp_path / "out", backend="tensorrt")


def test_the_export_cache_keeps_the_most_recently_used_exports(
    tmp_path: Path, _own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _own_cache / "onnx"
    folder.mkdir(parents=True)
    old = [folder / f"old{k}.onnx" for k in range(auto.MAX_CACHED_EXPORTS)]
    for age, file in enumerate(old, start=1):  # old0 was used last, old7 first
        file.write_bytes(b"onnx")
        os.utime(file, ns=(10**18 - age * 10**9,) * 2)
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    exported: list[Path] = []
    monkeypatch.setattr(export, "export_model", lambda model, out, **_: exported.append(out) or out.write_bytes(b"x"))

    new = auto.cached_onnx_export(str(checkpoint), 0.5)
    assert exported == [new] and new.is_file()
    assert sorted(folder.glob("*.onnx")) == sorted([new, *old[:-1]])  # the least recently used one went

    os.utime(new, ns=(1, 1))  # the oldest now, unless using it counts as recent use
    assert auto.cached_onnx_export(str(checkpoint), 0.5) == new and len(exported) == 1  # reused, not exported
    auto.cached_onnx_export(str(checkpoint), 0.25)  # another threshold: a new export, and one more pruned
    assert new.exists() and not old[-2].exists() and len(list(folder.glob("*.onnx"))) == auto.MAX_CACHED_EXPORTS


def test_a_read_only_export_cache_is_still_used(
    tmp_path: Path, _own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    monkeypatch.setattr(export, "export_model", lambda model, out, **_: out.write_bytes(b"x"))
    first = auto.cached_onnx_export(str(checkpoint), 0.5)

    def refuse(*_: Any, **__: Any) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr(os, "utime", refuse)
    assert auto.cached_onnx_export(str(checkpoint), 0.5) == first
