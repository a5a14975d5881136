"""detforge: train detectors and segmenters on your own data, with dataset versions and experiment tracking.

``detforge.data`` holds the dataset API; ``train``, ``evaluate`` and ``Config`` are loaded on first use so
that ``import detforge`` (and the CLI's data commands) do not pay for importing torch.
"""

from typing import Any

from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.errors import CheckpointError, ConfigError, DatasetError, DetforgeError, TrainingError

__version__ = "0.1.0"

_LAZY = {
    "train": "detforge.api",
    "evaluate": "detforge.api",
    "Config": "detforge.config",
    "load_config": "detforge.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detforge' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Annotation",
    "Category",
    "CheckpointError",
    "Config",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "DetforgeError",
    "Image",
    "TrainingError",
    "__version__",
    "evaluate",
    "load_config",
    "train",
]
