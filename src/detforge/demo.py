"""`detforge demo`: the whole flow on the embedded default (synthetic shapes).

For now this is the dataset part of the flow: synthesise, import and validate, look at statistics and
drawings, curate (filter, balance, split), and round-trip through YOLO. Training, tracking and inference join
as those parts land.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from detforge.data.curation import balance, filter_categories, split
from detforge.data.formats.coco import save_coco
from detforge.data.formats.registry import export_dataset, import_dataset
from detforge.data.show import show_dataset
from detforge.data.stats import dataset_stats, plot_stats, stats_table
from detforge.data.synth import synth_shapes
from detforge.errors import DatasetError


@dataclass
class DemoResult:
    """Where the demo put things, by name."""

    workdir: Path
    outputs: dict[str, Path] = field(default_factory=dict)


def run_demo(workdir: str | Path, *, quick: bool = False, console: Console | None = None) -> DemoResult:
    """Run the demo in ``workdir`` (created if needed) and return where every output is."""
    console = console or Console()
    result = DemoResult(Path(workdir).resolve())
    out = result.outputs
    work = result.workdir

    console.rule("1. Synthetic shapes")
    out["synthetic"] = synth_shapes(work / "synthetic", images=40 if quick else 200, seed=0)

    console.rule("2. Import and validate")
    imported = import_dataset(out["synthetic"], "coco", out=work / "dataset.json")
    imported.report.raise_for_errors()
    out["dataset"] = save_coco(imported.dataset, work / "dataset.json")
    console.print(f"{out['dataset']}: {imported.dataset.summary()}", highlight=False)

    console.rule("3. Statistics and drawings")
    stats = dataset_stats(imported.dataset)
    console.print(stats_table(stats))
    out["plots"] = work / "stats"
    plot_stats(stats, out["plots"])
    out["drawings"] = work / "show"
    show_dataset(imported.dataset, out["drawings"], n=4)

    console.rule("4. Curation: filter, balance, split")
    filtered, op = filter_categories(imported.dataset, ["circle", "square"])
    console.print(f"filter: {op.summary}", highlight=False)
    balanced, op = balance(filtered, require_all=True)
    console.print(f"balance: {op.summary}", highlight=False)
    out["curated"] = save_coco(balanced, work / "curated.json")
    parts, op = split(balanced, [0.8, 0.2], seed=0)
    console.print(f"split: {op.summary}", highlight=False)
    for name, part in parts.items():
        out[name] = save_coco(part, work / "splits" / f"{name}.json")

    console.rule("5. YOLO round trip")
    out["yolo"] = export_dataset(balanced, "yolo", work / "yolo")
    back = import_dataset(out["yolo"].parent, "yolo")
    if len(back.dataset.annotations) != len(balanced.annotations):
        raise DatasetError(
            f"{out['yolo']}: the YOLO round trip gave {len(back.dataset.annotations)} annotations, "
            f"expected {len(balanced.annotations)}."
        )
    console.print(f"YOLO export re-imported: {back.dataset.summary()}", highlight=False)

    console.rule("Outputs")
    for name, path in out.items():
        console.print(f"  {name:10s} {path}", highlight=False)
    return result
