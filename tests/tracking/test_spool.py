"""The tracking spool: operations survive a store that is down, a crash and a restart; order is kept."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from detforge.tracking.spool import Op, Spool, pending_count


class FlakyStore:
    """Receives operations; raises while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.received: list[Op] = []

    def send(self, ops: list[Op]) -> None:
        if self.down:
            raise ConnectionError("connection refused")
        self.received += ops


def test_operations_wait_while_the_store_is_down_and_arrive_in_order(tmp_path: Path) -> None:
    store = FlakyStore()
    spool = Spool(tmp_path, store.send, flush_seconds=0.05, max_batch=3)
    spool.start()
    store.down = True
    for step in range(10):
        spool.append({"op": "metrics", "step": step})
    time.sleep(0.3)
    assert store.received == [] and spool.pending == 10
    assert spool.last_error == "ConnectionError: connection refused"
    store.down = False
    assert spool.close(timeout=5)
    assert [op["step"] for op in store.received] == list(range(10))
    assert spool.pending == 0


def test_what_was_not_sent_is_sent_after_a_restart_and_nothing_twice(tmp_path: Path) -> None:
    store = FlakyStore()
    spool = Spool(tmp_path, store.send, flush_seconds=60)
    for step in range(3):
        spool.append({"op": "metrics", "step": step})
    assert spool.flush(timeout=1)
    store.down = True
    for step in range(3, 6):
        spool.append({"op": "metrics", "step": step})
    assert not spool.close(timeout=0)  # the run ends while the store is down: the ops stay on disk
    with (tmp_path / "spool.jsonl").open("a") as f:
        f.write('{"op": "metrics", "st')  # a line cut by a crash
    store.down = False
    again = Spool(tmp_path, store.send)
    assert again.pending == 3
    again.append({"op": "metrics", "step": 6})
    assert again.close(timeout=1)
    assert [op["step"] for op in store.received] == list(range(7))


@pytest.mark.parametrize("done", ["", "garbage", "999"])
def test_a_damaged_counter_never_loses_operations(tmp_path: Path, done: str) -> None:
    store = FlakyStore()
    store.down = True
    spool = Spool(tmp_path, store.send)
    spool.append({"op": "tags", "values": {"a": "b"}})
    assert not spool.close(timeout=0)
    (tmp_path / "spool.done").write_text(done)
    spool = Spool(tmp_path, store.send)
    assert spool.pending == (0 if done == "999" else 1)  # the counter never exceeds what the log holds


def test_close_gives_up_on_a_stuck_sender_without_losing_anything(tmp_path: Path) -> None:
    release = threading.Event()

    def stuck(ops: list[Op]) -> None:
        release.wait(10)  # a request to a dead server that takes its time
        raise ConnectionError("timed out")

    spool = Spool(tmp_path, stuck, flush_seconds=0.01)
    spool.start()
    spool.append({"op": "metrics", "step": 1})
    time.sleep(0.1)
    started = time.monotonic()
    assert not spool.close(timeout=0.5)
    assert time.monotonic() - started < 2
    release.set()
    assert pending_count(tmp_path) == 1


def test_a_resumed_run_drops_unsent_points_from_after_its_checkpoint(tmp_path: Path) -> None:
    store = FlakyStore()
    store.down = True
    spool = Spool(tmp_path, store.send)
    for step in range(1, 7):
        spool.append({"op": "metrics", "step": step})
    spool.append({"op": "tags", "values": {"a": "b"}})
    assert not spool.close(timeout=0)
    store.down = False
    resumed = Spool(tmp_path, store.send)
    assert resumed.drop_pending(lambda op: int(op.get("step", 0)) > 4) == 2
    assert resumed.close(timeout=1)
    assert [op.get("step") for op in store.received] == [1, 2, 3, 4, None]
