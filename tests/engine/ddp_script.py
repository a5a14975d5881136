"""Run by test_ddp.py under torchrun: trains through the public API and records the images each rank used."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import detforge
from detforge.engine.callbacks import Callback


class RecordImages(Callback):
    """Wraps the trainer's loader to write the image ids of every batch this rank trains on."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"rank{os.environ['RANK']}.txt"

    def on_fit_start(self, trainer: Any) -> None:
        loader, path = trainer.loader, self.path

        def recorded() -> Iterator[Any]:
            for images, targets in loader:
                with path.open("a") as f:
                    f.write(" ".join(str(int(t["image_id"])) for t in targets) + "\n")
                yield images, targets

        trainer.loader = recorded()


if __name__ == "__main__":
    config, folder = sys.argv[1], Path(sys.argv[2])
    detforge.train(config, callbacks=[RecordImages(folder)])
