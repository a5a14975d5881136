"""Datasets: typed COCO-style records, six importers, validation, curation, statistics and synthetic data.

The functions users call, in one place::

    from detforge.data import import_dataset, load_coco, save_coco, filter_categories, balance, split
"""

from detforge.data.curation import Operation, balance, filter_categories, merge, split, subset
from detforge.data.formats.coco import load_coco, read_coco, save_coco
from detforge.data.formats.registry import EXPORTERS, IMPORTERS, ImportResult, export_dataset, import_dataset
from detforge.data.records import Annotation, Category, Dataset, Image
from detforge.data.report import Report
from detforge.data.show import show_dataset
from detforge.data.stats import dataset_stats, plot_stats, write_stats_json
from detforge.data.synth import synth_shapes
from detforge.data.validate import validate_dataset

__all__ = [
    "EXPORTERS",
    "IMPORTERS",
    "Annotation",
    "Category",
    "Dataset",
    "Image",
    "ImportResult",
    "Operation",
    "Report",
    "balance",
    "dataset_stats",
    "export_dataset",
    "filter_categories",
    "import_dataset",
    "load_coco",
    "merge",
    "plot_stats",
    "read_coco",
    "save_coco",
    "show_dataset",
    "split",
    "subset",
    "synth_shapes",
    "validate_dataset",
    "write_stats_json",
]
