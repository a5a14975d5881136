"""Parameter names of Detectron (Caffe2) and Detectron2 R-CNN checkpoints, renamed to torchvision's.

Two steps, as Detectron2 itself loads Caffe2 files: :func:`caffe2_to_detectron2` turns Detectron (v1) blob names
(``res2_0_branch2a_w``, ``fpn_inner_res5_2_sum_w``, ``cls_score_w``…) into Detectron2 names, and
:func:`detectron2_to_torchvision` turns Detectron2 names (``backbone.bottom_up.res2.0.conv1.weight``…) into the
names of torchvision's ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (any ResNet depth: block indices are
kept). Only names move here; the class layout of the predictors is changed by the conversion (``detectron.py``).
"""

from __future__ import annotations

import re

__all__ = [
    "IGNORED_CAFFE2",
    "IGNORED_DETECTRON2",
    "caffe2_to_detectron2",
    "ignored_reason",
    "detectron2_to_torchvision",
    "is_caffe2_name",
    "is_detectron2_name",
]

_X = r"(weight|bias|running_mean|running_var)"
_NORM = {"s": "weight", "b": "bias"}  # Caffe2 AffineChannel: scale and bias of a BatchNorm folded at training time
_CONV = {"a": "1", "b": "2", "c": "3"}  # branch2a/b/c are the bottleneck's 1x1, 3x3, 1x1 convolutions
_BLOB = {"w": "weight", "b": "bias"}

# Detectron2 name -> torchvision name; the first pattern that matches wins.
_D2_RULES: list[tuple[str, str]] = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.body.conv1.weight"),
    (rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_X}", "backbone.body.bn1.{1}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", "backbone.body.layer{r1}.{2}.conv{3}.weight"),
    (rf"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.{_X}", "backbone.body.layer{r1}.{2}.bn{3}.{4}"),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", "backbone.body.layer{r1}.{2}.downsample.0.weight"),
    (rf"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.{_X}", "backbone.body.layer{r1}.{2}.downsample.1.{3}"),
    (r"backbone\.fpn_lateral(\d)\.(weight|bias)", "backbone.fpn.inner_blocks.{p1}.0.{2}"),
    (r"backbone\.fpn_output(\d)\.(weight|bias)", "backbone.fpn.layer_blocks.{p1}.0.{2}"),
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", "rpn.head.conv.0.0.{1}"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", "rpn.head.cls_logits.{1}"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", "rpn.head.bbox_pred.{1}"),
    (r"roi_heads\.box_head\.fc1\.(weight|bias)", "roi_heads.box_head.fc6.{1}"),
    (r"roi_heads\.box_head\.fc2\.(weight|bias)", "roi_heads.box_head.fc7.{1}"),
    (r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)", "roi_heads.box_predictor.{1}.{2}"),
    (r"roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)", "roi_heads.mask_head.{m1}.0.{2}"),
    (r"roi_heads\.mask_head\.deconv\.(weight|bias)", "roi_heads.mask_predictor.conv5_mask.{1}"),
    (r"roi_heads\.mask_head\.predictor\.(weight|bias)", "roi_heads.mask_predictor.mask_fcn_logits.{1}"),
]

# Caffe2 (Detectron v1) blob name -> Detectron2 name.
_C2_RULES: list[tuple[str, str]] = [
    (r"conv1_w", "backbone.bottom_up.stem.conv1.weight"),
    (r"res_conv1_bn_(s|b)", "backbone.bottom_up.stem.conv1.norm.{n1}"),
    (r"res(\d)_(\d+)_branch2([abc])_w", "backbone.bottom_up.res{1}.{2}.conv{c3}.weight"),
    (r"res(\d)_(\d+)_branch2([abc])_bn_(s|b)", "backbone.bottom_up.res{1}.{2}.conv{c3}.norm.{n4}"),
    (r"res(\d)_(\d+)_branch1_w", "backbone.bottom_up.res{1}.{2}.shortcut.weight"),
    (r"res(\d)_(\d+)_branch1_bn_(s|b)", "backbone.bottom_up.res{1}.{2}.shortcut.norm.{n3}"),
    (r"fpn_inner_res(\d)_\d+_sum(?:_lateral)?_(w|b)", "backbone.fpn_lateral{1}.{w2}"),
    (r"fpn_res(\d)_\d+_sum_(w|b)", "backbone.fpn_output{1}.{w2}"),
    (r"conv_rpn_fpn2_(w|b)", "proposal_generator.rpn_head.conv.{w1}"),
    (r"rpn_cls_logits_fpn2_(w|b)", "proposal_generator.rpn_head.objectness_logits.{w1}"),
    (r"rpn_bbox_pred_fpn2_(w|b)", "proposal_generator.rpn_head.anchor_deltas.{w1}"),
    (r"fc6_(w|b)", "roi_heads.box_head.fc1.{w1}"),
    (r"fc7_(w|b)", "roi_heads.box_head.fc2.{w1}"),
    (r"(cls_score|bbox_pred)_(w|b)", "roi_heads.box_predictor.{1}.{w2}"),
    (r"_\[mask\]_fcn(\d)_(w|b)", "roi_heads.mask_head.mask_fcn{1}.{w2}"),
    (r"conv5_mask_(w|b)", "roi_heads.mask_head.deconv.{w1}"),
    (r"mask_fcn_logits_(w|b)", "roi_heads.mask_head.predictor.{w1}"),
]

# Tensors that exist in the files but have no counterpart in torchvision's model, with the reason.
IGNORED_DETECTRON2: dict[str, str] = {
    r"pixel_(mean|std)": "input normalisation (read to fold the input into conv1)",
    r"proposal_generator\.anchor_generator\..*": "anchor buffers (torchvision computes its anchors)",
    r".*num_batches_tracked": "BatchNorm step counter",
}
IGNORED_CAFFE2: dict[str, str] = {
    r"(fc1000|pred)_(w|b)": "ImageNet classifier (a detector does not use it)",
    r".*_momentum": "optimizer momentum",
}

_COMPILED_D2 = [(re.compile(p), t) for p, t in _D2_RULES]
_COMPILED_C2 = [(re.compile(p), t) for p, t in _C2_RULES]


def _fill(template: str, match: re.Match[str]) -> str:
    """Substitute ``{i}`` (group i), ``{r1}`` (res stage -> layer index), ``{p1}`` (FPN level -> block index),
    ``{m1}`` (1-based -> 0-based), ``{c1}`` (branch2 letter -> conv number), ``{n1}``/``{w1}`` (Caffe2 suffixes)."""

    def one(ref: re.Match[str]) -> str:
        kind, group = ref.group(1), match.group(int(ref.group(2)))
        if kind == "r":
            return str(int(group) - 1)  # res2..res5 are torchvision's layer1..layer4
        if kind == "p":
            return str(int(group) - 2)  # FPN levels 2..5 are torchvision's blocks 0..3
        if kind == "m":
            return str(int(group) - 1)
        return {"c": _CONV, "n": _NORM, "w": _BLOB}.get(kind, {}).get(group, group)

    return re.sub(r"\{([a-z]?)(\d)\}", one, template)


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match:
            return _fill(template, match)
    return None


def detectron2_to_torchvision(name: str) -> str | None:
    """The torchvision name of a Detectron2 R-CNN FPN parameter, or None when it has none."""
    return _rename(name, _COMPILED_D2)


def caffe2_to_detectron2(name: str) -> str | None:
    """The Detectron2 name of a Detectron (v1) Caffe2 blob, or None when it has none."""
    return _rename(name, _COMPILED_C2)


def is_detectron2_name(name: str) -> bool:
    """True for names only Detectron2 models use (torchvision has no ``bottom_up``/``proposal_generator``…)."""
    return name.startswith(("backbone.bottom_up.", "backbone.fpn_", "proposal_generator.")) or name in (
        "roi_heads.box_head.fc1.weight",
        "roi_heads.mask_head.predictor.weight",
    )


def is_caffe2_name(name: str) -> bool:
    """True for Caffe2 blob names (underscores, no dots) such as ``res2_0_branch2a_w`` or ``conv1_w``."""
    return "." not in name and re.search(r"_(w|b|s|momentum)$", name) is not None


def ignored_reason(name: str, ignored: dict[str, str]) -> str | None:
    """Why ``name`` is deliberately left out, or None."""
    return next((reason for pattern, reason in ignored.items() if re.fullmatch(pattern, name)), None)
