"""Distributed training through torchrun on CPU (gloo): disjoint shards, rank 0 writes, the checkpoint loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from detforge.config import ModelConfig
from detforge.engine.checkpoint import load_checkpoint
from detforge.models.build import build_model
from helpers import tiny_config

ENV = {**os.environ, "DETFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _config(tiny_dataset: Path, out: Path, *, max_iter: int) -> Path:
    config = tiny_config(
        tiny_dataset, out, model={"score_threshold": 0.05}, train={"max_iter": max_iter, "batch_size": 1},
        eval={"period": 0}
    )  # fmt: skip
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def _torchrun(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """torchrun with 2 CPU processes; on a time-out the whole process group goes, so no rank is left behind."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_two_ranks_see_disjoint_images_and_rank_zero_writes_a_loadable_checkpoint(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    config = _config(tiny_dataset, tmp_path / "run", max_iter=2)
    done = _torchrun(Path(__file__).with_name("ddp_script.py"), config, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [{int(i) for line in (tmp_path / f"rank{r}.txt").read_text().split() for i in line.split()} for r in (0, 1)]
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == {1, 2, 3, 4}  # 2 steps x 1 image x 2 ranks = one epoch of the 4 images

    state = load_checkpoint(tmp_path / "run" / "model_final.pt")
    assert state["iteration"] == 2
    model = build_model(
        ModelConfig(arch="fasterrcnn_mobilenet_v3_large_320_fpn"), num_classes=2, min_size=[64], max_size=64
    )
    model.load_state_dict(state["model"])  # no "module." prefix: rank 0 saved the unwrapped model
    assert (tmp_path / "run" / "eval" / "iter_0000002" / "metrics.json").is_file()
    rngs = load_checkpoint(tmp_path / "run" / "model_0000002.pt")["rng_per_rank"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # each rank resumes its own


@pytest.mark.slow
def test_torchrun_runs_the_cli(tiny_dataset: Path, tmp_path: Path) -> None:
    config = _config(tiny_dataset, tmp_path / "cli", max_iter=2)
    done = _torchrun("-m", "detforge", "train", config, "eval.period=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(tmp_path / "cli" / "model_final.pt")["iteration"] == 2
