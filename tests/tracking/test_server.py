"""Training against a real ``mlflow server``: killed and restarted mid-run, gone at the end (then ``detforge sync``),
and the team setup on PostgreSQL with proxied artifacts."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import detforge
from detforge.cli.main import app
from detforge.engine.callbacks import Callback, StepOutput
from detforge.engine.checkpoint import load_checkpoint
from detforge.engine.trainer import Trainer
from detforge.tracking.mlflow_tracker import MlflowTracker
from detforge.tracking.registry import list_model_versions, resolve_model
from detforge.tracking.spool import Spool
from detforge.tracking.store import open_store
from helpers import free_port

MLFLOW = Path(sys.executable).with_name("mlflow")


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.05)


class MlflowServer:
    """An ``mlflow server`` on 127.0.0.1 with proxied artifacts (one worker, no job runner) that can be killed
    and started again on the same port."""

    def __init__(self, backend_uri: str, folder: Path) -> None:
        self.backend_uri, self.folder, self.port = backend_uri, folder, free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (it answers about 5 to 10 s later; see :meth:`wait_healthy`)."""
        command = [
            MLFLOW, "server", "--backend-store-uri", self.backend_uri, "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--serve-artifacts", "--artifacts-destination", str(self.folder / "artifacts"),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # the job runner alone takes ~18 s to start
        with (self.folder / "server.log").open("ab") as log:
            # its own process group: `mlflow server` runs uvicorn as a child, and both must die at once
            self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            assert self.proc is not None and self.proc.poll() is None, f"mlflow server exited:\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"mlflow server not up after {timeout:.0f} s:\n{self.log_tail()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the server and its workers: no shutdown, no reply to requests in flight."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def log_tail(self) -> str:
        return (self.folder / "server.log").read_text(errors="replace")[-3000:]


class Outage(Callback):
    """Kills the server after step ``kill_at``; with ``restart_at``, starts it again after that step (once the
    tracker has really failed to send something) and holds the last step until it answers."""

    def __init__(self, server: MlflowServer, *, kill_at: int, restart_at: int | None = None) -> None:
        self.server, self.kill_at, self.restart_at = server, kill_at, restart_at
        self.spool: Spool | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        tracker = next(cb for cb in trainer.callbacks if isinstance(cb, MlflowTracker))
        self.spool = tracker.spool  # the tracker drops it when it closes; the test reads it afterwards

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        assert self.spool is not None
        if out.iteration == self.kill_at:
            self.server.kill()
        if out.iteration == self.restart_at:
            spool = self.spool
            wait_for(lambda: spool.failures > 0, timeout=30, what="the tracker meeting the dead server")
            self.server.start()
        if out.iteration == trainer.max_iter and self.restart_at is not None:
            self.server.wait_healthy()


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One server for the module (its first start, which creates the database, is the slowest)."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(f"sqlite:///{folder / 'db.sqlite'}", folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def server(sqlite_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> MlflowServer:
    """The module's server, up; MLflow's client fails fast instead of retrying a dead server for minutes."""
    if sqlite_server.proc is None:
        sqlite_server.start()
    sqlite_server.wait_healthy()
    # MlflowClient retries a refused connection 7 times with exponential back-off (about 4 minutes) inside
    # each call; the spool already retries, and a test cannot wait that long.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    monkeypatch.setenv("DETFORGE_PROGRESS", "0")
    return sqlite_server


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Training and the server share two cores here; two torch threads fighting them made steps ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tracked_config(dataset: Path, out: Path, uri: str, *, name: str, max_iter: int, eval_period: int) -> dict[str, Any]:
    return {
        "data": {"train": str(dataset), "val": str(dataset), "min_size": [64], "max_size": 64, "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {
            "max_iter": max_iter,
            "batch_size": 2,
            "warmup_iters": 1,
            "checkpoint_period": 1000,
            "log_period": 1,
        },
        "eval": {"period": eval_period, "best_metric": "bbox/AR100"},
        "tracking": {
            "uri": uri,
            "experiment": name,
            "flush_seconds": 0.2,
            "num_eval_images": 1,
            "report_images": 1,
            "log_datasets": False,
        },
        "output": {"dir": str(out)},
    }


def assert_run_complete(uri: str, out: Path, *, name: str, max_iter: int, eval_steps: set[int]) -> None:
    """The run is FINISHED in the store with every loss point the run logged locally, and its final weights
    come back from the registry through the server's artifact proxy."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run_id = json.loads((out / "tracking" / "run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    local = {line["iteration"]: line["loss"] for line in lines if "loss" in line}
    assert sorted(local) == list(range(1, max_iter + 1))
    stored = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}  # duplicates allowed
    assert stored == pytest.approx(local, rel=1e-6)
    assert {m.step for m in client.get_metric_history(run_id, "eval/bbox/AR100")} == eval_steps

    versions = [v for v in list_model_versions(name, store=open_store(uri)) if v.run_id == run_id]
    assert max(v.iteration or 0 for v in versions) == max_iter
    last = max(versions, key=lambda v: v.iteration or 0)
    downloaded = load_checkpoint(resolve_model(last.ref, store=open_store(uri)))["model"]
    final = load_checkpoint(out / "model_final.pt")["model"]
    assert downloaded.keys() == final.keys()
    assert all(torch.equal(downloaded[k], final[k]) for k in final)


def test_server_killed_and_restarted_mid_run_loses_no_metric_point(
    server: MlflowServer, tiny_dataset: Path, tmp_path: Path
) -> None:
    out, max_iter = tmp_path / "run", 10
    outage = Outage(server, kill_at=2, restart_at=4)  # the evaluation at step 5 is recorded while it is down
    cfg = tracked_config(tiny_dataset, out, server.uri, name="outage", max_iter=max_iter, eval_period=5)
    result = detforge.train(cfg, callbacks=[outage])

    assert result.iteration == max_iter
    assert outage.spool is not None
    assert outage.spool.failures > 0, "the outage was never seen by the tracker"
    assert outage.spool.pending == 0
    assert_run_complete(server.uri, out, name="outage", max_iter=max_iter, eval_steps={5, 10})


def test_server_gone_at_the_end_then_detforge_sync_sends_the_rest(
    server: MlflowServer, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # on_fit_end gives a dead server 30 s to come back; that grace is not what this test is about
    close = Spool.close
    monkeypatch.setattr(Spool, "close", lambda self, *, timeout=30.0: close(self, timeout=min(timeout, 1.0)))
    out, max_iter = tmp_path / "run", 6
    outage = Outage(server, kill_at=2)
    cfg = tracked_config(tiny_dataset, out, server.uri, name="offline", max_iter=max_iter, eval_period=0)
    result = detforge.train(cfg, callbacks=[outage])

    assert result.iteration == max_iter and result.final_checkpoint is not None  # training does not care
    assert outage.spool is not None and outage.spool.pending > 0
    still_down = CliRunner().invoke(app, ["sync", str(out)])
    assert still_down.exit_code == 2
    assert "0 operations; " in still_down.output and "could not be sent" in still_down.output

    server.start()
    server.wait_healthy()
    synced = CliRunner().invoke(app, ["sync", str(out)])
    assert synced.exit_code == 0, synced.output
    assert f"sent {outage.spool.pending} operations; 0 still pending" in synced.output
    assert_run_complete(server.uri, out, name="offline", max_iter=max_iter, eval_steps={max_iter})


# -- team mode: PostgreSQL ---------------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with ``initdb`` and ``pg_ctl``, else PATH's, else None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: [int(n) for n in re.findall(r"\d+", p)])
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[str]:
    """A throw-away PostgreSQL on 127.0.0.1 (trust authentication); yields the database URI for MLflow."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on PATH)")
    if importlib.util.find_spec("psycopg2") is None:
        pytest.skip("psycopg2 is not installed (pip install psycopg2-binary)")
    user: str | None = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    # not under tmp_path: pytest's root folder is private to its owner, and the server may run as 'postgres'
    folder = Path(tempfile.mkdtemp(prefix="detforge-pg-"))
    if user is not None:
        shutil.chown(folder, user)
    data, port = folder / "data", free_port()

    def run(*args: str | Path) -> None:
        subprocess.run([str(a) for a in args], check=True, capture_output=True, user=user, timeout=120)

    try:
        run(bin_dir / "initdb", "-D", data, "-U", "detforge", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
        run(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "postgres.log", "-w", "-t", "60", "start")
        run(bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "detforge", "mlflow")
        yield f"postgresql+psycopg2://detforge@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                user=user,
                check=False,
                capture_output=True,
            )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_team_server_on_postgresql_with_proxied_artifacts(
    postgres: str, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DETFORGE_PROGRESS", "0")
    server = MlflowServer(postgres, tmp_path / "server")
    server.start()
    try:
        server.wait_healthy(timeout=120)
        out, max_iter = tmp_path / "run", 4
        cfg = tracked_config(tiny_dataset, out, server.uri, name="team", max_iter=max_iter, eval_period=0)
        detforge.train(cfg)
        assert_run_complete(server.uri, out, name="team", max_iter=max_iter, eval_steps={max_iter})
        stored = list((tmp_path / "server" / "artifacts").glob("*/*/artifacts/checkpoints/*/**/*.pt"))
        assert stored, "the registered checkpoint is not in the server's artifact store"
    finally:
        server.kill()
