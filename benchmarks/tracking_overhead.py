"""The share of training step time spent in tracking (goal < 1 %), measured two ways in one run.

    python benchmarks/tracking_overhead.py [--iters 25] [--rounds 2] [--size 320] [--arch ssdlite320_mobilenet_v3_large]

1. End to end: step times of ``detforge.train`` with MLflow tracking on (the embedded SQLite store in a temporary
   folder, ``train.log_period=1``) against the same training with ``tracking.backend=none``, in rounds ordered
   ABBA so a drift of the machine hits both. Wall time per step (median, robust to other processes taking the
   CPU for a moment) and process CPU time per step (all threads: it includes the background sender's work).
   The spread between runs of the same kind is printed too: an overhead smaller than that is noise.
2. Direct: the time spent inside ``MlflowTracker``'s callback methods on the training thread (every event
   wrapped with a timer), as a share of the tracked runs' step time. Per-step events (``on_step_end``) are
   reported as a share; once-per-run and per-evaluation events as seconds per call.

Steps are timed from the end of the warm-up to the step before the last (the last step evaluates and writes the
final checkpoint, in both runs). Torch runs on one thread by default: on a busy 2-core machine two threads that
spin-wait for each other made steps 5 to 10 times slower and far noisier (``--threads 0`` keeps torch's default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import detforge
from detforge.data.synth import synth_shapes
from detforge.engine.callbacks import Callback, StepOutput
from detforge.engine.trainer import Trainer
from detforge.tracking.mlflow_tracker import MlflowTracker

EVENTS = ("on_fit_start", "on_step_end", "on_eval_end", "on_checkpoint", "on_fit_end")


class StepEnds(Callback):
    """Wall-clock and process CPU time (all threads) at the end of every step; it runs after the tracker's own
    ``on_step_end``, so that counts."""

    def __init__(self) -> None:
        self.ends: dict[int, tuple[float, float]] = {}

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        self.ends[out.iteration] = (time.perf_counter(), time.process_time())


class TrackerTimes:
    """Seconds spent in each MlflowTracker event, per call, on the thread that dispatched it."""

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[int, float]]] = defaultdict(list)  # event -> [(iteration, seconds)]
        self.windows: list[float] = []  # wall time of the timed steps of each tracked run

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = {name: getattr(MlflowTracker, name) for name in EVENTS}
        for name, method in originals.items():
            setattr(MlflowTracker, name, self._timed(name, method))
        try:
            yield
        finally:
            for name, method in originals.items():
                setattr(MlflowTracker, name, method)

    def _timed(self, name: str, method: Callable[..., None]) -> Callable[..., None]:
        def timed(tracker: MlflowTracker, trainer: Trainer, *args: Any) -> None:
            start = time.perf_counter()
            try:
                method(tracker, trainer, *args)
            finally:
                self.calls[name].append((trainer.iteration, time.perf_counter() - start))

        return timed


def config(args: argparse.Namespace, data: Path, out: Path, *, tracking: bool) -> dict[str, Any]:
    return {
        "data": {
            "train": str(data),
            "val": str(data),
            "min_size": [args.size],
            "max_size": args.size,
            "num_workers": args.workers,
        },
        "model": {"arch": args.arch},
        "train": {
            "max_iter": args.warmup + args.iters + 1,
            "batch_size": args.batch,
            "warmup_iters": 0,
            "checkpoint_period": 10_000,
            "log_period": 1,
            "seed": 0,
        },
        "eval": {"period": 0, "batch_size": args.batch},  # once, at the last step
        "tracking": {"backend": "mlflow" if tracking else "none", "experiment": "overhead"},
        "output": {"dir": str(out)},
    }


Steps = list[tuple[float, float]]  # (wall, CPU) seconds of each timed step


def run(args: argparse.Namespace, data: Path, out: Path, *, tracking: bool, times: TrackerTimes) -> Steps:
    """Wall and CPU seconds of each timed step (from the end of the warm-up to the step before the last); the
    tracker's calls go to ``times``."""
    ends = StepEnds()
    if tracking:
        with times.installed():
            detforge.train(config(args, data, out, tracking=True), callbacks=[ends])
    else:
        detforge.train(config(args, data, out, tracking=False), callbacks=[ends])
    window = range(args.warmup + 1, args.warmup + args.iters + 1)
    steps = [(ends.ends[i][0] - ends.ends[i - 1][0], ends.ends[i][1] - ends.ends[i - 1][1]) for i in window]
    if tracking:
        times.windows.append(sum(wall for wall, _ in steps))
    return steps


def step_share(args: argparse.Namespace, times: TrackerTimes) -> tuple[float, float]:
    """(share of the timed steps' wall time spent in on_step_end, mean seconds per on_step_end call)."""
    first, last = args.warmup + 1, args.warmup + args.iters
    inside = [s for it, s in times.calls["on_step_end"] if first <= it <= last]
    return sum(inside) / sum(times.windows), statistics.mean(inside)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=25, help="timed iterations per training")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of trainings, with and without tracking")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="synthetic images (also the validation set)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--arch", default="ssdlite320_mobilenet_v3_large")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("DETFORGE_PROGRESS", "0")
    times = TrackerTimes()
    runs: dict[bool, list[Steps]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DETFORGE_WORKDIR"] = tmp  # the embedded store goes to tmp/.detforge, never ./.detforge
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        data = synth_shapes(Path(tmp) / "shapes", images=args.images, seed=0, size=(args.size, args.size))
        for r in range(args.rounds):
            for tracking in (False, True) if r % 2 == 0 else (True, False):  # ABBA: a drift hits both alike
                out = Path(tmp) / f"{'tracked' if tracking else 'plain'}{r}"
                runs[tracking].append(run(args, data, out, tracking=tracking, times=times))
    report(args, runs, times)


def report(args: argparse.Namespace, runs: dict[bool, list[Steps]], times: TrackerTimes) -> None:
    threads = torch.get_num_threads()
    print(
        f"{args.arch} at {args.size} px, batch {args.batch}, {threads} torch thread(s), {args.workers} loader "
        f"workers, {args.iters} timed steps x {args.rounds} rounds, train.log_period=1, embedded SQLite store"
    )
    off = [step for steps in runs[False] for step in steps]
    on = [step for steps in runs[True] for step in steps]
    figures = {
        "wall, median step": (statistics.median(w for w, _ in off), statistics.median(w for w, _ in on)),
        "CPU (all threads), mean": (statistics.mean(c for _, c in off), statistics.mean(c for _, c in on)),
    }
    for what, (plain, tracked) in figures.items():
        print(
            f"  {what:<24} none {1000 * plain:7.1f} ms, mlflow {1000 * tracked:7.1f} ms: "
            f"overhead {100 * (tracked / plain - 1):+6.2f} % (ratio {tracked / plain:.4f}; goal < 1 %)"
        )
    means = [statistics.mean(w for w, _ in steps) for kind in runs.values() for steps in kind]
    spread = max(
        max(m) / min(m) - 1 for m in ([statistics.mean(w for w, _ in s) for s in kind] for kind in runs.values())
    )
    print(f"  noise: mean wall step of runs of the same kind differ by up to {100 * spread:.1f} % ", end="")
    print(f"(all runs {1000 * min(means):.0f}-{1000 * max(means):.0f} ms)")
    share, per_call = step_share(args, times)
    print(
        f"  inside the tracker on the training thread: {100 * share:.3f} % of step time "
        f"({1e6 * per_call:.0f} us per on_step_end; goal < 1 %)"
    )
    for name in EVENTS:
        if name != "on_step_end" and times.calls[name]:
            seconds = [s for _, s in times.calls[name]]
            print(f"    {name:<14} {1000 * statistics.mean(seconds):8.1f} ms per call ({len(seconds)} calls)")


if __name__ == "__main__":
    main()
