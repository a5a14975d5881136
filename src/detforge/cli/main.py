"""The `detforge` command. Commands are thin: they parse arguments, call the public API and print."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

from detforge.errors import DetforgeError

err_console = Console(stderr=True)

# Options that take several values, as in `--categories person "sports ball" --out x.json`. Parsers take
# one value each, so these are expanded into repeated options before parsing.
GREEDY_OPTIONS = frozenset({"--categories", "--fractions", "--names"})


def expand_greedy_options(args: Sequence[str]) -> list[str]:
    """Turn ``--opt a b c`` into ``--opt a --opt b --opt c`` for the options in GREEDY_OPTIONS.

    A value list ends at the next token starting with ``-`` (unless it is a negative number) or at a
    ``.json`` path or a ``dataset:``/``model:`` reference, so ``filter --categories a b in.json`` still finds its input.
    """
    out: list[str] = []
    greedy: str | None = None
    for token in args:
        if greedy and not _ends_values(token):
            out += [greedy, token]
            continue
        greedy = None
        if token in GREEDY_OPTIONS:
            greedy = token
            continue
        out.append(token)
    if greedy:
        out.append(greedy)  # no value: let click report the missing argument
    return out


def _ends_values(token: str) -> bool:
    if token.endswith(".json") or token.startswith(("dataset:", "model:")):
        return True
    if token.startswith("-"):
        try:
            float(token)
        except ValueError:
            return True
    return False


class DetforgeGroup(TyperGroup):
    """Expands greedy options and turns detforge errors into one red line and exit code 2."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        if ctx.parent is None:
            args = expand_greedy_options(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DetforgeError as exc:
            err_console.print(f"[bold red]{type(exc).__name__}:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=DetforgeGroup,
    help="detforge: datasets, training, tracking and inference for detection and segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from detforge.cli.data import data_app
    from detforge.cli.tracking import lineage_cmd, models_app, sync_cmd, ui_cmd
    from detforge.cli.train import eval_cmd, train_cmd

    app.add_typer(data_app, name="data")
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
    app.add_typer(models_app, name="models")
    app.command("lineage")(lineage_cmd)
    app.command("ui")(ui_cmd)
    app.command("sync")(sync_cmd)


@app.command("config-reference")
def config_reference_cmd(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of printing.")] = None,
) -> None:
    """Print (or write) the Markdown reference of every config key."""
    from detforge.config import config_reference
    from detforge.files import atomic_write_text

    text = config_reference()
    if out is None:
        print(text)
    else:
        atomic_write_text(out, text)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for everything the demo writes.")] = Path("demo-output"),
    quick: Annotated[bool, typer.Option(help="A smaller run of the same path (about a minute).")] = False,
) -> None:
    """Run the whole flow on synthetic data and print where every output is."""
    from detforge.demo import run_demo

    run_demo(workdir, quick=quick)


_register()


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
