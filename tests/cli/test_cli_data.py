"""`detforge data ...` end to end through the CLI, as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detforge.cli.main import app, expand_greedy_options

runner = CliRunner()


def run(*args: object, code: int = 0) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result.output


def test_greedy_options_expand_until_the_next_option_or_json() -> None:
    assert expand_greedy_options(
        ["data", "filter", "in.json", "--categories", "person", "sports ball", "--out", "o.json"]
    ) == [
        "data",
        "filter",
        "in.json",
        "--categories",
        "person",
        "--categories",
        "sports ball",
        "--out",
        "o.json",
    ]
    assert expand_greedy_options(["split", "--fractions", "0.8", "0.2", "x.json"]) == [
        "split",
        "--fractions",
        "0.8",
        "--fractions",
        "0.2",
        "x.json",
    ]


def test_import_prints_counts_and_writes_a_loadable_file(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds.json"
    text = run("data", "import", tiny_dataset, "--format", "coco", "--out", out)
    assert "4 images, 5 annotations, 2 categories" in text
    assert json.loads(out.read_text())["image_root"]
    assert "No errors" in run("data", "validate", out)


def test_validate_exits_non_zero_and_names_the_problem(tiny_dataset: Path) -> None:
    data = json.loads(tiny_dataset.read_text())
    data["annotations"][0]["category_id"] = 9
    tiny_dataset.write_text(json.dumps(data))
    text = run("data", "validate", tiny_dataset, code=1)
    assert "unknown category_id" in text and "img_01.png" in text


def test_filter_keeps_the_given_order_and_bad_names_are_one_clear_line(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.json"
    run("data", "filter", tiny_dataset, "--categories", "square", "circle", "--out", out)
    cats = json.loads(out.read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "square"), (2, "circle")]
    result = runner.invoke(
        app, ["data", "filter", str(tiny_dataset), "--categories", "sqaure", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "DatasetError" in result.output and "square" in result.output
    assert "Traceback" not in result.output


def test_curation_commands_chain(tiny_dataset: Path, tmp_path: Path) -> None:
    run("data", "balance", tiny_dataset, "--require-all", "--out", tmp_path / "b.json")
    both = json.loads((tmp_path / "b.json").read_text())
    assert [i["file_name"] for i in both["images"]] == ["img_01.png"]
    run("data", "subset", tiny_dataset, "--fraction", "0.5", "--after", "0.5", "--out", tmp_path / "s.json")
    assert [i["id"] for i in json.loads((tmp_path / "s.json").read_text())["images"]] == [3, 4]
    run("data", "split", tiny_dataset, "--fractions", "0.5", "0.5", "--out", tmp_path / "parts")
    parts = [json.loads((tmp_path / "parts" / f"{n}.json").read_text()) for n in ("train", "val")]
    assert sorted(i["file_name"] for p in parts for i in p["images"]) == [
        f"img_0{i}.png" for i in range(1, 5)
    ]
    run(
        "data",
        "merge",
        tmp_path / "parts" / "train.json",
        tmp_path / "parts" / "val.json",
        "--out",
        tmp_path / "m.json",
    )
    assert len(json.loads((tmp_path / "m.json").read_text())["annotations"]) == 5


def test_stats_show_synth_and_yolo_export(tiny_dataset: Path, tmp_path: Path) -> None:
    text = run(
        "data", "stats", tiny_dataset, "--json", tmp_path / "stats.json", "--plots", tmp_path / "plots"
    )
    assert "circle" in text and "square" in text
    assert json.loads((tmp_path / "stats.json").read_text())
    assert list((tmp_path / "plots").glob("*.png"))
    run("data", "show", tiny_dataset, "--n", "2", "--out", tmp_path / "show")
    assert len(list((tmp_path / "show").iterdir())) == 2
    run("data", "synth", "--out", tmp_path / "synth", "--images", "3", "--size", "96")
    assert (tmp_path / "synth" / "annotations.json").is_file()
    args = ["--images", "3", "--size", "96", "--max-objects", "1", "--extent", "0.3", "0.4"]
    run("data", "synth", "--out", tmp_path / "one", *args)
    one = json.loads((tmp_path / "one" / "annotations.json").read_text())["annotations"]
    assert len(one) == 3 and all(0.3 * 96 - 2 <= max(a["bbox"][2:]) <= 0.4 * 96 * 2**0.5 + 2 for a in one)
    run("data", "export", tiny_dataset, "--format", "yolo", "--out", tmp_path / "yolo")
    assert (tmp_path / "yolo" / "data.yaml").is_file()
    text = run("data", "import", tmp_path / "yolo", "--format", "yolo", "--out", tmp_path / "back.json")
    assert "4 images, 5 annotations, 2 categories" in text


@pytest.mark.parametrize("fmt", ["yolo", "voc", "cvat", "labelme", "via"])
def test_import_of_a_missing_source_is_one_clear_error(fmt: str, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    result = runner.invoke(
        app, ["data", "import", str(missing), "--format", fmt, "--out", str(tmp_path / "o.json")]
    )
    assert result.exit_code == 2, result.output
    assert "nothing-here" in result.output
    assert "Traceback" not in result.output
