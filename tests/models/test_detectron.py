"""Detectron/Detectron2 checkpoints: safe unpickling, renaming onto torchvision's R-CNN, zoo paths, conversion."""

from __future__ import annotations

import builtins
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
from typer.testing import CliRunner

from detforge.errors import CheckpointError
from detforge.models import detectron
from detforge.models.detectron import (
    coco_class_names,
    convert_detectron_state_dict,
    fold_input_normalisation,
    is_detectron_file,
    load_detectron_state_dict,
    read_detectron_file,
)
from detforge.models.restricted_pickle import load_restricted_pickle
from detforge.models.weights import fit_state_dict, resolve_weights
from helpers import FileServer

# ---- Detectron2 / Caffe2 state dicts of the real shapes, named by rules written independently of the module ----

_TV_TO_D2 = [
    (r"backbone\.body\.conv1\.weight", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (r"backbone\.body\.bn1\.(\w+)", lambda m: f"backbone.bottom_up.stem.conv1.norm.{m[1]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"{_res(m)}.conv{m[3]}.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)", lambda m: f"{_res(m)}.conv{m[3]}.norm.{m[4]}"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight", lambda m: f"{_res(m)}.shortcut.weight"),
    (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)", lambda m: f"{_res(m)}.shortcut.norm.{m[3]}"),
    (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
    (r"rpn\.head\.conv\.0\.0\.(\w+)", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
    (r"rpn\.head\.cls_logits\.(\w+)", lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
    (r"rpn\.head\.bbox_pred\.(\w+)", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{m[1]}"),
    (r"roi_heads\.box_head\.fc6\.(\w+)", lambda m: f"roi_heads.box_head.fc1.{m[1]}"),
    (r"roi_heads\.box_head\.fc7\.(\w+)", lambda m: f"roi_heads.box_head.fc2.{m[1]}"),
    (r"roi_heads\.box_predictor\.(\w+)\.(\w+)", lambda m: m[0]),
    (r"roi_heads\.mask_head\.(\d)\.0\.(\w+)", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}"),
    (r"roi_heads\.mask_predictor\.conv5_mask\.(\w+)", lambda m: f"roi_heads.mask_head.deconv.{m[1]}"),
    (r"roi_heads\.mask_predictor\.mask_fcn_logits\.(\w+)", lambda m: f"roi_heads.mask_head.predictor.{m[1]}"),
]


def _res(m: re.Match[str]) -> str:
    return f"backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}"


def _tv_to_d2(name: str) -> str:
    for pattern, template in _TV_TO_D2:
        match = re.fullmatch(pattern, name)
        if match:
            return template(match)
    raise AssertionError(f"no Detectron2 name for {name}")


def _tv_to_caffe2(name: str) -> str | None:
    """Detectron (v1) blob names of a torchvision name; None for running stats (Caffe2 BN is affine only)."""
    suffix = {"weight": "w", "bias": "b"}
    bn = {"weight": "bn_s", "bias": "bn_b"}
    if name.endswith(("running_mean", "running_var")):
        return None
    rules = [
        (r"backbone\.body\.conv1\.weight", lambda m: "conv1_w"),
        (r"backbone\.body\.bn1\.(\w+)", lambda m: f"res_conv1_{bn[m[1]]}"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"{_c2(m)}_branch2{'abc'[int(m[3]) - 1]}_w"),
        (
            r"backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
            lambda m: f"{_c2(m)}_branch2{'abc'[int(m[3]) - 1]}_{bn[m[4]]}",
        ),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.weight", lambda m: f"{_c2(m)}_branch1_w"),
        (r"backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)", lambda m: f"{_c2(m)}_branch1_{bn[m[3]]}"),
        (r"backbone\.fpn\.inner_blocks\.3\.0\.(\w+)", lambda m: f"fpn_inner_res5_2_sum_{suffix[m[1]]}"),
        (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.(\w+)", lambda m: f"fpn_inner_{_last(m)}_sum_lateral_{suffix[m[2]]}"),
        (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.(\w+)", lambda m: f"fpn_{_last(m)}_sum_{suffix[m[2]]}"),
        (r"rpn\.head\.conv\.0\.0\.(\w+)", lambda m: f"conv_rpn_fpn2_{suffix[m[1]]}"),
        (r"rpn\.head\.cls_logits\.(\w+)", lambda m: f"rpn_cls_logits_fpn2_{suffix[m[1]]}"),
        (r"rpn\.head\.bbox_pred\.(\w+)", lambda m: f"rpn_bbox_pred_fpn2_{suffix[m[1]]}"),
        (r"roi_heads\.box_head\.(fc6|fc7)\.(\w+)", lambda m: f"{m[1]}_{suffix[m[2]]}"),
        (r"roi_heads\.box_predictor\.(\w+)\.(\w+)", lambda m: f"{m[1]}_{suffix[m[2]]}"),
        (r"roi_heads\.mask_head\.(\d)\.0\.(\w+)", lambda m: f"_[mask]_fcn{int(m[1]) + 1}_{suffix[m[2]]}"),
        (r"roi_heads\.mask_predictor\.(conv5_mask|mask_fcn_logits)\.(\w+)", lambda m: f"{m[1]}_{suffix[m[2]]}"),
    ]
    for pattern, template in rules:
        match = re.fullmatch(pattern, name)
        if match:
            return template(match)
    raise AssertionError(f"no Caffe2 name for {name}")


def _c2(m: re.Match[str]) -> str:
    return f"res{int(m[1]) + 1}_{m[2]}"


def _abc(conv: str) -> str:
    return "abc"[int(conv) - 1]


def _last(m: re.Match[str]) -> str:
    return {0: "res2_2", 1: "res3_3", 2: "res4_5", 3: "res5_2"}[int(m[1])]  # the last block of each R-50 stage


def _model_keys(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def mask_model() -> torch.nn.Module:
    return maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)


@pytest.fixture(scope="module")
def d2_state(mask_model: torch.nn.Module) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return _detectron2_state(mask_model)


def _detectron2_state(model: torch.nn.Module, *, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Random Detectron2-named arrays of the shapes Detectron2 uses for ``model`` (80 classes: its predictors have
    81 scores with background last, 320 box rows and 80 mask channels), and the torchvision name of each."""
    rng = np.random.default_rng(seed)
    arrays, target_of = {}, {}
    for key, shape in _model_keys(model).items():
        name = _tv_to_d2(key)
        rows = {"bbox_pred": shape[0] - 4, "predictor": shape[0] - 1}.get(name.split(".")[-2], shape[0])
        arrays[name] = rng.standard_normal((rows, *shape[1:]) if shape else ()).astype(np.float32)
        target_of[name] = key
    return arrays, target_of


def _write_pickle(path: Path, obj: object, protocol: int = 4) -> Path:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


# ---- 1. the restricted unpickler ----------------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


class _RunsPython:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return builtins.exec, (self.code,)


@pytest.mark.parametrize("kind", ["os.system", "exec"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload = _RunsCommand(f"touch {marker}") if kind == "os.system" else _RunsPython(f"open({str(marker)!r}, 'w')")
    weights = {"conv1_w": np.zeros((2, 3), np.float32), "evil": payload}
    path = _write_pickle(tmp_path / "model_final.pkl", {"model": weights, "__author__": "someone"})
    expected = "posix.system" if kind == "os.system" else "builtins.exec"
    with pytest.raises(CheckpointError, match=rf"model_final\.pkl: refused to load: .*'{re.escape(expected)}'"):
        load_detectron_state_dict(path)
    assert not marker.exists()


def test_numpy_arrays_load_from_every_protocol_and_numpy_1_names(tmp_path: Path) -> None:
    arrays = OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.array([1, 2], dtype=np.int64))
    obj = {"model": arrays, "iteration": np.int64(90000), "__author__": "Detectron2 Model Zoo", "tags": ("x", 1.5)}
    files = {f"p{protocol}.pkl": pickle.dumps(obj, protocol=protocol) for protocol in (2, 3, 4, 5)}
    # numpy 1.x wrote numpy.core.* (text GLOBAL opcodes below protocol 4, so the names can be edited in place)
    files |= {f"numpy1-{name}": data.replace(b"numpy._core", b"numpy.core") for name, data in list(files.items())[:2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        loaded = load_restricted_pickle(tmp_path / name)
        assert loaded["model"]["a"].tolist() == arrays["a"].tolist() and loaded["model"]["b"].tolist() == [1, 2]
        assert loaded["iteration"] == 90000 and loaded["tags"] == ("x", 1.5)
    assert b"numpy.core.multiarray" in files["numpy1-p2.pkl"]


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = _write_pickle(tmp_path / "objects.pkl", {"a": np.array([1, "x"], dtype=object)})
    with pytest.raises(CheckpointError, match=r"objects\.pkl: refused to load: it holds an array of dtype"):
        load_restricted_pickle(path)


def test_truncated_pickle_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)})[:50])
    with pytest.raises(CheckpointError, match=r"cut\.pkl: not a readable pickle"):
        load_restricted_pickle(path)


# ---- 2. names and class layout ------------------------------------------------------------------------------------


def test_detectron2_zoo_pkl_lands_on_every_parameter(
    tmp_path: Path, mask_model: torch.nn.Module, d2_state: tuple[dict[str, np.ndarray], dict[str, str]]
) -> None:
    arrays, target_of = d2_state
    extras = {"pixel_mean": np.array([103.53, 116.28, 123.675]).reshape(3, 1, 1), "pixel_std": np.ones((3, 1, 1))}
    zoo = {"model": {**arrays, **extras}, "__author__": "Detectron2 Model Zoo", "matching_heuristics": False}
    path = _write_pickle(tmp_path / "model_final_f10217.pkl", zoo)

    state, report = convert_detectron_state_dict(read_detectron_file(path), source=str(path), fold_input=False)

    inputs = {"transform.pixel_mean", "transform.pixel_std", "transform.channel_order"}  # for the variant
    assert set(state) == set(_model_keys(mask_model)) | inputs  # no leftovers on either side
    assert report.ignored == []  # pixel_mean/pixel_std went to the transform's buffers
    mapped = {src: dst for src, dst, _ in report.mapped}
    assert {s: d for s, d in mapped.items() if d not in inputs} == target_of
    assert (mapped["pixel_mean"], mapped["pixel_std"]) == ("transform.pixel_mean", "transform.pixel_std")
    assert state["transform.pixel_mean"].tolist() == pytest.approx([103.53, 116.28, 123.675])
    assert state["transform.channel_order"].tolist() == [2, 1, 0]  # BGR: conv1 channel 0 reads blue
    assert report.num_outputs == 81
    for name, array in arrays.items():
        expected = torch.from_numpy(array)
        if name.endswith(("cls_score.weight", "cls_score.bias")):  # background: last -> first
            expected = torch.cat([expected[80:], expected[:80]])
        elif ".bbox_pred." in name:
            expected = torch.cat([torch.zeros_like(expected[:4]), expected])
        elif "mask_head.predictor" in name:
            expected = torch.cat([torch.zeros_like(expected[:1]), expected])
        assert torch.equal(state[target_of[name]], expected), name
    weights_only = {k: v for k, v in state.items() if k not in inputs}
    fit = fit_state_dict(mask_model, weights_only, source="converted")  # torchvision's arch: everything else fits
    assert not (fit.missing or fit.reinitialised or fit.unexpected)
    with pytest.raises(CheckpointError, match="converted: its conv1 takes Detectron2's input"):
        fit_state_dict(mask_model, state, source="converted")  # unfolded: torchvision's input would be wrong


def test_class_layout_keeps_the_scores_of_each_class(d2_state: tuple[dict[str, np.ndarray], dict[str, str]]) -> None:
    arrays = d2_state[0]
    state, _ = convert_detectron_state_dict(arrays, source="d2", fold_input=False)
    features = torch.randn(5, 1024)
    d2_logits = features @ torch.from_numpy(arrays["roi_heads.box_predictor.cls_score.weight"]).T
    d2_logits += torch.from_numpy(arrays["roi_heads.box_predictor.cls_score.bias"])
    tv_logits = features @ state["roi_heads.box_predictor.cls_score.weight"].T
    tv_logits += state["roi_heads.box_predictor.cls_score.bias"]
    torch.testing.assert_close(tv_logits[:, 0], d2_logits[:, 80])  # background
    torch.testing.assert_close(tv_logits[:, 1:], d2_logits[:, :80])  # class k is label k + 1
    d2_deltas = features @ torch.from_numpy(arrays["roi_heads.box_predictor.bbox_pred.weight"]).T
    tv_deltas = features @ state["roi_heads.box_predictor.bbox_pred.weight"].T
    torch.testing.assert_close(tv_deltas[:, 4:], d2_deltas)


def test_class_agnostic_predictors_are_repeated_for_every_class(
    d2_state: tuple[dict[str, np.ndarray], dict[str, str]],
) -> None:
    arrays = dict(d2_state[0])
    arrays["roi_heads.box_predictor.bbox_pred.weight"] = arrays["roi_heads.box_predictor.bbox_pred.weight"][:4]
    arrays["roi_heads.box_predictor.bbox_pred.bias"] = arrays["roi_heads.box_predictor.bbox_pred.bias"][:4]
    state, _ = convert_detectron_state_dict(arrays, source="d2", fold_input=False)
    rows = state["roi_heads.box_predictor.bbox_pred.weight"]
    assert rows.shape == (324, 1024)
    assert torch.equal(rows.view(81, 4, 1024), rows[:4].expand(81, 4, 1024))


def test_detectron2_pth_layout_is_recognised(
    tmp_path: Path, mask_model: torch.nn.Module, d2_state: tuple[dict[str, np.ndarray], dict[str, str]]
) -> None:
    arrays = {k: v for k, v in d2_state[0].items() if k.startswith(("backbone.bottom_up.res4", "backbone.fpn_"))}
    target_of = {k: v for k, v in d2_state[1].items() if k in arrays}
    pth = tmp_path / "model_0004999.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in arrays.items()}, "iteration": 4999}, pth)
    plain = tmp_path / "torchvision.pth"
    torch.save({"model": {k: v for k, v in mask_model.state_dict().items() if k.startswith("backbone.fpn")}}, plain)
    assert is_detectron_file(pth) and is_detectron_file(tmp_path / "any.pkl") is False  # missing file: not ours
    assert not is_detectron_file(plain)
    state = load_detectron_state_dict(pth, fold_input=False)
    assert set(state) == set(target_of.values())
    key = "backbone.bottom_up.res4.5.conv2.weight"
    assert torch.equal(state[target_of[key]], torch.from_numpy(arrays[key]))


def test_caffe2_imagenet_backbone_r50_pkl(tmp_path: Path) -> None:
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    body = {k: s for k, s in _model_keys(model).items() if k.startswith("backbone.body.")}
    rng = np.random.default_rng(2)
    blobs = {c2: rng.standard_normal(tuple(s)).astype(np.float32) for k, s in body.items() if (c2 := _tv_to_caffe2(k))}
    blobs |= {"fc1000_w": np.zeros((1000, 2048), np.float32), "fc1000_b": np.zeros(1000, np.float32)}
    blobs["res2_0_branch2a_w_momentum"] = np.zeros((64, 64, 1, 1), np.float32)
    path = _write_pickle(tmp_path / "R-50.pkl", blobs, protocol=2)  # Caffe2 files are Python 2 pickles

    state, report = convert_detectron_state_dict(read_detectron_file(path), source="R-50.pkl", fold_input=False)

    assert set(state) == set(body)
    assert {name for name, _ in report.ignored} == {"fc1000_w", "fc1000_b", "res2_0_branch2a_w_momentum"}
    assert torch.equal(state["backbone.body.layer3.5.conv2.weight"], torch.from_numpy(blobs["res4_5_branch2b_w"]))
    assert torch.equal(
        state["backbone.body.layer1.0.downsample.1.weight"], torch.from_numpy(blobs["res2_0_branch1_bn_s"])
    )
    assert torch.equal(state["backbone.body.bn1.bias"], torch.from_numpy(blobs["res_conv1_bn_b"]))
    assert torch.equal(state["backbone.body.layer2.3.bn3.running_mean"], torch.zeros(512))
    assert torch.equal(state["backbone.body.layer2.3.bn3.running_var"], torch.ones(512))
    assert report.num_outputs is None and detectron.infer_arch(state) is None
    assert not any(k.startswith("transform.") for k in state)  # a backbone alone: no input buffers


def test_caffe2_end_to_end_mask_rcnn_keeps_background_first(tmp_path: Path, mask_model: torch.nn.Module) -> None:
    rng = np.random.default_rng(3)
    blobs = {
        c2: rng.standard_normal(tuple(s)).astype(np.float32)
        for k, s in _model_keys(mask_model).items()
        if (c2 := _tv_to_caffe2(k))
    }
    small = {"blobs": {k: blobs[k] for k in ("fc7_w", "fc7_b")}, "cfg": "MODEL: ..."}
    path = _write_pickle(tmp_path / "e2e_mask_rcnn.pkl", small, protocol=2)  # the file layout, on a small file
    assert read_detectron_file(path).keys() == {"fc7_w", "fc7_b"}
    state, report = convert_detectron_state_dict(blobs, source="e2e", fold_input=False)
    assert set(state) == set(_model_keys(mask_model)) | {
        f"transform.{k}" for k in ("pixel_mean", "pixel_std", "channel_order")
    }
    assert state["transform.pixel_std"].tolist() == [1.0, 1.0, 1.0]  # Caffe2: BGR, std 1
    assert report.naming == "Detectron (Caffe2)" and report.num_outputs == 81
    for blob, tv in [("cls_score_w", "roi_heads.box_predictor.cls_score.weight"),
                     ("bbox_pred_w", "roi_heads.box_predictor.bbox_pred.weight"),
                     ("mask_fcn_logits_w", "roi_heads.mask_predictor.mask_fcn_logits.weight"),
                     ("fpn_inner_res3_3_sum_lateral_w", "backbone.fpn.inner_blocks.1.0.weight"),
                     ("fpn_res5_2_sum_b", "backbone.fpn.layer_blocks.3.0.bias"),
                     ("_[mask]_fcn3_w", "roi_heads.mask_head.2.0.weight")]:  # fmt: skip
        assert torch.equal(state[tv], torch.from_numpy(blobs[blob])), blob


def test_unsupported_heads_are_listed(d2_state: tuple[dict[str, np.ndarray], dict[str, str]]) -> None:
    arrays = dict(d2_state[0])
    arrays["roi_heads.res5.0.conv1.weight"] = np.zeros((512, 1024, 1, 1), np.float32)  # a C4 model's head
    with pytest.raises(CheckpointError, match=r"1 of \d+ tensors have no counterpart .*roi_heads\.res5\.0\.conv1"):
        convert_detectron_state_dict(arrays, source="c4.pkl")


def test_folded_input_gives_the_same_first_features() -> None:
    torch.manual_seed(0)
    conv1_bgr = torch.randn(64, 3, 7, 7, dtype=torch.float64)
    pixels_rgb = torch.randint(0, 256, (1, 3, 32, 40)).double()
    for fmt, std in [("BGR", (1.0, 1.0, 1.0)), ("RGB", (58.395, 57.12, 57.375))]:
        order = [2, 1, 0] if fmt == "BGR" else [0, 1, 2]
        mean_rgb = torch.tensor(detectron.DETECTRON2_PIXEL_MEAN_BGR[::-1], dtype=torch.float64)
        mean = mean_rgb[order]  # Detectron2's PIXEL_MEAN and PIXEL_STD are in the input's channel order
        d2_input = (pixels_rgb[:, order] - mean.view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        tv_mean = torch.tensor(detectron.TORCHVISION_MEAN_RGB, dtype=torch.float64).view(1, 3, 1, 1)
        tv_std = torch.tensor(detectron.TORCHVISION_STD_RGB, dtype=torch.float64).view(1, 3, 1, 1)
        tv_input = (pixels_rgb / 255 - tv_mean) / tv_std
        folded = fold_input_normalisation(conv1_bgr, input_format=fmt, pixel_std=std)
        expected = F.conv2d(d2_input, conv1_bgr, stride=2, padding=3)
        actual = F.conv2d(tv_input, folded, stride=2, padding=3)  # outputs ~1e2: only float64 rounding differs
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-5)


def test_coco_names_are_the_80_contiguous_classes() -> None:
    names = coco_class_names()
    assert len(names) == 80 and names[0] == "person" and names[-1] == "toothbrush" and "N/A" not in names


# ---- 3. detectron2:// zoo paths -----------------------------------------------------------------------------------


def test_detectron2_zoo_path_is_downloaded_once(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detectron, "DETECTRON2_ZOO_URL", f"{file_server.url}/detectron2/")
    monkeypatch.setenv("DETFORGE_CACHE", str(tmp_path / "cache"))
    folder = file_server.root / "detectron2" / "ImageNetPretrained" / "MSRA"
    folder.mkdir(parents=True)
    blobs = {"conv1_w": np.ones((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(64, np.float32)}
    _write_pickle(folder / "R-50.pkl", blobs, protocol=2)

    first = resolve_weights("detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    second = resolve_weights("detectron2://ImageNetPretrained/MSRA/R-50.pkl")

    assert first == second and first.parent == tmp_path / "cache" / "weights" and first.suffix == ".pkl"
    assert file_server.requests == ["/detectron2/ImageNetPretrained/MSRA/R-50.pkl"]
    assert load_detectron_state_dict(first, fold_input=False)["backbone.body.bn1.running_var"].tolist() == [1.0] * 64


def test_missing_zoo_file_names_the_url(
    file_server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detectron, "DETECTRON2_ZOO_URL", f"{file_server.url}/")
    monkeypatch.setenv("DETFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match=r"127\.0\.0\.1:\d+/COCO/nope\.pkl: download failed: HTTP 404"):
        resolve_weights("detectron2://COCO/nope.pkl")


# ---- 5. detforge convert ------------------------------------------------------------------------------------------


def test_convert_writes_a_checkpoint_the_predictor_loads(
    tmp_path: Path, d2_state: tuple[dict[str, np.ndarray], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from detforge.cli.convert import convert_cmd
    from detforge.inference.predictor import Predictor

    arrays, target_of = d2_state
    src = _write_pickle(tmp_path / "model_final.pkl", {"model": arrays, "__author__": "Detectron2 Model Zoo"})
    app = typer.Typer()
    app.command()(convert_cmd)
    out = tmp_path / "converted.pt"

    monkeypatch.setenv("COLUMNS", "220")  # rich's console reads it when printing: the table is not cut
    result = CliRunner().invoke(app, [str(src), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "backbone.bottom_up.res4" in result.output and "backbone.body.layer3" in result.output
    assert "maskrcnn_resnet50_fpn_detectron2, 80 classes" in result.output
    predictor = Predictor.load(out)
    assert predictor.class_names == coco_class_names()
    weights = predictor.model.state_dict()
    key = "roi_heads.box_head.fc1.weight"
    assert torch.equal(weights[target_of[key]], torch.from_numpy(arrays[key]))
    conv1 = torch.from_numpy(arrays["backbone.bottom_up.stem.conv1.weight"])  # BGR, std 1 -> torchvision's input
    expected = conv1[:, [2, 1, 0]] * 255 * torch.tensor(detectron.TORCHVISION_STD_RGB).view(1, 3, 1, 1)
    torch.testing.assert_close(weights["backbone.body.conv1.weight"], expected)
