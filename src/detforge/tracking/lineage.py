"""Lineage: which data and which parent model produced a checkpoint, and how good it was.

:func:`build_lineage` walks upstream from a model version, dataset version or run:

    dataset versions (and the versions they were curated from) -> training run -> model version
    parent model version -> fine-tune run -> model version -> evaluations

and returns a small graph that renders as a rich tree (:func:`lineage_tree`), Mermaid text (:func:`to_mermaid`)
and a PNG (:func:`plot_lineage`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

from rich.tree import Tree

from detforge.tracking import registry
from detforge.tracking.datasets import get_dataset_version, is_dataset_ref
from detforge.tracking.evaluations import find_evaluations
from detforge.tracking.store import Store, TrackingError, open_store

__all__ = ["Lineage", "Node", "build_lineage", "lineage_tree", "plot_lineage", "to_mermaid"]

RUN_PREFIX = "run:"
_SHOWN_METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "keypoints/AP")


@dataclass
class Node:
    """A version or run in the graph."""

    id: str  # dataset:NAME:vN, model:NAME:vN, run:ID or evaluation:ID
    kind: str  # dataset | run | model | evaluation
    label: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass
class Lineage:
    """Nodes and edges ``(source, target, label)``: a source was used to make its target."""

    root: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)

    def inputs(self, node_id: str) -> list[tuple[str, str]]:
        """``(source, label)`` of the edges into ``node_id``."""
        return [(s, label) for s, t, label in self.edges if t == node_id]

    def outputs(self, node_id: str) -> list[tuple[str, str]]:
        return [(t, label) for s, t, label in self.edges if s == node_id]

    def _edge(self, source: str, target: str, label: str) -> None:
        if (source, target, label) not in self.edges:
            self.edges.append((source, target, label))


def build_lineage(ref: str, *, store: Store | None = None) -> Lineage:
    """The upstream graph of ``ref`` (``model:...``, ``dataset:...`` or ``run:ID``), with model evaluations."""
    store = store or open_store()
    walker = _Walker(store)
    if registry.is_model_ref(ref):
        root = walker.model(registry.get_model_version(ref, store=store).ref)
    elif is_dataset_ref(ref):
        root = walker.dataset(get_dataset_version(ref, store=store).ref)
    elif ref.startswith(RUN_PREFIX):
        root = walker.run(ref.removeprefix(RUN_PREFIX))
    else:
        raise TrackingError(f"'{ref}': expected model:NAME[:vN|@ALIAS], dataset:NAME[:vN|@ALIAS] or run:RUN_ID.")
    walker.graph.root = root
    return walker.graph


class _Walker:
    def __init__(self, store: Store) -> None:
        self.store, self.client = store, store.client()
        self.graph = Lineage(root="")

    def dataset(self, ref: str) -> str:
        if ref in self.graph.nodes:
            return ref
        version = get_dataset_version(ref, store=self.store)
        details = {"images": str(version.num_images), "annotations": str(version.num_annotations)}
        if version.aliases:
            details["aliases"] = ", ".join(version.aliases)
        self.graph.nodes[ref] = Node(ref, "dataset", ref, details)
        operation = (version.operation or {}).get("name", "derived")
        params = (version.operation or {}).get("params")
        label = f"{operation} {json.dumps(params, sort_keys=True)}" if params else operation
        for parent in version.parents:
            self.graph._edge(self.dataset(parent), ref, label)
        return ref

    def model(self, ref: str) -> str:
        if ref in self.graph.nodes:
            return ref
        version = registry.get_model_version(ref, store=self.store)
        details = {"iteration": str(version.iteration)} | _metrics_text(version.metrics)
        if version.aliases:
            details["aliases"] = ", ".join(version.aliases)
        self.graph.nodes[ref] = Node(ref, "model", ref, details)
        source = version.tags.get("detforge.source_model")  # an export (ONNX, TorchScript) of another version
        if source and registry.is_model_ref(source):
            details["format"] = version.tags.get("detforge.format", "?")
            self.graph._edge(self.model(source), ref, f"exported ({details['format']})")
            return ref
        if version.run_id:
            self.graph._edge(self.run(version.run_id), ref, f"checkpoint @ {version.iteration}")
        evaluation = version.tags.get(registry.TAG_EVALUATION)
        if evaluation:
            node = f"evaluation:{version.run_id}/{evaluation}"
            label = f"in-training eval @ {version.iteration}"
            self.graph.nodes[node] = Node(node, "evaluation", label, _metrics_text(version.metrics))
            self.graph._edge(ref, node, "evaluated")
        for record in find_evaluations(ref, store=self.store):
            node = f"evaluation:{record.run_id}"
            details = _metrics_text(record.metrics) | {"report": f"{record.artifact_uri}/report.html"}
            self.graph.nodes[node] = Node(node, "evaluation", f"detforge eval {record.run_id[:8]}", details)
            self.graph._edge(ref, node, "evaluated")
            if record.dataset and is_dataset_ref(record.dataset):
                self.graph._edge(self.dataset(record.dataset), node, "on")
        return ref

    def run(self, run_id: str) -> str:
        node = f"{RUN_PREFIX}{run_id}"
        if node in self.graph.nodes:
            return node
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            raise TrackingError(f"run {run_id}: not found in {self.store.describe()} ({exc}).") from None
        tags = run.data.tags
        name = tags.get("mlflow.runName", run_id[:8])
        details = {"status": run.info.status, "arch": tags.get("detforge.arch", "?")}
        if tags.get("mlflow.source.git.commit"):
            details["commit"] = tags["mlflow.source.git.commit"][:10]
        self.graph.nodes[node] = Node(node, "run", name, details)
        for role in ("train", "val"):
            ref = tags.get(f"detforge.dataset.{role}")
            if ref:
                self.graph._edge(self.dataset(ref), node, role)
        parent = tags.get(registry.TAG_PARENT)
        if parent:
            self.graph._edge(self.model(parent), node, "fine-tuned from")
        return node


def _metrics_text(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k: v for k, v in metrics.items() if k in _SHOWN_METRICS and v >= 0}
    return {k: f"{v:.3f}" for k, v in shown.items()}


# ---------------------------------------------------------------------------------------------------------
# rendering

_STYLE = {"dataset": "green", "run": "cyan", "model": "magenta", "evaluation": "yellow"}


def lineage_tree(graph: Lineage) -> Tree:
    """The root, its evaluations, then everything it came from, nested (a node seen twice is marked ``↑``)."""
    root = graph.nodes[graph.root]
    tree = Tree(_node_text(root))
    for target, label in graph.outputs(root.id):
        tree.add(f"[dim]{label}:[/] {_node_text(graph.nodes[target])}")
    seen = {root.id}
    _add_inputs(graph, root.id, tree, seen)
    return tree


def _add_inputs(graph: Lineage, node_id: str, tree: Tree, seen: set[str]) -> None:
    for source, label in graph.inputs(node_id):
        node = graph.nodes[source]
        if source in seen:
            tree.add(f"[dim]{label}:[/] {_node_text(node)} [dim]↑ (shown above)")
            continue
        seen.add(source)
        branch = tree.add(f"[dim]{label}:[/] {_node_text(node)}")
        if node.kind == "model":
            for target, out_label in graph.outputs(source):
                if graph.nodes[target].kind == "evaluation":
                    branch.add(f"[dim]{out_label}:[/] {_node_text(graph.nodes[target])}")
        _add_inputs(graph, source, branch, seen)


def _node_text(node: Node) -> str:
    details = " ".join(f"{k}={v}" for k, v in node.details.items())
    color = _STYLE.get(node.kind, "white")
    return f"[{color}]{node.kind}[/] [bold]{node.label}[/]" + (f" [dim]{details}[/]" if details else "")


def to_mermaid(graph: Lineage) -> str:
    """A Mermaid ``flowchart LR`` of the graph (paste into Markdown, GitHub renders it)."""
    ids = {node_id: f"n{k}" for k, node_id in enumerate(graph.nodes)}
    shapes = {"dataset": ("[(", ")]"), "run": ("([", "])"), "model": ("[[", "]]"), "evaluation": ("{{", "}}")}
    lines = ["flowchart LR"]
    for node_id, node in graph.nodes.items():
        left, right = shapes.get(node.kind, ("[", "]"))
        extra = "<br/>".join(f"{k}: {v}" for k, v in node.details.items() if k != "report")
        text = node.label + (f"<br/>{extra}" if extra else "")
        lines.append(f'    {ids[node_id]}{left}"{_mermaid_escape(text)}"{right}')
    for source, target, label in graph.edges:
        lines.append(f'    {ids[source]} -->|"{_mermaid_escape(label)}"| {ids[target]}')
    for kind, color in {"dataset": "#d4f4dd", "run": "#d4ecf4", "model": "#f4d4f0", "evaluation": "#f9f2c8"}.items():
        members = [ids[n] for n, node in graph.nodes.items() if node.kind == kind]
        if members:
            lines.append(f"    classDef {kind} fill:{color}")
            lines.append(f"    class {','.join(members)} {kind}")
    return "\n".join(lines) + "\n"


def _mermaid_escape(text: str) -> str:
    return text.replace('"', "#quot;")


def _depths(graph: Lineage) -> dict[str, int]:
    """Column of every node: the longest path from a node without inputs."""
    depth = {n: 0 for n in graph.nodes}
    for _ in range(len(graph.nodes)):
        changed = False
        for source, target, _label in graph.edges:
            if depth[target] < depth[source] + 1:
                depth[target], changed = depth[source] + 1, True
        if not changed:
            break
    return depth


def plot_lineage(graph: Lineage) -> bytes:
    """The graph as a PNG: columns from the oldest inputs (left) to the root and its evaluations (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = _depths(graph)
    columns: dict[int, list[str]] = {}
    for node_id in graph.nodes:
        columns.setdefault(depth[node_id], []).append(node_id)
    rows = max(len(c) for c in columns.values())
    width, height = 3.2 * (max(columns) + 1), 1.3 * rows + 0.6
    fig, ax = plt.subplots(figsize=(max(width, 4), max(height, 2)), dpi=110)
    positions = {
        n: (3.2 * d + 1.4, 1.3 * (rows - 1 - k) + 0.8) for d, col in columns.items() for k, n in enumerate(col)
    }
    colors = {"dataset": "#d4f4dd", "run": "#d4ecf4", "model": "#f4d4f0", "evaluation": "#f9f2c8"}
    boxes = {}
    for node_id, (x, y) in positions.items():
        node = graph.nodes[node_id]
        lines = [node.label, *(f"{k}={v}" for k, v in node.details.items() if k not in ("report", "commit"))][:4]
        root = node_id == graph.root
        boxes[node_id] = ax.text(
            x, y, "\n".join(line[:34] for line in lines), ha="center", va="center", fontsize=6.5,
            bbox={"boxstyle": "round,pad=0.4", "fc": colors.get(node.kind, "white"), "ec": "#222" if root else "#888",
                  "lw": 1.6 if root else 0.8},
        )  # fmt: skip
    labels: dict[tuple[str, str], list[str]] = {}
    for source, target, label in graph.edges:
        labels.setdefault((source, target), []).append(label)
    for (source, target), texts in labels.items():
        arrow = ax.annotate(
            "", xy=(0, 0.5), xycoords=boxes[target], xytext=(1, 0.5), textcoords=boxes[source],
            arrowprops={"arrowstyle": "->", "color": "#555", "shrinkA": 4, "shrinkB": 4},
        )  # fmt: skip
        (x0, y0), (x1, y1) = positions[source], positions[target]
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, ", ".join(texts)[:30], fontsize=6, ha="center", color="#333")
        arrow.set_zorder(0)
    ax.set_xlim(0, width)
    ax.set_ylim(0, 1.3 * rows + 0.3)
    ax.axis("off")
    ax.set_title(f"Lineage of {graph.root}", fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
