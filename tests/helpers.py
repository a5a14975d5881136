"""Small helpers several test modules share (importable everywhere: ``tests/`` is on sys.path via conftest.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process_group(proc: subprocess.Popen[Any], *, grace: float = 15.0) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session=True``), SIGKILL it after
    ``grace`` seconds: servers that spawn workers leave none behind."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)


class FileServer:
    """Serves the files under ``root`` over http on 127.0.0.1 (a free port) and records the paths asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_config(dataset: Path, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A training config for the tiny dataset (64 px, Faster R-CNN MobileNetV3-320, 4 iterations, no tracking);
    each keyword names a section whose keys are added to or replace the defaults'."""
    config: dict[str, dict[str, Any]] = {
        "data": {"train": str(dataset), "val": str(dataset), "min_size": [64], "max_size": 64, "num_workers": 0},
        "model": {"arch": "fasterrcnn_mobilenet_v3_large_320_fpn", "score_threshold": 0.0},
        "train": {"max_iter": 4, "batch_size": 2, "warmup_iters": 1, "checkpoint_period": 2},
        "eval": {"period": 2, "best_metric": "bbox/AR100"},
        "tracking": {"backend": "none"},
        "output": {"dir": str(out)},
    }
    for name, values in sections.items():
        config[name] = {**config[name], **values}
    return config
