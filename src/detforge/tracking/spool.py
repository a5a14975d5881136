"""A local spool of tracking operations: nothing is lost when the tracking server goes away.

Every operation (metric points, tags, artifacts, model versions) is first appended to
``<run dir>/tracking/spool.jsonl`` and then sent by a background thread. The number of operations known to be
in the store is kept in ``spool.done``. When the server is unreachable the thread retries with back-off while
training goes on; whatever is still pending when the run ends stays in the spool and is sent by
``detforge sync RUN_DIR`` (or by the next resume of the run).

Delivery is at least once: an operation whose reply was lost may be sent again (a duplicated metric point,
never a missing one). Artifacts are referenced by path, so the spool stays small.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from detforge.files import atomic_write_text
from detforge.tracking.store import TrackingError

Op = dict[str, Any]
Sender = Callable[[list[Op]], None]

SPOOL_NAME = "spool.jsonl"
DONE_NAME = "spool.done"
LOCK_NAME = "spool.lock"


class Spool:
    """Append-only operation log with a background sender.

    Args:
        folder: where ``spool.jsonl`` and ``spool.done`` live.
        send: sends a list of operations to the store; raises when the store is unreachable.
        flush_seconds: how often the background thread sends what is pending.
        max_batch: operations sent in one call.
    """

    def __init__(
        self, folder: str | os.PathLike[str], send: Sender, *, flush_seconds: float = 5.0, max_batch: int = 500
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path, self.done_path = self.folder / SPOOL_NAME, self.folder / DONE_NAME
        self.send, self.flush_seconds, self.max_batch = send, flush_seconds, max_batch
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # one sender at a time: the thread, flush() or close()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock_file = _lock_folder(self.folder)
        self._ops: list[Op] = _read_ops(self.path)
        self._done = _read_done(self.done_path, len(self._ops))
        self._file = self.path.open("a", encoding="utf-8")
        if self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n"):
            self._file.write("\n")  # end a line cut by a crash, so the next op starts on its own line
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.failures = 0

    @property
    def pending(self) -> int:
        """Operations not yet known to be in the store."""
        with self._lock:
            return len(self._ops) - self._done

    def append(self, op: Op) -> None:
        """Record ``op`` (cheap: one buffered line; the file is flushed by the sender)."""
        line = json.dumps(op, separators=(",", ":"), allow_nan=True)
        with self._lock:
            self._ops.append(op)
            self._file.write(line + "\n")

    def start(self) -> None:
        """Start the background sender."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="detforge-tracking", daemon=True)
            self._thread.start()

    def flush(self, *, timeout: float | None = None) -> bool:
        """Send everything pending now (retrying until ``timeout`` seconds); True when nothing is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._send_pending():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, self.flush_seconds))

    def close(self, *, timeout: float = 30.0) -> bool:
        """Stop the sender, try to send the rest for ``timeout`` seconds; True when nothing is left.

        Never waits much longer than ``timeout``: when the sender thread is stuck in a slow request, the spool is
        closed without sending (the thread may still finish its batch; what it does not send stays on disk).
        """
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # a second sender would race the first over ``_done``
                with self._lock:
                    self._file.flush()
                return False  # the folder stays locked until the stuck thread's process ends
            self._thread = None
        ok = self.flush(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._file.close()
        self._lock_file.close()  # releases the folder lock
        return ok

    def drop_pending(self, unwanted: Callable[[Op], bool]) -> int:
        """Remove pending (unsent) operations for which ``unwanted`` is true; return how many. Only before
        :meth:`start`: used when a run resumes from an earlier checkpoint than its last spooled step."""
        assert self._thread is None, "drop_pending() only before start()"
        with self._lock:
            kept = self._ops[self._done :]
            kept = [op for op in kept if not unwanted(op)]
            dropped = len(self._ops) - self._done - len(kept)
            if dropped:
                self._ops = self._ops[: self._done] + kept
                self._file.close()
                text = "".join(json.dumps(op, separators=(",", ":"), allow_nan=True) + "\n" for op in self._ops)
                atomic_write_text(self.path, text)
                self._file = self.path.open("a", encoding="utf-8")
        return dropped

    def _run(self) -> None:
        delay = self.flush_seconds
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            delay = self.flush_seconds if self._send_pending() else min(delay * 2, 60.0)

    def sync_to_disk(self) -> None:
        """Flush and fsync the log, so what was appended survives a crash (called when a checkpoint is written)."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _send_pending(self) -> bool:
        with self._sending:
            return self._send_batches()

    def _send_batches(self) -> bool:
        with self._lock:
            self._file.flush()
            batch = self._ops[self._done : self._done + self.max_batch]
        while batch:
            try:
                self.send(batch)
            except Exception as exc:  # the store is down or refused: keep the ops, retry later
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.failures += 1
                return False
            with self._lock:
                self._done += len(batch)
                atomic_write_text(self.done_path, str(self._done))
                batch = self._ops[self._done : self._done + self.max_batch]
        return True


class SpoolBusyError(TrackingError):
    """Another process (a training run, or ``detforge sync``) has this spool open."""


def _lock_folder(folder: Path) -> IO[str]:
    """Hold an exclusive lock on ``folder/spool.lock`` (released when the returned file is closed)."""
    handle = (folder / LOCK_NAME).open("a")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolBusyError(
            f"{folder}: the tracking spool is in use by another process (a training run or `detforge sync`); "
            "wait until it ends."
        ) from None
    return handle


def pending_count(folder: str | os.PathLike[str]) -> int:
    """Operations in ``folder``'s spool not yet known to be in the store (0 when there is no spool)."""
    folder = Path(folder)
    total = len(_read_ops(folder / SPOOL_NAME))
    return total - _read_done(folder / DONE_NAME, total)


def _read_ops(path: Path) -> list[Op]:
    if not path.is_file():
        return []
    ops = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash: it was never sent either
            continue
    return ops


def _read_done(path: Path, total: int) -> int:
    try:
        return min(int(path.read_text().strip()), total)
    except (OSError, ValueError):
        return 0
