"""detforge: train detectors and segmenters on your own data, with dataset versions and experiment tracking."""

from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.errors import CheckpointError, ConfigError, DatasetError, DetforgeError

__version__ = "0.1.0"

__all__ = [
    "Annotation",
    "Category",
    "CheckpointError",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "DetforgeError",
    "Image",
    "__version__",
]
