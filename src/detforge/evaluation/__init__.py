"""Scoring predictions: COCO AP (:mod:`detforge.evaluation.coco`) and the evaluation callback."""

from detforge.evaluation.coco import CocoEvaluator, EvalResult, evaluate_coco, merge_results

__all__ = ["CocoEvaluator", "EvalResult", "evaluate_coco", "merge_results"]
