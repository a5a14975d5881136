"""benchmarks/inference.py's verdict lines: the goal counts the fastest path that keeps the box AP."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# benchmarks/ is not a package, and tests/inference/ would shadow a plain `import inference`.
_spec = importlib.util.spec_from_file_location(
    "benchmark_inference", Path(__file__).resolve().parents[1] / "benchmarks" / "inference.py"
)
assert _spec is not None and _spec.loader is not None
inference = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = inference  # dataclasses look their module up by name
_spec.loader.exec_module(inference)


def _report(*paths: tuple[str, float, float]) -> object:
    return inference.ModelReport("maskrcnn_resnet50_fpn", "x", [inference.PathResult(*p) for p in paths])


def test_a_faster_path_outside_the_ap_tolerance_is_named_not_counted() -> None:
    # The R50 row of the README: int8-static is fastest but gains 1.07 AP points; int8 keeps the AP at 2.54x.
    report = _report(("eager fp32", 1.38, 0.2297), ("bf16 + channels-last", 1.72, 0.2309),
                     ("onnxruntime int8", 3.51, 0.2294), ("onnxruntime int8-static", 5.47, 0.2404))  # fmt: skip
    line = inference.goal_line(report)
    assert "fastest that keeps the AP: onnxruntime int8 at 2.54x, box AP -0.03 points" in line
    assert "outside the AP tolerance: onnxruntime int8-static at 3.96x, box AP +1.07 points" in line
    assert line.endswith(": MET")


def test_the_goal_is_not_met_when_only_inaccurate_paths_are_fast_enough() -> None:
    line = inference.goal_line(_report(("eager fp32", 1.0, 0.3), ("bf16", 1.5, 0.3), ("int8", 3.0, 0.2)))
    assert "fastest that keeps the AP: bf16 at 1.50x" in line and line.endswith(": NOT MET")
    line = inference.goal_line(_report(("eager fp32", 1.0, 0.3), ("int8", 3.0, 0.2)))
    assert "no path keeps the AP" in line and line.endswith(": NOT MET")
    barely_trained = inference.goal_line(_report(("eager fp32", 1.0, 0.05), ("int8", 3.0, 0.06)))
    assert barely_trained.endswith("NOT JUDGED")
