"""Every command in README.md, run for real in README order in one sandbox folder, or mirrored by a named test.

The commands come from the README's ``bash`` blocks and its ``python`` blocks (tests/readme_sandbox.py extracts
them). Each runs through the CLI (``detforge`` dropped, `CliRunner`) or ``exec`` in a temporary folder that
holds what the commands name, with one tracking store for all of them, since later commands use the versions
and models earlier ones made (`dataset:coco`, `model:shapes@best-bbox-AP50`). Each is checked for its effect
in EFFECTS. REWRITES lists every change made to a command before it runs (smaller trainings, paths that do not
exist here); MIRRORED names the tests that exercise the commands that cannot run here (`make`, `torchrun`,
`detforge ui`). A README command in neither EFFECTS nor MIRRORED fails `test_every_readme_command_is_run_or_mirrored`.
"""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from detforge.cli.main import app
from detforge.engine.checkpoint import load_checkpoint
from detforge.tracking.datasets import list_dataset_versions
from detforge.tracking.lineage import build_lineage
from readme_sandbox import REPO, SHAPES_IMAGES, SHARED_DATA, Ran, ReadmeStep, argv, build_sandbox, readme_steps

# Appended right after the config of every `detforge train/eval` (and detforge.train/evaluate) whose config is a
# README one; the README's own overrides follow and win. A run's saved config.yaml holds these values already.
SHRINK = [
    "train.max_iter=2", "train.batch_size=2", "train.warmup_iters=1", "train.steps=[]", "train.checkpoint_period=100",
    "data.min_size=[64]", "data.max_size=64", "data.num_workers=0", "model.detections_per_image=10",
]  # fmt: skip
# Also for the R-CNN configs (the SSD one refuses these keys): few RoIs and proposals for untrained models.
RCNN_SHRINK = ["model.box_batch_size_per_image=16", "model.rpn_pre_nms_top_n_train=100",
               "model.rpn_post_nms_top_n_train=50"]  # fmt: skip


@dataclass(frozen=True)
class Rewrite:
    pattern: str  # a regular expression over the step's text
    replacement: str
    reason: str


REWRITES = [
    Rewrite(r"^(detforge (?:train|eval) (?!runs/)\S+)", r"\1 " + " ".join(SHRINK),
            "trainings of 2-6 iterations at 64 px, so that the whole file takes about a minute"),
    Rewrite(r"^(detforge (?:train|eval) (?:configs/shapes_maskrcnn|stage\d)\.yaml)", r"\1 " + " ".join(RCNN_SHRINK),
            "the same, for the R-CNN configs"),
    Rewrite(r'(detforge\.(?:train|evaluate)\("[^"]+", \[)', r"\1*SHRINK, *RCNN_SHRINK, ",
            "the same in the Python API block"),
    Rewrite(r"train\.max_iter=300", "train.max_iter=2", "the Python block's run: as short as the others"),
    Rewrite(r"(model\.arch=maskrcnn_resnet50_fpn_v2)$", r"\1 train.max_iter=4 train.checkpoint_period=2",
            "the next command resumes this run after a simulated kill after the checkpoint at iteration 2"),
    Rewrite(r"train\.max_iter=1200", "train.max_iter=6", "extend the finished 4-iteration run by 2 iterations"),
    Rewrite(r"--images 200 --seed 0", f"--images {SHAPES_IMAGES} --seed 0 --size 64",
            "the sandbox's shapes were drawn by the same call; 200 images of 256 px would replace the images "
            "the shapes/splits files describe"),
    Rewrite(r"/mnt/big/coco\.json", "data/coco.json", "no /mnt/big here; a file in the sandbox is referenced"),
]  # fmt: skip

MIRRORED = {
    "make demo": ["tests/test_demo.py::test_quick_demo_leaves_versions_models_report_predictions_and_lineage",
                  "tests/test_readme.py::test_make_targets_run_the_demo_and_the_suite"],
    "make test": ["tests/test_readme.py::test_make_targets_run_the_demo_and_the_suite"],  # and CI runs it: .ci/run
    "torchrun --nproc_per_node 4 -m detforge train configs/shapes_maskrcnn.yaml": [
        "tests/engine/test_ddp.py::test_torchrun_runs_the_cli",
        "tests/engine/test_ddp.py::test_two_ranks_see_disjoint_images_and_rank_zero_writes_a_loadable_checkpoint"],
    "detforge ui": [
        "tests/tracking/test_ui_browser.py::test_mlflow_ui_shows_metric_charts_prediction_images_and_best_aliases",
        "tests/tracking/test_tracker.py::test_the_ui_binds_to_localhost_with_one_worker"],
}  # fmt: skip
# Run here with torchvision's download replaced by COCO-shaped random weights; the download itself is tested by:
DOWNLOAD_TESTS = [
    "tests/models/test_build.py::test_torchvision_weights_for_other_classes_swap_the_heads",
    "tests/models/test_build.py::test_torchvision_download_failure_says_where_to_get_the_file",
    "tests/models/test_weights.py::test_download_once_then_served_from_cache",
]

STEPS = readme_steps()


def rewritten(step: ReadmeStep) -> str:
    text = step.text
    for rewrite in REWRITES:
        text = re.sub(rewrite.pattern, rewrite.replacement, text, flags=re.MULTILINE)
    return text


Observe = Callable[[Ran], object]
EFFECTS: dict[str, tuple[Observe, object]] = {}  # filled below: command -> (what to look at, what it must be)
PREPARE: dict[str, Callable[[pytest.MonkeyPatch], None]] = {}  # command -> what to set up right before it


# ---- the sandbox and the steps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, module_tiny_dataset: Path) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("readme")
    with pytest.MonkeyPatch.context() as mp:
        _enter(mp, root)
        build_sandbox(root, module_tiny_dataset)
    # Small models at 64 px gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads
    # that wait for each other made a 2-step Mask R-CNN training 20 times slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield root
    torch.set_num_threads(threads)


def _enter(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("DETFORGE_WORKDIR", str(root))  # the README's store: ./.detforge
    mp.setenv("DETFORGE_CACHE", str(root / ".cache"))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.chdir(root)


_failed: list[str] = []


@pytest.mark.parametrize("step", [s for s in STEPS if s.key not in MIRRORED], ids=lambda s: f"L{s.line}")
def test_readme_step(step: ReadmeStep, sandbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert step.key in EFFECTS, f"README line {step.line}: add what `{step.key}` does to EFFECTS"
    if _failed:
        pytest.skip(f"README line {_failed[0]} failed, and the steps after it depend on it")
    if any(name in step.text for name in ("VOC2007", "labelme_folder", "via_region_data")) and not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    _enter(monkeypatch, sandbox)  # after conftest's store-per-test fixture: every step shares the sandbox's
    observe, expected = EFFECTS[step.key]
    try:
        if step.key in PREPARE:
            PREPARE[step.key](monkeypatch)
        ran = _run(step)
        assert observe(ran) == expected, f"{step.key}\n{ran.output}"
    except BaseException:
        _failed.append(f"{step.line} ({step.key})")
        raise


def _run(step: ReadmeStep) -> Ran:
    text = rewritten(step)
    if step.kind == "python":
        namespace: dict[str, Any] = {"SHRINK": SHRINK, "RCNN_SHRINK": RCNN_SHRINK, "__name__": "readme"}
        exec(compile(text, f"README.md:{step.line}", "exec"), namespace)
        return Ran("", namespace)
    # A wide terminal: tables keep each cell on one line (at 80 columns "best-bbox-AP50" wraps inside its cell).
    result = CliRunner().invoke(app, argv(text)[1:], env={"COLUMNS": "240"})
    assert result.exit_code == 0, f"{text}\n{result.output}\n{result.exception!r}"
    return Ran(result.output, {})


# ---- what each command must have done (run in the sandbox, after every earlier step) -------------------------

COCO_NAMES = ["person", "sports ball", "triangle"]
RUN = Path("runs/shapes_maskrcnn")
SYNTH_DIGEST: list[str] = []  # of the sandbox's shapes/annotations.json, taken before the README command redraws it


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _run_config() -> dict[str, Any]:
    return yaml.safe_load((RUN / "config.yaml").read_text())


def _every_image_holds_both(data: dict[str, Any]) -> bool:
    held = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
    return bool(data["images"]) and all((i["id"], c) in held for i in data["images"] for c in (1, 2))


def _slice_start_and_length(ran: Ran) -> tuple[int, int]:
    names = [i["file_name"] for i in ran.json("coco.json")["images"]]
    kept = [names.index(i["file_name"]) for i in ran.json("slice.json")["images"]]
    return (kept[0], len(kept)) if kept == list(range(kept[0], kept[0] + len(kept))) else (-1, -1)


def _evaluated_model(ran: Ran) -> str:
    """The model the evaluation the command recorded is linked to in the lineage."""
    found = re.search(r"evaluation recorded: MLflow run (\w+)", ran.output)
    evaluation = f"evaluation:{found.group(1) if found else '?'}"
    graph = build_lineage("model:shapes-ft")
    return next((s for s, _ in graph.inputs(evaluation) if s.startswith("model:")), f"no model linked to {evaluation}")


def _kill_after_iteration_2(mp: pytest.MonkeyPatch) -> None:
    """Leave the run as a kill between iterations 2 and 4 would (tests/engine/test_resume_kill.py kills for real)."""
    for name in ("model_0000004.pt", "model_final.pt"):
        (RUN / name).unlink()
    (RUN / "last_checkpoint").write_text("model_0000002.pt")


def _offline_coco_weights(mp: pytest.MonkeyPatch) -> None:
    """torchvision's COCO_V1 download replaced by random weights of its shape (DOWNLOAD_TESTS test the download)."""
    from torchvision.models import WeightsEnum

    from detforge.models import MODELS

    torch.manual_seed(0)
    coco = MODELS["maskrcnn_resnet50_fpn_v2"].builder(weights_backbone=None, num_classes=91).state_dict()
    mp.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: coco)


SYNTH = "detforge data synth --out shapes/ --images 200 --seed 0"
RESUME = "detforge train runs/shapes_maskrcnn/config.yaml --resume"
RECIPE_TRAIN = (
    "detforge train configs/shapes_maskrcnn.yaml data.train=dataset:coco-ps-train data.val=dataset:coco-ps-val "
    "model.arch=maskrcnn_resnet50_fpn_v2 model.weights=COCO_V1 tracking.model_name=ps output.dir=runs/ps"
)
PREPARE.update({
    SYNTH: lambda mp: SYNTH_DIGEST.append(_digest("shapes/annotations.json")),
    RESUME: _kill_after_iteration_2,
    RECIPE_TRAIN: _offline_coco_weights,
})  # fmt: skip

EFFECTS.update({
    # Datasets: import
    "detforge data import instances.json --format coco --out data/coco.json": (
        lambda r: (r.count("data/coco.json"), r.names("data/coco.json"),
                   (Path("data") / r.json("data/coco.json")["image_root"] / "shapes_00000.png").is_file()),
        (SHAPES_IMAGES, COCO_NAMES, True)),
    "detforge data import my_yolo_dataset/ --format yolo --out data/yolo.json": (
        lambda r: (r.count("data/yolo.json"), r.names("data/yolo.json"),
                   r.count("data/yolo.json", "annotations") == r.count("data/coco.json", "annotations")),
        (SHAPES_IMAGES, COCO_NAMES, True)),
    "detforge data import VOC2007/ --format voc --out data/voc.json": (
        lambda r: (r.count("data/voc.json") == len(list(Path("VOC2007/Annotations").glob("*.xml"))),
                   r.names("data/voc.json")),
        (True, ["date", "fig", "hazelnut"])),
    "detforge data import annotations.xml --format cvat --out data/cvat.json": (
        lambda r: (r.count("data/cvat.json"), r.count("data/cvat.json", "annotations"), r.names("data/cvat.json")),
        (10, 20, ["person", "sports ball"])),
    "detforge data import labelme_folder/ --format labelme --out data/labelme.json": (
        lambda r: r.count("data/labelme.json") == len(list(Path("labelme_folder").glob("*.json"))), True),
    "detforge data import via_region_data.json --format via --class-name balloon --out data/balloon.json": (
        lambda r: (r.count("data/balloon.json"), r.count("data/balloon.json", "annotations"),
                   r.names("data/balloon.json")),
        (61, 255, ["balloon"])),  # the counts in ../shared/data/balloon/PROVENANCE.md
    # validate, look, export
    "detforge data validate data/coco.json": (lambda r: "No errors" in r.output, True),
    "detforge data stats data/coco.json --plots stats/": (
        lambda r: ("sports ball" in r.output, bool(list(Path("stats").glob("*.png")))), (True, True)),
    "detforge data show data/coco.json --n 8 --out show/": (lambda r: len(list(Path("show").iterdir())), 8),
    "detforge data export data/coco.json --format yolo --out yolo/": (
        lambda r: ("sports ball" in Path("yolo/data.yaml").read_text(), len(list(Path("yolo").glob("labels/*/*.txt")))),
        (True, SHAPES_IMAGES)),
    "detforge data export data/coco.json --format coco --out copy.json": (
        lambda r: r.json("copy.json")["annotations"] == r.json("data/coco.json")["annotations"], True),
    # curate
    'detforge data filter coco.json --categories person "sports ball" --out ps.json': (
        lambda r: [(c["id"], c["name"]) for c in r.json("ps.json")["categories"]], [(1, "person"), (2, "sports ball")]),
    "detforge data balance ps.json --require-all --out ps_both.json": (
        lambda r: _every_image_holds_both(r.json("ps_both.json")), True),
    "detforge data balance coco.json --max-per-class 500 --seed 0 --out capped.json": (  # under the cap: all kept
        lambda r: r.count("capped.json", "annotations") == r.count("coco.json", "annotations"), True),
    "detforge data subset coco.json --fraction 0.1 --after 0.2 --out slice.json": (
        _slice_start_and_length, (3, 2)),  # 16 images: skip int(3.2), keep round(1.6)
    "detforge data split coco.json --fractions 0.8 0.1 0.1 --seed 0 --out splits/": (
        lambda r: sorted(r.count(f"splits/{part}.json") for part in ("train", "val", "test")), [1, 2, 13]),
    "detforge data merge a.json b.json --out merged.json": (
        lambda r: (sorted(r.names("merged.json")), r.count("merged.json")),
        (sorted(["circle", "square", *COCO_NAMES]), 4 + SHAPES_IMAGES)),
    SYNTH: (lambda r: _digest("shapes/annotations.json") == SYNTH_DIGEST[0], True),  # deterministic
    # versions
    "detforge data log coco data/coco.json": (
        lambda r: ("dataset:coco:v1" in r.output, r.version("dataset:coco:v1").num_images), (True, SHAPES_IMAGES)),
    "detforge data log coco data/coco.json --alias gold": (
        lambda r: (len(list_dataset_versions("coco")), r.version("dataset:coco@gold").version), (1, 1)),
    "detforge data log big /mnt/big/coco.json --reference": (lambda r: r.version("dataset:big:v1").reference, True),
    "detforge data versions coco": (lambda r: ("v1" in r.output, "gold" in r.output), (True, True)),
    'detforge data filter dataset:coco --categories person "sports ball" --out ps.json --log coco': (
        lambda r: (r.version("dataset:coco:v2").parents, r.version("dataset:coco:v2").operation["name"],
                   r.version("dataset:coco:v2").classes),
        (("dataset:coco:v1",), "filter", ("person", "sports ball"))),
    "detforge data alias coco v2 prod": (lambda r: r.version("dataset:coco@prod").version, 2),
    "detforge data stats dataset:coco@prod": (
        lambda r: ("sports ball" in r.output, "triangle" in r.output), (True, False)),
    'python: result = import_dataset("VOC2007", "voc")': (
        lambda r: (r.names("train.json"), _every_image_holds_both(r.json("train.json"))), (["date", "fig"], True)),
    # training
    "detforge train configs/shapes_maskrcnn.yaml train.lr=0.01 model.arch=maskrcnn_resnet50_fpn_v2": (
        lambda r: (_run_config()["model"]["arch"], _run_config()["train"]["lr"], r.iteration(RUN / "model_final.pt")),
        ("maskrcnn_resnet50_fpn_v2", 0.01, 4)),
    RESUME: (
        lambda r: ("continuing from model_0000002.pt" in r.output, r.iteration(RUN / "model_final.pt")), (True, 4)),
    "detforge train runs/shapes_maskrcnn/config.yaml train.max_iter=1200 --resume": (
        lambda r: ("(iteration 4)" in r.output, r.iteration(RUN / "model_final.pt")), (True, 6)),
    "detforge eval runs/shapes_maskrcnn/config.yaml model.weights=runs/shapes_maskrcnn/model_best.pt": (
        lambda r: ("segm/AP" in r.output, "segm/AP" in r.json(RUN / "eval" / "metrics.json")["metrics"]), (True, True)),
    'python: result = detforge.train("configs/shapes_maskrcnn.yaml", ["train.max_iter=300"])': (
        lambda r: (type(r.namespace["result"]).__name__, r.namespace["result"].best_checkpoint.is_file(),
                   type(r.namespace["metrics"]).__name__, "segm/AP" in r.namespace["metrics"].metrics),
        ("TrainResult", True, "EvalResult", True)),
    # tracking
    "detforge train configs/shapes_fast.yaml eval.best_metrics='[bbox/AP50]' tracking.model_name=shapes": (
        lambda r: "best-bbox-AP50" in r.model("model:shapes:v1").aliases, True),
    "detforge models versions shapes": (lambda r: ("v1" in r.output, "best-bbox-AP50" in r.output), (True, True)),
    "detforge train configs/shapes_fast.yaml model.weights=model:shapes@best-bbox/AP50 "
    "data.train=dataset:shapes-hard tracking.model_name=shapes-ft output.dir=runs/ft": (
        lambda r: (r.model("model:shapes-ft@latest").parent, r.model("model:shapes-ft@latest").datasets["train"]),
        ("model:shapes:v1", "dataset:shapes-hard:v1")),
    "detforge eval configs/shapes_fast.yaml model.weights=model:shapes-ft@latest": (
        _evaluated_model, "model:shapes-ft:v1"),
    "detforge lineage model:shapes-ft --mermaid lineage.md --png lineage.png": (
        lambda r: ("dataset:shapes-hard:v1" in Path("lineage.md").read_text(), "model:shapes:v1" in r.output,
                   Path("lineage.png").read_bytes()[:4]),
        (True, True, b"\x89PNG")),
    "detforge sync runs/ft": (lambda r: "sent 0 operations; 0 still pending" in r.output, True),
    # inference
    "detforge predict model:shapes@best-bbox-AP50 photos/ street.mp4 --out predictions/ --score-threshold 0.5": (
        lambda r: ("3 images, 4 video frames" in r.output, Path("predictions/street.mp4").is_file(),
                   r.lines("predictions/street.jsonl")),
        (True, True, 4)),
    'detforge predict runs/shapes_fast/model_final.pt "shots/**/*.jpg" --classes circle square --precision bf16': (
        lambda r: sorted(Path(i["file_name"]).suffix for i in r.json("predictions/images.json")["images"]),
        [".jpg"] * 3),
    "detforge show-predictions predictions/results.json --dataset predictions/images.json --out shown/": (
        lambda r: ("3 images drawn" in r.output, len(list(Path("shown").iterdir()))), (True, 3)),
    # recipes
    "detforge data log coco annotations/instances_train.json": (  # the content of data/coco.json: no new version
        lambda r: "dataset:coco:v1" in r.output, True),
    'detforge data filter dataset:coco --categories person "sports ball" --out ps.json --log coco-ps': (
        lambda r: r.version("dataset:coco-ps:v1").classes, ("person", "sports ball")),
    "detforge data balance ps.json --require-all --out both.json --log coco-ps": (
        lambda r: (r.version("dataset:coco-ps:v2").parents, r.version("dataset:coco-ps:v2").operation["name"]),
        (("dataset:coco-ps:v1",), "balance")),
    "detforge data split both.json --fractions 0.8 0.2 --out splits/ --log coco-ps": (
        lambda r: (r.version("dataset:coco-ps-train:v1").parents, r.version("dataset:coco-ps-val:v1").parents,
                   r.version("dataset:coco-ps-train:v1").num_images + r.version("dataset:coco-ps-val:v1").num_images
                   == r.version("dataset:coco-ps:v2").num_images),
        (("dataset:coco-ps:v2",), ("dataset:coco-ps:v2",), True)),
    RECIPE_TRAIN: (
        lambda r: ("COCO_V1" in r.output, r.model("model:ps@best-segm-AP").datasets),
        (True, {"train": "dataset:coco-ps-train:v1", "val": "dataset:coco-ps-val:v1"})),
    "detforge predict model:ps@best-segm-AP photos/ match.mp4 --out predictions/": (
        lambda r: ("model:ps:v1" in r.output, r.lines("predictions/match.jsonl")), (True, 4)),
    "detforge data import cvat_export/annotations.xml --format cvat --out data.json --images cvat_export/images": (
        lambda r: (r.count("data.json"), r.names("data.json")), (10, ["person", "sports ball"])),
    "detforge data split data.json --fractions 0.8 0.2 --out splits/": (
        lambda r: (r.count("splits/train.json"), r.count("splits/val.json")), (8, 2)),
    "detforge train configs/shapes_maskrcnn.yaml data.train=splits/train.json data.val=splits/val.json": (
        lambda r: load_checkpoint(RUN / "model_final.pt")["metadata"]["class_names"], ["person", "sports ball"]),
    "detforge train stage1.yaml tracking.model_name=stage1 eval.best_metrics='[segm/AP]'": (
        lambda r: "best-segm-AP" in r.model("model:stage1:v1").aliases, True),
    "detforge train stage2.yaml model.weights=model:stage1@best-segm/AP data.train=dataset:hard-cases@latest "
    "tracking.model_name=stage2": (
        lambda r: (r.model("model:stage2:v1").parent, r.model("model:stage2:v1").datasets["train"]),
        ("model:stage1:v1", "dataset:hard-cases:v1")),
    "detforge lineage model:stage2 --png lineage.png": (
        lambda r: ("model:stage1:v1" in r.output, "dataset:hard-cases:v1" in r.output,
                   Path("lineage.png").read_bytes()[:4]),
        (True, True, b"\x89PNG")),
})  # fmt: skip


# ---- completeness and mirrors ----------------------------------------------------------------------------------


def test_every_readme_command_is_run_or_mirrored() -> None:
    keys = [s.key for s in STEPS]
    missing = [k for k in keys if k not in EFFECTS and k not in MIRRORED]
    assert not missing, (
        "README commands that no test exercises; add each to EFFECTS in tests/test_readme.py (what to look at after "
        f"it ran, and the value it must have) or, if it cannot run in a test, to MIRRORED with the tests that cover "
        f"it: {missing}"
    )
    stale = sorted((set(EFFECTS) | set(MIRRORED)) - set(keys))
    assert not stale, f"tests/test_readme.py names commands that are no longer in the README: {stale}"
    assert not set(EFFECTS) & set(MIRRORED) and len(set(keys)) == len(keys)


def test_every_rewrite_still_applies() -> None:
    for rewrite in REWRITES:
        assert any(re.search(rewrite.pattern, s.text, re.MULTILINE) for s in STEPS), f"stale rewrite: {rewrite}"


@pytest.mark.parametrize("node", sorted({n for ids in MIRRORED.values() for n in ids} | set(DOWNLOAD_TESTS)))
def test_mirroring_test_exists(node: str) -> None:
    """Read with ast, not imported: some of these modules skip at import time where their tools are missing."""
    path, name = node.split("::")
    tree = ast.parse((REPO / path).read_text())
    assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, f"{node} does not exist"


def test_make_targets_run_the_demo_and_the_suite() -> None:
    done = subprocess.run(["make", "-n", "demo", "test"], cwd=REPO, capture_output=True, text=True, check=True)
    assert ".venv/bin/detforge demo" in done.stdout
    assert "ruff check src tests" in done.stdout and "mypy src" in done.stdout and "-m pytest" in done.stdout
