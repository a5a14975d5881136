"""Exported models (ONNX, TorchScript) predict what the PyTorch model predicts, on real balloon images.

The models have random weights, so these tests need no training and no download. A random MobileNet's
activations shrink about 100x per stage, which gives every RoI the same features and every detection the same
score; the test checkpoints therefore take their BatchNorm statistics from the balloon images themselves. Their
scores then spread over roughly 0.35-0.6 and the comparison covers every detection above 0.05.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import typer
from PIL import Image
from torchvision.ops import box_iou
from typer.testing import CliRunner

from detforge.cli.export import export_cmd
from detforge.cli.main import DetforgeGroup
from detforge.config import Config
from detforge.demo import CPU_RCNN
from detforge.engine.checkpoint import save_checkpoint
from detforge.errors import CheckpointError, ConfigError
from detforge.inference import export as export_module
from detforge.inference.export import ExportMetadata, export_model, read_export_metadata
from detforge.inference.onnx_backend import OnnxPredictor
from detforge.inference.predictor import Detections, Predictor
from detforge.inference.quantize import quantize_onnx
from detforge.inference.run import predict
from detforge.models.build import build_model
from detforge.tracking import registry
from detforge.tracking.lineage import build_lineage
from detforge.tracking.store import Store, open_store

pytestmark = [
    # the test's own torch.jit.load and tiny legacy export, and the scripted model's notice on every call
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.onnx"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:RCNN always returns a \\(Losses, Detections\\) tuple in scripting"),
]

FASTER = "fasterrcnn_mobilenet_v3_large_320_fpn"
MASK = "maskrcnn_mobilenet_v3_large_fpn"
DEMO = "maskrcnn_resnet18_fpn"  # with the demo's options: conv box head, BatchNorm FPN and mask head
MODEL_OPTIONS: dict[str, dict[str, Any]] = {DEMO: CPU_RCNN}
SCORE_THRESHOLD = 0.05
# Few enough for Mask R-CNN's mask pasting to stay quick; the Faster R-CNN keeps all its post-NMS boxes.
DETECTIONS_PER_IMAGE = {FASTER: 100, MASK: 30, DEMO: 30}
IMAGES = {FASTER: 3, MASK: 2, DEMO: 2}  # Mask R-CNN's box head sees 1,000 proposals per image: ~2 s each on one core
# int8 export against the float one on ~512 px balloon images, random weights (measured: 1.7 px, 0.019)
INT8_BOX_PX, INT8_SCORE = 3.0, 0.03


def balloon_images(shared_data: Path, count: int = 3) -> list[Image.Image]:
    """The first validation images, decoded at 1/4 scale (about 512 px; the models resize to 320 anyway)."""
    images = []
    for path in sorted((shared_data / "balloon" / "val").glob("*.jpg"))[:count]:
        image = Image.open(path)
        image.draft("RGB", (image.width // 4, image.height // 4))
        images.append(image.convert("RGB"))
    return images


def random_checkpoint(arch: str, images: list[Image.Image], path: Path) -> Path:
    """A detforge checkpoint of a randomly initialised ``arch`` whose BatchNorm statistics are those of ``images``."""
    torch.manual_seed(0)
    config = Config.model_validate(
        {
            "data": {"train": "balloon.json", "min_size": [320], "max_size": 512},
            "model": {
                "arch": arch,
                "score_threshold": SCORE_THRESHOLD,
                "detections_per_image": DETECTIONS_PER_IMAGE[arch],
                **MODEL_OPTIONS.get(arch, {}),
            },
        }
    )
    model: Any = build_model(config.model, num_classes=1, min_size=[320], max_size=512)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the calibration batch
    model.backbone.train()
    with torch.no_grad():
        batch, _ = model.transform([_tensor(image) for image in images])
        model.backbone(batch.tensors)
    metadata = {
        "config": config.model_dump(mode="json"),
        "class_names": ["balloon"],
        "keypoint_names": [],
        "arch": arch,
    }
    return save_checkpoint({"model": model.eval().state_dict(), "metadata": metadata}, path)


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread (and one ONNX Runtime thread below): on a shared 2-core machine two threads competing
    with another busy process made the eager model 5-20x slower (0.25 s -> 1.3-5.6 s per image)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, list[Image.Image]], Path]:
    """``get(arch, images)``: the random checkpoint of ``arch``, made once per module."""
    made: dict[str, Path] = {}
    folder = tmp_path_factory.mktemp("checkpoints")

    def get(arch: str, images: list[Image.Image]) -> Path:
        if arch not in made:
            made[arch] = random_checkpoint(arch, images, folder / f"{arch}.pt")
        return made[arch]

    return get


def match(a: Detections, b: Detections) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of the same detection in ``a`` and ``b`` (IoU > 0.9), greedily by ``a``'s score."""
    if not len(a) or not len(b):
        return []
    iou = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).numpy()
    pairs: list[tuple[int, int]] = []
    for i in np.argsort(-a.scores, kind="stable"):
        j = int(np.argmax(iou[i]))
        if iou[i, j] > 0.9:
            pairs.append((int(i), j))
            iou[:, j] = -1
    return pairs


def assert_same_detections(eager: Detections, other: Detections) -> None:
    """Matched boxes within 0.1 px, same labels, scores within 1e-3, masks differing on < 0.1 % of pixels.

    A difference of 1e-5 in a score or a coordinate flips the NMS decision between two boxes whose IoU is
    at the threshold (random weights make many such near-duplicates): each output may then keep a box the
    other dropped. Such unmatched boxes must be rare and overlap a box of the other output.
    """
    pairs = match(eager, other)
    assert pairs, "no detection in common"
    i, j = (np.array(index) for index in zip(*pairs, strict=True))
    np.testing.assert_allclose(other.boxes[j], eager.boxes[i], atol=0.1, rtol=0)
    np.testing.assert_array_equal(other.labels[j], eager.labels[i])
    np.testing.assert_allclose(other.scores[j], eager.scores[i], atol=1e-3, rtol=0)
    if eager.masks is not None:
        assert other.masks is not None and other.masks.shape[1:] == eager.masks.shape[1:]
        differing = (other.masks[j] != eager.masks[i]).mean(axis=(1, 2))
        assert differing.max() < 1e-3
    for found, side, index in ((eager, other, i), (other, eager, j)):
        unmatched = np.setdiff1d(np.arange(len(found)), index)
        assert len(unmatched) <= 0.05 * len(found), f"{len(unmatched)} of {len(found)} detections unmatched"
        if len(unmatched):
            iou = box_iou(torch.from_numpy(found.boxes[unmatched]), torch.from_numpy(side.boxes)).numpy()
            assert (iou.max(axis=1) > 0.5).all()


@pytest.mark.parametrize("arch", [FASTER, MASK, DEMO])
def test_onnx_runtime_predicts_what_pytorch_predicts(
    arch: str,
    shared_data: Path,
    checkpoints: Callable[[str, list[Image.Image]], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = balloon_images(shared_data, IMAGES[arch])
    checkpoint = checkpoints(arch, images)
    entered = []
    patch = export_module._box_decoding_for_any_count

    def spy(model: torch.nn.Module) -> Any:
        entered.append(True)
        return patch(model)

    monkeypatch.setattr(export_module, "_box_decoding_for_any_count", spy)
    exported = export_model(checkpoint, tmp_path / "model.onnx")
    assert entered, "the export traced torchvision's own box decoding (see the test below)"
    assert not [p for p in tmp_path.iterdir() if p.name != "model.onnx"], "the temporary file was renamed"

    eager = Predictor.load(checkpoint, score_threshold=SCORE_THRESHOLD, precision="fp32")
    onnx_predictor = OnnxPredictor.load(exported, score_threshold=SCORE_THRESHOLD, threads=1)
    assert onnx_predictor.class_names == ["balloon"] and arch in onnx_predictor.describe()
    sizes = {image.size for image in images}
    assert len(sizes) == len(images), "the images differ in size: the graph's height and width are dynamic"
    for image, found in zip(images, onnx_predictor.predict(images), strict=True):
        (expected,) = eager.predict([image])  # one at a time: in a batch, padding to a common size moves boxes
        assert len(expected) > 10
        assert (found.masks is None) == (arch == FASTER)
        if found.masks is not None:
            assert found.masks.shape[1:] == (image.height, image.width) and found.masks.dtype == bool
        assert_same_detections(expected, found)


def test_torchscript_export_round_trips_with_its_class_names(
    shared_data: Path, checkpoints: Callable[[str, list[Image.Image]], Path], tmp_path: Path
) -> None:
    images = balloon_images(shared_data, count=2)
    checkpoint = checkpoints(FASTER, images)
    exported = export_model(checkpoint, tmp_path / "model.pt", format="torchscript")

    extra = {"detforge.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["detforge.json"])["class_names"] == ["balloon"]
    assert read_export_metadata(exported).arch == FASTER
    eager = Predictor.load(checkpoint, precision="fp32").model
    tensors = [_tensor(image) for image in images]
    with torch.inference_mode():
        _, found = scripted(tensors)
        expected = eager(tensors)
    for a, b in zip(expected, found, strict=True):
        assert a.keys() == b.keys() and len(a["scores"]) > 10
        for key in a:
            torch.testing.assert_close(b[key], a[key])


def test_exporting_a_registered_model_registers_a_linked_version(
    shared_data: Path, checkpoints: Callable[[str, list[Image.Image]], Path], tmp_path: Path
) -> None:
    store = open_store()  # the per-test store of conftest's DETFORGE_WORKDIR, also the CLI's
    images = balloon_images(shared_data, count=1)
    source = _register_checkpoint(checkpoints(FASTER, images), "balloon", store)
    app = typer.Typer(cls=DetforgeGroup)
    app.command("export")(export_cmd)
    app.command("unused")(lambda: None)  # two commands: `export` stays a subcommand, as in `detforge export`

    out = tmp_path / "balloon.onnx"
    result = CliRunner().invoke(app, ["export", "model:balloon", "--out", str(out), "--score-threshold", "0.1"])
    assert result.exit_code == 0, result.output
    assert "Registered model:balloon-onnx:v1 (exported from model:balloon:v1)" in result.output

    version = registry.get_model_version("model:balloon-onnx:v1", store=store)
    assert version.tags["detforge.source_model"] == source == "model:balloon:v1"
    assert version.tags["detforge.format"] == "onnx"
    graph = build_lineage("model:balloon-onnx:v1", store=store)
    assert ("model:balloon:v1", "model:balloon-onnx:v1", "exported (onnx)") in graph.edges
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    metadata = ExportMetadata.from_props(props, where=str(out))
    assert (metadata.class_names, metadata.arch, metadata.source) == (["balloon"], FASTER, "model:balloon:v1")
    assert metadata.score_threshold == 0.1
    from_registry = OnnxPredictor.load("model:balloon-onnx:v1", score_threshold=0.1, threads=1)
    assert from_registry.class_names == ["balloon"]
    assert all((d.scores >= 0.1).all() for d in from_registry.predict(images))
    # predict's default backend (auto) runs a registered ONNX export in ONNX Runtime, whatever the job's size
    first_image = sorted((shared_data / "balloon" / "val").glob("*.jpg"))[0]
    summary = predict("model:balloon-onnx", [first_image], tmp_path / "predicted", score_threshold=0.1)
    assert "ONNX Runtime" in summary.model and "auto: the model is an ONNX export" in summary.model
    assert summary.images == 1 and not summary.skipped

    quantized = CliRunner().invoke(
        app, ["export", "model:balloon", "--out", str(tmp_path / "q.onnx"), "--quantize", "int8"]
    )
    assert quantized.exit_code == 0, quantized.output
    assert "(onnx, int8," in quantized.output and "Registered model:balloon-onnx-int8:v1" in quantized.output
    tags = registry.get_model_version("model:balloon-onnx-int8:v1", store=store).tags
    assert (tags["detforge.format"], tags["detforge.quantize"]) == ("onnx", "int8")
    assert read_export_metadata(tmp_path / "q.onnx").quantize == "int8"

    missing = CliRunner().invoke(app, ["export", "model:nothing", "--out", str(tmp_path / "x.onnx")])
    assert missing.exit_code == 2
    assert "TrackingError: 'model:nothing': no registered model 'nothing'" in missing.output
    assert "(models: balloon, balloon-onnx, balloon-onnx-int8)" in missing.output


def _register_checkpoint(path: Path, name: str, store: Store) -> str:
    client = store.client()
    run_id = client.create_run(store.experiment_id("detforge-test")).info.run_id
    client.log_artifact(run_id, str(path), "checkpoints")
    number = registry.register_model_version(
        client, name=name, run_id=run_id, artifact_path=f"checkpoints/{path.name}", key=f"{run_id}:final", tags={}
    )
    return f"model:{name}:v{number}"


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable PyTorch checkpoint"):
        export_model(garbage, tmp_path / "x.onnx")
    with pytest.raises(CheckpointError, match="weights file not found"):
        export_model(tmp_path / "missing.pt", tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="expected one of onnx, torchscript, found 'tflite'"):
        export_model(garbage, tmp_path / "x.tflite", format="tflite")
    with pytest.raises(ConfigError, match="quantize: expected one of int8, int8-static, found 'int4'"):
        export_model(garbage, tmp_path / "x.onnx", quantize="int4")
    with pytest.raises(ConfigError, match="only ONNX exports are quantized"):
        export_model(garbage, tmp_path / "x.pt", format="torchscript", quantize="int8")
    assert not (tmp_path / "x.onnx").exists()

    with pytest.raises(CheckpointError, match="ONNX model not found"):
        OnnxPredictor.load(tmp_path / "missing.onnx")
    with pytest.raises(CheckpointError, match="not an ONNX model ONNX Runtime can load"):
        OnnxPredictor.load(garbage)
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="a PyTorch checkpoint, not an ONNX model. Export it first"):
        OnnxPredictor.load(tmp_path / "checkpoint.pt")
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.ReLU(), (torch.zeros(3, 4, 4),), str(foreign), dynamo=False, input_names=["image"])
    with pytest.raises(CheckpointError, match="no detforge metadata"):
        OnnxPredictor.load(foreign)


def test_box_decoding_traced_on_no_boxes_holds_for_any_count() -> None:
    """A trained model finds nothing on the noise trace image; the exported graph must still decode real boxes."""
    from torchvision.models.detection._utils import BoxCoder

    from detforge.inference.export import _box_decoding_for_any_count

    coder, other = BoxCoder((10.0, 10.0, 5.0, 5.0)), BoxCoder((10.0, 10.0, 5.0, 5.0))
    model = torch.nn.Sequential(torch.nn.Module())
    model[0].box_coder = coder  # where R-CNN heads keep theirs: an attribute of a submodule
    model.append(torch.nn.Module())
    model[1].box_coder = coder  # one coder held twice is patched once and restored once

    def decode(codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return coder.decode(codes, [boxes])

    empty = (torch.zeros(0, 16), torch.zeros(0, 4))
    boxes = torch.rand(5, 4) * 10 + torch.tensor([0.0, 0.0, 10.0, 10.0])
    codes = torch.randn(5, 16)
    frozen = torch.jit.trace(decode, empty, check_trace=False)
    assert frozen(codes, boxes).shape == (5, 16)  # torchvision's decode: the empty case is frozen into the graph
    with _box_decoding_for_any_count(model):
        traced = torch.jit.trace(decode, empty, check_trace=False)
        assert "decode" not in vars(other)  # another model's coder keeps torchvision's decode meanwhile
        assert "box_sum" in BoxCoder.decode.__code__.co_varnames  # the class itself is never touched
    assert "decode" not in vars(coder)  # torchvision's decode again
    torch.testing.assert_close(traced(codes, boxes), coder.decode(codes, [boxes]))
    assert traced(*empty).shape == (0, 4, 4)


def _feature_maps(sizes: list[int], channels: int = 4, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {str(k): torch.randn(batch, channels, s, s, generator=generator) for k, s in enumerate(sizes)}


def _boxes(count: int, image: int, seed: int = 1) -> torch.Tensor:
    """``count`` boxes of every size from 2 px to most of the image: FPN's rule sends them to every level."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=generator) * image / 8
    side = torch.exp(torch.empty(count, 1).uniform_(math.log(2), math.log(0.85 * image), generator=generator))
    aspect = torch.empty(count, 2).uniform_(0.7, 1.3, generator=generator)
    return torch.cat([xy, xy + side * aspect], dim=1)


@pytest.mark.parametrize(
    ("sizes", "image", "levels"),
    # ResNet-FPN; MobileNetV3-FPN; mixed; a skipped level (torchvision leaves its RoIs zero: it falls back to that)
    [([256, 128, 64, 32], 1024, 4), ([8, 8], 256, 1), ([64, 32, 32], 1024, 2), ([256, 64], 1024, 3)],
)
def test_pooling_by_gather_gives_torchvision_values(sizes: list[int], image: int, levels: int) -> None:
    """The poolers the ONNX export runs: torchvision's values in RoI order, whatever level each RoI maps to."""
    from torchvision.ops import MultiScaleRoIAlign

    from detforge.models.roi_align import pool_by_gather

    maps = _feature_maps(sizes)
    pooler = MultiScaleRoIAlign(list(maps), 7, 2)
    shapes = [(image, image)] * 2
    for counts in ((60, 60), (0, 0), (0, 45), (30, 0)):  # the image index column, with an image without RoIs
        boxes = [_boxes(count, image, seed) for count, seed in zip(counts, (1, 2), strict=True)]
        expected = pooler(maps, boxes, shapes)
        torch.testing.assert_close(pool_by_gather(pooler, maps, boxes, shapes), expected, rtol=0, atol=0)
    used = pooler.map_levels([_boxes(60, image)]).unique()
    assert len(used) == levels  # the boxes reach every level the pooler maps to


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # torchvision's scale set-up, traced once
def test_pooling_by_gather_exports_to_onnx_runtime(tmp_path: Path) -> None:
    """Exported with a dynamic number of boxes, the pooler's gather puts each level's results back in order."""
    from torchvision.ops import MultiScaleRoIAlign

    from detforge.inference.export import _pooling_by_gather

    maps = _feature_maps([256, 128, 64, 32], batch=1)
    names = list(maps)
    pooler = MultiScaleRoIAlign(names, 7, 2)

    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pooler = pooler

        def forward(self, boxes: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
            return self.pooler(dict(zip(names, features, strict=True)), [boxes], [(1024, 1024)])

    module, path = Pool(), tmp_path / "pool.onnx"
    inputs = [f"level{name}" for name in names]  # ONNX input names cannot be bare numbers
    with _pooling_by_gather(module):
        torch.onnx.export(
            module, (_boxes(30, 1024), *maps.values()), str(path), dynamo=False, opset_version=17,
            input_names=["boxes", *inputs], dynamic_axes={"boxes": {0: "count"}},
        )  # fmt: skip
    assert "forward" not in vars(pooler), "torchvision's forward is back"
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "ScatterElements" not in ops
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: values.numpy() for name, values in zip(inputs, maps.values(), strict=True)}
    for boxes in (_boxes(80, 1024, seed=3), _boxes(3, 1024, seed=4)):
        (found,) = session.run(None, {"boxes": boxes.numpy(), **feeds})
        expected = module(boxes, *maps.values())
        np.testing.assert_allclose(found, expected.numpy(), atol=1e-5, rtol=0)


def test_int8_export_predicts_what_the_float_export_predicts(
    shared_data: Path, checkpoints: Callable[[str, list[Image.Image]], Path], tmp_path: Path
) -> None:
    images = balloon_images(shared_data, IMAGES[FASTER])
    checkpoint = checkpoints(FASTER, images)
    plain = export_model(checkpoint, tmp_path / "model.onnx")
    quantized = export_model(checkpoint, tmp_path / "model.int8.onnx", quantize="int8")
    assert read_export_metadata(quantized).quantize == "int8" and read_export_metadata(plain).quantize == ""
    ops = {node.op_type for node in onnx.load(str(quantized)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops, ops  # the box head's layers run in int8
    assert "ScatterElements" not in {node.op_type for node in onnx.load(str(plain)).graph.node}  # pool_by_gather
    assert quantized.stat().st_size < 0.6 * plain.stat().st_size  # its weights are most of the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.onnx"]

    reference = OnnxPredictor.load(plain, score_threshold=SCORE_THRESHOLD, threads=1)
    int8 = OnnxPredictor.load(quantized, score_threshold=SCORE_THRESHOLD, threads=1)
    assert "int8" in int8.describe() and int8.class_names == ["balloon"]
    for expected, found in zip(reference.predict(images), int8.predict(images), strict=True):
        pairs = match(expected, found)
        assert len(pairs) >= 0.8 * max(len(expected), len(found)), (len(pairs), len(expected), len(found))
        i, j = (np.array(index) for index in zip(*pairs, strict=True))
        np.testing.assert_allclose(found.boxes[j], expected.boxes[i], atol=INT8_BOX_PX, rtol=0)
        np.testing.assert_allclose(found.scores[j], expected.scores[i], atol=INT8_SCORE, rtol=0)
        np.testing.assert_array_equal(found.labels[j], expected.labels[i])


def test_static_int8_export_calibrates_on_the_readable_images_and_quantizes_every_convolution(
    shared_data: Path,
    checkpoints: Callable[[str, list[Image.Image]], Path],
    tmp_path: Path,
) -> None:
    images = balloon_images(shared_data, IMAGES[FASTER])
    checkpoint = checkpoints(FASTER, images)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for path in sorted((shared_data / "balloon" / "train").glob("*.jpg"))[:4]:  # not the images predicted below
        with Image.open(path) as image:
            image.reduce(4).convert("RGB").save(calibration / path.name)
    (calibration / "zz_truncated.jpg").write_bytes((calibration / path.name).read_bytes()[:300])
    plain = export_model(checkpoint, tmp_path / "model.onnx")
    with pytest.warns(UserWarning, match=r"calibration: skipped 1 input\(s\): .*zz_truncated.jpg"):
        quantized = export_model(
            checkpoint, tmp_path / "model.static.onnx", quantize="int8-static", calibration=calibration,
            calibration_count=5,
        )  # fmt: skip
    assert read_export_metadata(quantized).quantize == "int8-static"
    graph = onnx.load(str(quantized)).graph
    made_by = {output: node.op_type for node in graph.node for output in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    # every convolution's input and weights come dequantized from int8 (ONNX Runtime fuses them into QLinearConv)
    dequantized = [made_by.get(node.input[0]) == made_by.get(node.input[1]) == "DequantizeLinear" for node in convs]
    assert convs and all(dequantized), f"{dequantized.count(False)} of {len(convs)} convolutions run in float"
    assert quantized.stat().st_size < 0.4 * plain.stat().st_size

    static = OnnxPredictor.load(quantized, score_threshold=SCORE_THRESHOLD, threads=1)
    assert "int8-static" in static.describe() and static.class_names == ["balloon"]
    # Random weights crowd the scores, so whole detections say little about int8 error here (the README has the AP
    # of trained models); the next test checks the calibrated values themselves.
    assert all(len(found) > 0 for found in static.predict(images))


def _tiny_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)).eval()
    torch.onnx.export(net, (torch.rand(3, 32, 32),), str(path), dynamo=False, input_names=["image"],
                      dynamic_axes={"image": {1: "h", 2: "w"}})  # fmt: skip
    return path


def test_static_quantization_takes_its_ranges_from_the_calibration_images(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((shared_data / "balloon" / "train").glob("*.jpg"))[:3]:
        with Image.open(path) as image:
            image.reduce(8).convert("RGB").save(folder / f"{path.stem}.png")
            Image.eval(image.reduce(8).convert("RGB"), lambda v: v // 10).save(tmp_path / f"dark_{path.stem}.png")
    plain = _tiny_onnx(tmp_path / "tiny.onnx")
    calibrated = quantize_onnx(plain, tmp_path / "good.onnx", "int8-static", sorted(folder.iterdir()))
    mismatched = quantize_onnx(plain, tmp_path / "dark.onnx", "int8-static", sorted(tmp_path.glob("dark_*.png")))
    (probe,) = balloon_images(shared_data, count=1)  # a validation image: not one of the calibration images
    feed = {"image": _tensor(probe).numpy()}
    (expected,) = onnxruntime.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, feed)

    def error(model: Path) -> float:
        (found,) = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feed)
        return float(np.abs(found - expected).max() / np.abs(expected).max())

    good, dark = error(calibrated), error(mismatched)
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []  # as in a plain script, where pytest's handlers are not there
    try:
        quantize_onnx(plain, tmp_path / "dynamic.onnx", "int8")
        assert root.handlers == []  # ONNX Runtime's logging.warning() did not install a stderr handler for good
    finally:
        root.handlers = handlers
    assert good < 0.05, good  # measured: 0.017 of the largest output
    assert dark > 3 * good, (good, dark)  # ranges from images 10x darker clip this one's activations (0.93)


def test_static_int8_needs_calibration_images_and_only_it_takes_them(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="int8-static: calibration images are needed"):
        export_model(garbage, tmp_path / "x.onnx", quantize="int8-static")
    only_static = "only --quantize int8-static is calibrated; this export is int8 and was given calibration images"
    with pytest.raises(ConfigError, match=only_static):
        export_model(garbage, tmp_path / "x.onnx", quantize="int8", calibration=[tmp_path])
    with pytest.raises(ConfigError, match="this export is not quantized and was given calibration images"):
        export_model(garbage, tmp_path / "x.onnx", calibration=[tmp_path])
    count_given = r"int8 and was given a calibration count \(8; --calibration-images / calibration_count\)"
    with pytest.raises(ConfigError, match=count_given):
        export_model(garbage, tmp_path / "x.onnx", quantize="int8", calibration_count=8)
    with pytest.raises(ConfigError, match="nothing.*no such file or folder"):
        export_model(garbage, tmp_path / "x.onnx", quantize="int8-static", calibration=[tmp_path / "nothing"])
    # Checked before the checkpoint is even read: a video and an unreadable image, counted and named, and nothing left.
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    inputs = [tmp_path / "clip.mp4", tmp_path / "broken.png"]
    with (
        pytest.warns(UserWarning, match=r"skipped 2 input\(s\): .*broken.png.*; .*clip.mp4: a video"),
        pytest.raises(ConfigError, match=r"calibration: no readable image in .*clip.mp4, .*broken.png"),
    ):
        export_model(garbage, tmp_path / "x.onnx", quantize="int8-static", calibration=inputs)
    with pytest.raises(ConfigError, match="int8-static: calibration images are needed"):
        quantize_onnx(tmp_path / "x.onnx", tmp_path / "y.onnx", "int8-static", [])
    from detforge.cli.main import app

    result = CliRunner().invoke(
        app, ["export", str(garbage), "--out", str(tmp_path / "x.onnx"), "--quantize", "int8-static"]
    )
    output = " ".join(result.output.split())
    assert result.exit_code != 0 and "calibration images are needed (--calibration DIR)" in output
    args = ["export", str(garbage), "--out", str(tmp_path / "x.onnx"), "--quantize", "int8"]
    args += ["--calibration-images", "4"]
    result = CliRunner().invoke(app, args)
    output = " ".join(result.output.split())
    assert result.exit_code != 0 and "was given a calibration count (4; --calibration-images" in output
    assert not (tmp_path / "x.onnx").exists()
