"""Atomic writes: a failed write leaves the old file as it was and no temporary file behind."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from detforge.engine.checkpoint import load_checkpoint, save_checkpoint
from detforge.files import atomic_write, atomic_write_bytes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "sub" / "data.bin", b"old")

    def half_then_fail(f: BinaryIO) -> None:
        f.write(b"half of the new")
        raise KeyboardInterrupt  # a Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_checkpoints_are_written_atomically_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint({"model": {"w": torch.ones(2)}, "iteration": 3}, tmp_path / "model.pt")
    assert load_checkpoint(path)["iteration"] == 3

    def broken_save(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"iteration": 4}, path)
    assert load_checkpoint(path)["iteration"] == 3 and [p.name for p in tmp_path.iterdir()] == ["model.pt"]
