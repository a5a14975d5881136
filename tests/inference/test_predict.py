"""`detforge predict` on images, folders, globs and videos; bad input is named, counted and skipped."""

from __future__ import annotations

import json
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import orjson
import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.data.formats.coco import load_coco
from detforge.errors import ConfigError
from detforge.inference.predictor import Predictor
from detforge.inference.run import expand_inputs, predict
from detforge.inference.video import VideoError, VideoWriter, probe_video, read_frames, read_timed_frames
from detforge.tracking.store import TrackingError

VideoFactory = Callable[[Path, int], Path]
runner = CliRunner()


def test_inputs_expand_folders_globs_and_files(
    module_tiny_dataset: Path, tmp_path: Path, synthetic_video: VideoFactory
) -> None:
    images = module_tiny_dataset.parent / "images"
    video = synthetic_video(tmp_path / "clip.mp4", 3)
    found = expand_inputs([images, str(images / "img_0[12].png"), video])
    assert [p.name for p in found.images] == ["img_01.png", "img_02.png", "img_03.png", "img_04.png"]
    assert found.videos == [video]
    with pytest.raises(ConfigError, match="nope.png: no such file"):
        expand_inputs([tmp_path / "nope.png"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="notes.txt: neither an image nor a video"):
        expand_inputs([tmp_path / "notes.txt"])
    with pytest.raises(ConfigError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.jpeg")])


def test_images_give_annotated_files_and_coco_results_and_a_bad_image_is_skipped(
    checkpoint: Path, module_tiny_dataset: Path, tmp_path: Path
) -> None:
    images = module_tiny_dataset.parent / "images"
    broken = tmp_path / "in" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"not a jpeg")
    summary = predict(checkpoint, [images, broken], tmp_path / "out", score_threshold=0.0, precision="fp32")
    assert summary.images == 4 and len(summary.skipped) == 1 and "broken.jpg" in summary.skipped[0]
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == 4
    index = load_coco(tmp_path / "out" / "images.json", check_images=True)  # the listed images exist
    results = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert len(results) == summary.detections > 0
    assert {r["image_id"] for r in results} <= {im.id for im in index.images}
    assert {r["category_id"] for r in results} <= {1, 2} and index.class_names == ["circle", "square"]
    # the same detections as the predictor gives directly
    predictor = Predictor.load(checkpoint, score_threshold=0.0, precision="fp32")
    first = predictor.predict([PILImage.open(images / "img_01.png").convert("RGB")])
    on_first = [r for r in results if r["image_id"] == 1]
    assert len(on_first) == len(first[0])
    np.testing.assert_allclose(sorted(r["score"] for r in on_first), sorted(first[0].scores), atol=1e-4)


def test_a_video_gives_an_mp4_with_every_frame_and_json_lines(
    checkpoint: Path, tmp_path: Path, synthetic_video: VideoFactory
) -> None:
    video = synthetic_video(tmp_path / "clip.mp4", 14)
    summary = predict(checkpoint, [video], tmp_path / "out", score_threshold=0.0, batch_size=4, precision="fp32")
    written = tmp_path / "out" / "clip.mp4"
    assert summary.videos == [written] and summary.frames == 14
    assert sum(1 for _ in read_frames(written)) == 14
    info = probe_video(written)
    assert (info.width, info.height) == (82, 64)  # odd sizes padded to even for yuv420p
    lines = (tmp_path / "out" / "clip.jsonl").read_text().splitlines()
    assert [json.loads(line)["frame"] for line in lines] == list(range(14))
    assert json.loads(lines[12])["time"] == pytest.approx(1.0)


def test_real_footage_from_balloon_photos_decodes_back_frame_for_frame(
    checkpoint: Path, shared_data: Path, tmp_path: Path
) -> None:
    photos = sorted((shared_data / "balloon" / "val").glob("*.jpg"))[:4]
    source = tmp_path / "balloons.mp4"
    with VideoWriter(source, fps=10) as writer:  # 12 frames of real photos (each held for 3 frames), 320x240
        for photo in photos[:4]:
            frame = np.asarray(PILImage.open(photo).convert("RGB").resize((320, 240)))
            for _ in range(3):
                writer.write(frame)
    summary = predict(checkpoint, [source], tmp_path / "out", score_threshold=0.0, batch_size=5, precision="fp32")
    written = tmp_path / "out" / "balloons.mp4"
    assert summary.frames == 12 and not summary.skipped
    decoded = list(read_frames(written))
    assert len(decoded) == 12 and decoded[0].shape == (240, 320, 3)
    original = list(read_frames(source))
    assert any(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(decoded, original, strict=True))
    lines = [json.loads(line) for line in (tmp_path / "out" / "balloons.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(12))
    assert sum(len(line["detections"]) for line in lines) == summary.detections > 0


def test_frame_times_of_a_variable_frame_rate_video_come_from_its_timestamps(checkpoint: Path, tmp_path: Path) -> None:
    video, milliseconds = tmp_path / "vfr.mp4", [1000, 1040, 1080, 1500, 1540, 3000]  # a clip cut from a longer one
    with av.open(str(video), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for k, ms in enumerate(milliseconds):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * k, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    predict(checkpoint, [video], tmp_path / "out", precision="fp32")
    lines = [json.loads(line) for line in (tmp_path / "out" / "vfr.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(6))
    expected = [(ms - 1000) / 1000 for ms in milliseconds]
    assert [line["time"] for line in lines] == pytest.approx(expected)
    # the annotated mp4 keeps the source's timing instead of spreading the frames at a constant rate
    assert [time for time, _ in read_timed_frames(tmp_path / "out" / "vfr.mp4")] == pytest.approx(expected)


@pytest.fixture(params=["libx264", "mpeg4"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The encoder VideoWriter will pick: libx264, or the mpeg4 fallback taken when libx264 is missing."""
    name = str(request.param)
    if name not in av.codecs_available:
        pytest.skip(f"this PyAV has no {name} encoder")
    if name == "mpeg4":
        monkeypatch.setattr(av, "codecs_available", av.codecs_available - {"libx264"})
    return name


def test_frames_written_with_times_decode_back_at_those_times(codec: str, tmp_path: Path) -> None:
    times = [0.0, 0.5, 0.52, 0.52, 2.0, 30000 / 1001]  # a repeated time is shown one tick (1/60000 s) later
    with VideoWriter(tmp_path / "timed.mp4", fps=25) as writer:
        for k, time in enumerate(times):
            writer.write(np.full((48, 64, 3), 30 * k, np.uint8), time)
    assert writer.codec == codec
    decoded = list(read_timed_frames(tmp_path / "timed.mp4"))
    assert [time for time, _ in decoded] == pytest.approx([0.0, 0.5, 0.52, 0.52 + 1 / 60000, 2.0, 30000 / 1001])
    assert [int(frame.mean()) for _, frame in decoded] == pytest.approx([30 * k for k in range(6)], abs=3)


def test_a_video_writer_refuses_frames_with_and_without_times_mixed(tmp_path: Path) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    mixed = "frame 1 was written without a time"
    with pytest.raises(ValueError, match=mixed), VideoWriter(tmp_path / "m.mp4") as writer:
        writer.write(frame, 0.0)
        writer.write(frame)
    assert not (tmp_path / "m.mp4").exists()  # the partial file is dropped


def test_a_truncated_video_is_named_and_the_rest_is_still_processed(
    checkpoint: Path, module_tiny_dataset: Path, tmp_path: Path, synthetic_video: VideoFactory
) -> None:
    good = synthetic_video(tmp_path / "good.mp4", 4)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    image = module_tiny_dataset.parent / "images" / "img_01.png"
    summary = predict(checkpoint, [bad, good, image], tmp_path / "out", precision="fp32")
    assert summary.images == 1 and summary.frames == 4
    assert len(summary.skipped) == 1 and "bad.mp4" in summary.skipped[0]
    assert not (tmp_path / "out" / "bad.mp4").exists()  # nothing half-written under the final name


def test_unknown_model_and_class_are_clear_errors(checkpoint: Path, module_tiny_dataset: Path, tmp_path: Path) -> None:
    image = module_tiny_dataset.parent / "images" / "img_01.png"
    with pytest.raises(TrackingError, match="model:nothing.*no registered model 'nothing'"):
        predict("model:nothing@best-bbox-AP", [image], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"--classes: dog not among the model's classes \(circle, square\)"):
        predict(checkpoint, [image], tmp_path / "out", classes=["dog"])


def test_cli_predict_with_class_filter_then_show_predictions(
    checkpoint: Path, module_tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["predict", str(checkpoint), str(module_tiny_dataset.parent / "images"), "--out", str(out),
            "--score-threshold", "0", "--precision", "fp32", "--classes", "square"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 images, 0 video frames" in result.output
    results = orjson.loads((out / "results.json").read_bytes())
    assert results and {r["category_id"] for r in results} == {2}
    shown = runner.invoke(
        app, ["show-predictions", str(out / "results.json"), "--dataset", str(module_tiny_dataset), "--out",
              str(tmp_path / "shown"), "--score-threshold", "0"]
    )  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert len(list((tmp_path / "shown").glob("*.jpg"))) == 4
    stray = runner.invoke(app, ["show-predictions", str(out / "results.json"), "--dataset", str(out / "images.json"),
                                "--out", str(tmp_path / "again")])  # fmt: skip
    assert stray.exit_code == 0, stray.output  # predict's own image list works as the dataset too


@pytest.mark.parametrize("as_numpy", [False, True])
def test_detections_from_outputs_is_the_same_for_torch_and_onnx_runtime_outputs(as_numpy: bool) -> None:
    from detforge.inference.predictor import detections_from_outputs

    out = {
        "boxes": torch.tensor([[0.0, 1.0, 5.0, 6.0], [1.0, 1.0, 2.0, 2.0], [2.0, 2.0, 8.0, 9.0]]),
        "scores": torch.tensor([0.9, 0.2, 0.8]),
        "labels": torch.tensor([2, 1, 0]),  # the third is background: never a class
        "masks": torch.full((3, 1, 4, 5), 0.7),
        "keypoints": torch.zeros(3, 2, 3),
        "keypoints_scores": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
    }
    if as_numpy:
        out = {key: value.numpy() for key, value in out.items()}
    found = detections_from_outputs(out, ["circle", "square"], score_threshold=0.5)
    assert found.labels.tolist() == [1] and found.scores.tolist() == pytest.approx([0.9])
    assert found.boxes.tolist() == [[0.0, 1.0, 5.0, 6.0]] and found.boxes.dtype == np.float32
    assert found.masks is not None and found.masks.shape == (1, 4, 5) and found.masks.all()
    assert found.keypoints is not None and found.keypoints[0, :, 2].tolist() == [1.0, 2.0]


def test_a_pause_of_hours_between_frames_is_written_as_one_hour(codec: str, tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "gap.mp4", fps=25) as writer:  # libx264 fails on a gap of 5 h, mpeg4 wraps 10 h
        for time in (0.0, 0.04, 36_000.0, 36_000.04):
            writer.write(np.zeros((48, 64, 3), np.uint8), time)
    assert writer.codec == codec
    times = [time for time, _ in read_timed_frames(tmp_path / "gap.mp4")]
    assert times == pytest.approx([0.0, 0.04, 3600.04, 3600.08])


def test_an_encoder_that_fails_at_the_end_is_a_video_error_and_leaves_no_file(tmp_path: Path) -> None:
    class FailingStream:
        def encode(self, frame: object = None) -> list[object]:
            raise av.FFmpegError(22, "Invalid argument")

    writer = VideoWriter(tmp_path / "broken.mp4")
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer._stream = FailingStream()  # type: ignore[assignment]
    with pytest.raises(VideoError, match=r"broken.mp4: encoding the video failed after 1 frames"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
