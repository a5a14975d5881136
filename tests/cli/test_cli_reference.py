"""docs/cli.md is generated from the commands themselves and must not go stale."""

from __future__ import annotations

from pathlib import Path

from detforge.cli.main import cli_reference


def test_docs_cli_reference_is_up_to_date() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    text = cli_reference()
    for command in ("detforge predict", "detforge lineage", "detforge data log", "detforge models alias"):
        assert f"## `{command}`" in text
    assert docs.read_text() == text, "run: detforge cli-reference --out docs/cli.md"
