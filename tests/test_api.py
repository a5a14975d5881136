"""detforge.train() and detforge.evaluate() through the public API and the CLI, on the tiny dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import detforge
from detforge.cli.main import app
from detforge.config import ModelConfig
from detforge.data.formats.coco import load_coco
from detforge.data.loader import DetectionDataset, collate_detection
from detforge.engine.callbacks import Callback, StepOutput
from detforge.engine.checkpoint import load_checkpoint
from detforge.engine.trainer import Trainer
from detforge.errors import CheckpointError, ConfigError, DatasetError
from detforge.evaluation.coco import evaluate_coco
from detforge.models.build import build_model
from helpers import tiny_config


def test_train_writes_config_checkpoints_evaluations_and_evaluate_reproduces_them(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    result = detforge.train(tiny_config(tiny_dataset, tmp_path / "run"))
    run = tmp_path / "run"
    assert result.iteration == 4 and result.final_checkpoint == run / "model_final.pt"
    assert result.best_checkpoint == run / "model_best.pt"
    assert (run / "config.yaml").read_text().startswith("data:")
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["iter_0000002", "iter_0000004"]
    final_eval = json.loads((run / "eval" / "iter_0000004" / "metrics.json").read_text())["metrics"]
    assert final_eval == result.metrics
    meta = load_checkpoint(result.final_checkpoint)["metadata"]
    assert meta["class_names"] == ["circle", "square"] and meta["metrics"] == result.metrics

    output = CliRunner().invoke(
        app,
        [
            "eval",
            str(run / "config.yaml"),
            f"model.weights={result.final_checkpoint}",
            f"output.dir={tmp_path / 'evaluated'}",
        ],
    )
    assert output.exit_code == 0, output.output
    assert "COCO AP per class" in output.output and "circle" in output.output
    again = json.loads((tmp_path / "evaluated" / "eval" / "metrics.json").read_text())["metrics"]
    assert again == pytest.approx(result.metrics)


def test_both_coco_backends_agree_on_a_trained_models_predictions(tiny_dataset: Path, tmp_path: Path) -> None:
    detforge.train(tiny_config(tiny_dataset, tmp_path / "run"), ["eval.period=0"])
    results = json.loads((tmp_path / "run" / "eval" / "iter_0000004" / "results.json").read_text())
    assert results, "an untrained model at score threshold 0 still returns boxes"
    gt = load_coco(tiny_dataset)
    faster = evaluate_coco(gt, results, backend="faster").metrics
    reference = evaluate_coco(gt, results, backend="pycocotools").metrics
    assert faster == pytest.approx(reference, abs=1e-12)


def test_an_image_without_boxes_gives_zero_box_regression_loss(tiny_dataset: Path) -> None:
    ds = load_coco(tiny_dataset)
    dataset = DetectionDataset(ds, include_empty=True)
    empty = next(i for i in range(len(dataset)) if len(dataset[i][1]["boxes"]) == 0)
    images, targets = collate_detection([dataset[empty]])
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="fasterrcnn_mobilenet_v3_large_320_fpn"), num_classes=2, min_size=[64], max_size=64
    )
    model.train()
    losses = model([images[0].float() / 255 if images[0].dtype == torch.uint8 else images[0]], targets)
    assert losses["loss_box_reg"].item() == 0.0
    assert losses["loss_rpn_box_reg"].item() == 0.0
    assert losses["loss_classifier"].item() > 0 and losses["loss_objectness"].item() > 0


def test_a_mask_model_on_box_only_data_and_disagreeing_classes_are_clear_errors(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    data = json.loads(tiny_dataset.read_text())
    for ann in data["annotations"]:
        del ann["segmentation"]
    boxes_only = tiny_dataset.with_name("boxes.json")
    boxes_only.write_text(json.dumps(data))
    config = tiny_config(boxes_only, tmp_path / "run")
    with pytest.raises(DatasetError, match="needs masks, but no annotation has one"):
        detforge.train(config, ["model.arch=maskrcnn_mobilenet_v3_large_fpn"])
    data["categories"][1]["name"] = "box"
    other = tiny_dataset.with_name("other.json")
    other.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="differ from the training set"):
        detforge.train(config, [f"data.val={other}"])


def test_resuming_with_another_architecture_is_a_clear_error(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset, tmp_path / "run", train={"max_iter": 2})
    config["eval"]["period"] = 0
    detforge.train(config)
    longer = ["train.max_iter=4", "model.arch=fasterrcnn_mobilenet_v3_large_fpn"]
    saved_by = r"model_0000002.pt: saved by a fasterrcnn_mobilenet_v3_large_320_fpn run"
    with pytest.raises(CheckpointError, match=saved_by):
        detforge.train(config, longer, resume=True)
    result = CliRunner().invoke(app, ["train", str(tmp_path / "run" / "config.yaml"), *longer, "--resume"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "this config builds fasterrcnn_mobilenet_v3_large_fpn" in " ".join(result.output.split())
    reshaped = ["train.max_iter=4", "model.aspect_ratios=[0.5,1.0,2.0,4.0]"]  # same arch, other RPN head shape
    with pytest.raises(CheckpointError, match=r"does not fit the model or optimizer this config builds \(Error"):
        detforge.train(config, reshaped, resume=True)


def test_best_metrics_are_checked_before_training_starts(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(tiny_dataset, tmp_path / "run", eval={"best_metrics": ["bbox/AP_50"]})
    with pytest.raises(ConfigError, match=r"best_metrics: 'bbox/AP_50' is not a metric .* Did you mean bbox/AP50\?"):
        detforge.train(config)
    config = tiny_config(tiny_dataset, tmp_path / "run", eval={"best_metric": "segm/AP"})
    with pytest.raises(ConfigError, match=r"eval.best_metric: 'segm/AP' is not a metric of fasterrcnn_mobilenet"):
        detforge.train(config)
    assert not list((tmp_path / "run").glob("*.pt"))  # nothing trained


def test_without_validation_data_best_metrics_are_not_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    config = tiny_config(
        tiny_dataset, tmp_path / "run", data={"val": None}, train={"max_iter": 1}, eval={"best_metric": "segm/AP"}
    )
    assert detforge.train(config).iteration == 1  # nothing evaluates, so nothing uses the metric


class _Precision(Callback):
    """Records, at each step, whether the convs hold channels-last weights and the trainer's autocast dtype."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, torch.dtype | None]] = []

    def on_step_end(self, trainer: Trainer, out: StepOutput) -> None:
        convs = [m.weight for m in trainer.unwrapped_model.modules() if isinstance(m, torch.nn.Conv2d)]
        last = all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1)
        self.seen.append((last, trainer.amp_dtype))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_amp_auto_picks_bf16_only_where_the_cpu_computes_it_and_channels_last_trains(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    monkeypatch.setattr("detforge.inference.predictor.cpu_supports_bf16", lambda: native_bf16)
    probe = _Precision()
    cfg = tiny_config(tiny_dataset, tmp_path / "run", train={"amp": "auto", "channels_last": True, "device": "cpu"})
    result = detforge.train(cfg, callbacks=[probe])
    expected = torch.bfloat16 if native_bf16 else None
    assert probe.seen == [(True, expected)] * 4
    model = build_model(ModelConfig(arch="fasterrcnn_mobilenet_v3_large_320_fpn", weights=str(result.final_checkpoint)),
                        num_classes=2, min_size=[64], max_size=64)  # fmt: skip
    report = model.weights_report
    assert report.loaded and not (report.missing or report.unexpected or report.reinitialised), report.summary()
    precision = load_checkpoint(result.final_checkpoint)["metadata"]["train_precision"]
    assert precision == ("bf16 autocast" if native_bf16 else "fp32") + " (train.amp=auto), channels-last"


def test_fp16_off_cuda_is_refused_with_the_alternatives(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.amp=fp16 needs CUDA.*bf16, auto or off"):
        detforge.train(tiny_config(tiny_dataset, tmp_path / "run", train={"amp": "fp16", "device": "cpu"}))


def test_evaluating_weights_with_a_config_of_another_model_is_refused(tiny_dataset: Path, tmp_path: Path) -> None:
    model = {"arch": "maskrcnn_resnet18_fpn", "mask_head_num_conv": 1, "mask_head_conv_dim": 8}
    trained = detforge.train(tiny_config(tiny_dataset, tmp_path / "run", model=model), ["train.max_iter=1"])
    other = tiny_config(tiny_dataset, tmp_path / "eval", model={**model, "mask_head_norm": "bn"})
    other["model"]["weights"] = str(trained.final_checkpoint)
    with pytest.raises(CheckpointError, match=r"tensors of the model built from this config are not in the file"):
        detforge.evaluate(other)
