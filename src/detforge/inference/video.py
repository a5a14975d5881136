"""Video in and out through PyAV (torchvision 0.29 has no video I/O), streamed frame by frame.

Memory stays flat however long the video: frames are decoded, drawn and encoded one batch at a time. Output is
H.264 (``libx264``) in mp4 when the encoder exists, else MPEG-4 Part 2; written to a temporary file and renamed
into place when complete, so an interrupted run never leaves a half-written video under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import av
import numpy as np

from detforge.errors import DatasetError

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoInfo",
    "VideoWriter",
    "is_video_file",
    "probe_video",
    "read_frames",
    "read_timed_frames",
]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"})
DEFAULT_FPS = Fraction(25)
# Time base of videos written with frame times: 1/60000 s holds the frame periods of 24, 25, 30, 50 and 60 fps and
# of NTSC's 30000/1001 exactly (24000/1001 to half a tick), and fits MPEG-4 Part 2's 16-bit time bases.
TIMED_TIME_BASE = Fraction(1, 60000)
# Longest pause between two written frames: libx264 fails on gaps of some hours and MPEG-4 Part 2 wraps gaps past
# 2**31 ticks (about 10 h), so a longer pause (a motion-triggered recording, say) is shown as one hour.
MAX_TIMED_GAP = 3600.0


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    fps: Fraction
    frames: int | None  # from the container header; None when it does not say
    width: int
    height: int


class VideoError(DatasetError):
    """A video that cannot be opened or decoded."""


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame rate, frame count (when the header gives it) and size of the first video stream."""
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
            frames = stream.frames or None
            return VideoInfo(Fraction(fps), frames, stream.codec_context.width, stream.codec_context.height)
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: cannot open the video ({exc}).") from None


def read_frames(path: str | os.PathLike[str]) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of the first video stream, in order.

    Raises:
        VideoError: as :func:`read_timed_frames`.
    """
    for _, frame in read_timed_frames(path):
        yield frame


def read_timed_frames(path: str | os.PathLike[str]) -> Iterator[tuple[float, np.ndarray]]:
    """``(time, frame)`` pairs of the first video stream, in order: the frame's presentation time in seconds from
    the first frame (from its timestamp, so variable frame rates come out right; a frame without a timestamp comes
    one frame period after the one before) and its RGB uint8 pixels (H, W, 3).

    Raises:
        VideoError: the file cannot be opened, or decoding fails part-way (the message says after how many frames;
            the frames before were yielded).
    """
    count = 0
    try:
        with av.open(str(path)) as container:
            stream = _video_stream(container, path)
            stream.thread_type = "SLICE"  # FIELD_NOTES: "AUTO" (frame threads) is slower on 2 cores
            period = 1.0 / float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
            start, time = None, -period
            for frame in container.decode(stream):
                if frame.time is None:
                    time += period
                else:
                    start = frame.time if start is None else start
                    time = max(frame.time - start, time)  # never backwards (a frame without a timestamp before)
                yield time, frame.to_ndarray(format="rgb24")
                count += 1
    except av.FFmpegError as exc:
        where = f"after {count} frames" if count else "before the first frame"
        raise VideoError(f"{path}: the video is damaged or truncated: decoding stopped {where} ({exc}).") from None


def _video_stream(container: av.container.InputContainer, path: str | os.PathLike[str]) -> av.VideoStream:
    if not container.streams.video:
        raise VideoError(f"{path}: no video stream in the file.")
    return container.streams.video[0]


class VideoWriter:
    """Encodes RGB frames into ``path`` (mp4), atomically: the file appears only when :meth:`close` succeeds.

    The frame size is fixed by the first frame; odd sizes are padded to even (yuv420p needs even sizes). Frames
    are shown ``1 / fps`` apart, unless :meth:`write` is given each frame's time: then they keep those times, so a
    variable-frame-rate source comes out with its own timing (``fps`` is then only the nominal rate).
    """

    def __init__(self, path: str | os.PathLike[str], *, fps: Fraction | float = DEFAULT_FPS, crf: int = 23) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial.mp4")
        self.fps = Fraction(fps).limit_denominator(65535)  # MPEG-4 Part 2 allows 16-bit time bases
        self.crf = crf
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self.codec = ""
        self.frames = 0
        self._timed: bool | None = None  # fixed by the first write
        self._last_pts = -1
        self._cut = 0  # ticks taken out of pauses longer than MAX_TIMED_GAP so far

    def write(self, frame: np.ndarray, time: float | None = None) -> None:
        """Append one RGB uint8 frame (H, W, 3), shown at ``time`` seconds from the start if given.

        Give a time to every frame or to none. A frame whose time is not after the previous frame's (to the time
        base, 1/60000 s) is shown one tick after it; a pause longer than :data:`MAX_TIMED_GAP` seconds is shortened
        to that, and the frames after it keep their spacing.
        """
        timed = time is not None
        if self._timed is None:
            self._timed = timed
        elif timed != self._timed:
            raise ValueError(
                f"{self.path}: frame {self.frames} was written {'with' if timed else 'without'} a time, the frames "
                f"before {'without' if timed else 'with'} one; give a time to every frame or to none."
            )
        if self._container is None:
            self._open(frame.shape[1], frame.shape[0])
        assert self._stream is not None and self._container is not None
        frame = _pad_even(frame)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if time is not None:
            self._last_pts = self._timed_pts(time)
            video_frame.pts, video_frame.time_base = self._last_pts, TIMED_TIME_BASE
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames += 1

    def _timed_pts(self, time: float) -> int:
        """The pts of a frame shown at ``time``: after the previous frame, and pauses longer than
        :data:`MAX_TIMED_GAP` shortened to it (the frames after a shortened pause move up with it)."""
        pts = round(time / TIMED_TIME_BASE) - self._cut
        max_gap = round(MAX_TIMED_GAP / TIMED_TIME_BASE)
        if self._last_pts >= 0 and pts - self._last_pts > max_gap:
            self._cut += pts - self._last_pts - max_gap
            pts = self._last_pts + max_gap
        return max(pts, self._last_pts + 1)

    def _open(self, width: int, height: int) -> None:
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        self.codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = self._container.add_stream(self.codec, rate=self.fps)
        if not isinstance(stream, av.VideoStream):
            raise VideoError(f"{self.path}: PyAV's '{self.codec}' encoder gave a {type(stream).__name__}, not video.")
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        if self._timed:
            stream.codec_context.time_base = TIMED_TIME_BASE
        if self.codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        self._stream = stream

    def close(self) -> Path | None:
        """Flush the encoder and move the file into place; None when no frame was written.

        Raises:
            VideoError: the encoder failed (the partial file is deleted).
        """
        if self._container is None:
            return None
        assert self._stream is not None
        try:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
        except av.FFmpegError as exc:
            self.abort()
            raise VideoError(f"{self.path}: encoding the video failed after {self.frames} frames ({exc}).") from None
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        if self._container is not None:
            with contextlib.suppress(av.FFmpegError):
                self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _pad_even(frame: np.ndarray) -> np.ndarray:
    height, width = frame.shape[:2]
    if height % 2 == 0 and width % 2 == 0:
        return frame
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
