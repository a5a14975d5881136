"""A training process killed with SIGKILL resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from detforge.engine.checkpoint import load_checkpoint


def write_config(tiny_dataset: Path, out: Path, *, max_iter: int = 12) -> Path:
    config = {
        "data": {
            "train": str(tiny_dataset),
            "min_size": [64, 72],
            "max_size": 80,
            "num_workers": 1,
            "color_jitter": 0.2,
        },
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn"},
        "train": {
            "max_iter": max_iter,
            "batch_size": 2,
            "warmup_iters": 3,
            "steps": [8],
            "checkpoint_period": 4,
            "deterministic": True,
            "seed": 7,
            "log_period": 1,
        },
        "tracking": {"backend": "none"},
        "output": {"dir": str(out)},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def detforge(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "detforge", *map(str, args)]


ENV = {**os.environ, "DETFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_weights(tiny_dataset: Path, tmp_path: Path) -> None:
    straight = write_config(tiny_dataset, tmp_path / "straight")
    killed = write_config(tiny_dataset, tmp_path / "killed")
    subprocess.run(detforge("train", straight), check=True, env=ENV, capture_output=True, timeout=300)

    proc = subprocess.Popen(detforge("train", killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = tmp_path / "killed" / "last_checkpoint"
    deadline = time.monotonic() + 240
    while not (pointer.exists() and pointer.read_text() == "model_0000004.pt"):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model_final.pt").exists()  # it really stopped mid-run

    done = subprocess.run(detforge("train", killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "continuing from model_0000004.pt (iteration 4)" in done.stderr

    a = load_checkpoint(tmp_path / "straight" / "model_final.pt")["model"]
    b = load_checkpoint(tmp_path / "killed" / "model_final.pt")["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # The log reads as one run: the interrupted run's lines past iteration 4 were dropped on resume.
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    assert [it for it, _ in _losses(tmp_path / "killed")] == list(range(1, 13))


def _losses(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(rec["iteration"], rec["loss"]) for rec in lines]


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(tiny_dataset: Path, tmp_path: Path) -> None:
    config = write_config(tiny_dataset, tmp_path / "run", max_iter=2)
    subprocess.run(detforge("train", config), check=True, env=ENV, capture_output=True, timeout=300)
    again = subprocess.run(detforge("train", config, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    assert "already finished at iteration 2" in again.stderr and "train.max_iter=4 --resume" in again.stderr
    longer = subprocess.run(
        detforge("train", config, "train.max_iter=3", "--resume"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert longer.returncode == 0, longer.stderr
    assert load_checkpoint(tmp_path / "run" / "model_final.pt")["iteration"] == 3
