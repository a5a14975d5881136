"""`detforge models`, `detforge lineage`, `detforge ui` and `detforge sync`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from detforge.cli.data import Uri
from detforge.cli.output import LazyConsole

console = LazyConsole()
MAIN_METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50", "keypoints/AP")
models_app = typer.Typer(help="Registered model versions: list them, see their versions, move aliases.")


@models_app.command("list")
def list_cmd(uri: Uri = None) -> None:
    """Every registered model: versions, latest, aliases."""
    from detforge.tracking.registry import list_models
    from detforge.tracking.store import open_store

    store = open_store(uri)
    table = Table(title=f"models in {store.describe()}")
    for column in ("name", "versions", "latest", "aliases"):
        table.add_column(column, overflow="fold")
    for name, versions in list_models(store=store):
        aliases = ", ".join(f"{a}→v{v.version}" for v in versions for a in v.aliases)
        latest = f"v{versions[-1].version}" if versions else ""
        table.add_row(name, str(len(versions)), latest, aliases)
    console.print(table)


@models_app.command("versions")
def versions_cmd(name: Annotated[str, typer.Argument(help="Registered model name.")], uri: Uri = None) -> None:
    """The versions of a model: iteration, metrics, datasets, parent, aliases."""
    from detforge.errors import DetforgeError
    from detforge.tracking.registry import list_model_versions
    from detforge.tracking.store import open_store

    found = list_model_versions(name, store=open_store(uri))
    if not found:
        raise DetforgeError(f"no registered model '{name}'. `detforge models list` shows the models there are.")
    table = Table(title=f"model {name}")
    for column in ("version", "aliases", "iteration", "metrics", "datasets", "parent", "run"):
        table.add_column(column, overflow="fold")
    for v in found:
        aliases = [*v.aliases, *(["latest"] if v is found[-1] else [])]
        metrics = ", ".join(f"{k}={val:.3f}" for k, val in v.metrics.items() if k in MAIN_METRICS and val >= 0)
        datasets = ", ".join(f"{role}={ref}" for role, ref in v.datasets.items())
        table.add_row(
            f"v{v.version}", ", ".join(aliases), str(v.iteration or ""), metrics, datasets, v.parent or "", v.run_id[:8]
        )
    console.print(table)


@models_app.command("alias")
def alias_cmd(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version: 3 or v3.")],
    alias: Annotated[str, typer.Argument(help="Alias to point at it (characters other than [A-Za-z0-9_-] become -).")],
    uri: Uri = None,
) -> None:
    """Point an alias (model:NAME@ALIAS) at a version."""
    from detforge.errors import DetforgeError
    from detforge.tracking.registry import set_model_alias
    from detforge.tracking.store import open_store

    number = version.removeprefix("v")
    if not number.isdigit():
        raise DetforgeError(f"version '{version}' is not a version number; write 3 or v3.")
    found = set_model_alias(name, int(number), alias, store=open_store(uri))
    console.print(f"{found.ref}: aliases {', '.join(found.aliases)}", highlight=False)


def lineage_cmd(
    ref: Annotated[str, typer.Argument(help="model:NAME[:vN|@ALIAS], dataset:NAME[:vN|@ALIAS] or run:RUN_ID.")],
    mermaid: Annotated[Path | None, typer.Option(help="Also write the graph as Mermaid text to this file.")] = None,
    png: Annotated[Path | None, typer.Option(help="Also draw the graph into this PNG.")] = None,
    uri: Uri = None,
) -> None:
    """Where a model or dataset version came from: datasets, runs, parent models, evaluations."""
    from detforge.files import atomic_write_bytes, atomic_write_text
    from detforge.tracking.lineage import build_lineage, lineage_tree, plot_lineage, to_mermaid
    from detforge.tracking.store import open_store

    graph = build_lineage(ref, store=open_store(uri))
    console.print(lineage_tree(graph))
    if mermaid is not None:
        atomic_write_text(mermaid, to_mermaid(graph))
        console.print(f"mermaid: {mermaid}", highlight=False)
    if png is not None:
        atomic_write_bytes(png, plot_lineage(graph))
        console.print(f"png: {png}", highlight=False)


def ui_cmd(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the UI to your network.")] = "127.0.0.1",
    uri: Uri = None,
) -> None:
    """Start the MLflow web UI on the tracking store (127.0.0.1, one worker, no background jobs)."""
    from detforge.tracking.store import open_store

    store = open_store(uri)
    command = ui_command(store.uri, host=host, port=port)
    console.print(f"MLflow UI for {store.describe()}: http://{host}:{port}  (Ctrl+C stops it)", highlight=False)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        raise typer.Exit(subprocess.call(command, env=env))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def ui_command(uri: str, *, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line ``detforge ui`` runs."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow") or "mlflow"
    return [
        mlflow, "server", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def sync_cmd(
    run_dir: Annotated[Path, typer.Argument(help="The output.dir of a tracked training run.")],
) -> None:
    """Send what a run could not send to its tracking server (spooled metrics, images, model versions)."""
    from detforge.errors import DetforgeError
    from detforge.tracking.mlflow_tracker import sync_run

    sent, pending = sync_run(run_dir)
    console.print(f"sent {sent} operations; {pending} still pending", highlight=False)
    if pending:
        raise DetforgeError(f"{pending} operations of {run_dir} could not be sent; is the server up? Run sync again.")
