"""Time and peak memory of the prune-channels pass itself, per configuration.

Each configuration runs in a fresh process (bench.common.in_fresh_process): the model is loaded
into onnx_ir, its prerequisites (lift-constants, fold-batchnorm, infer-shapes) are run and the
calibration feeds are drawn before the clock and the memory baseline start; what is measured
is the pass alone on the in-memory model: no drift check, no saving. Peak memory is the
process's resident high-water mark above that baseline (bench.common.PeakMemory), reported
beside the model's weight bytes. Run:

    python bench/prune_pass_cost.py --model minilm_l6 --calib 64

and it prints a markdown table, one row per configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepFailed, in_fresh_process, markdown_table  # noqa: E402

import models  # noqa: E402

DEFAULT_CONFIGS = (
    "prune-channels{ratio=0.25}",
    "prune-channels{ratio=0.25,reconstruct=true}",
    "prune-channels{ratio=0.25,importance=lasso}",
    "prune-channels{ratio=0.25,importance=lasso,reconstruct=true}",
    "prune-channels{ratio=0.25,importance=apoz}",
)


def pass_step(model_name: str, spec: str, calib: int) -> dict:
    """Seconds and peak MB above the baseline of one prune-channels run, in this process."""
    import sklearn.linear_model  # noqa: F401 - imported before the baseline, as the pass would

    from common import PeakMemory
    from onnxcompress.modelio import initializer_bytes, load_model
    from onnxcompress.pass_base import PassContext
    from onnxcompress.pipeline import Pipeline
    from onnxcompress.registry import get_pass

    model = load_model(models.fetch(model_name))
    *prerequisites, entry = Pipeline.parse(spec).entries  # the pipeline puts them first
    for before in prerequisites:
        get_pass(before.name)(before.options)(model)
    pass_class = get_pass(entry.name)
    feeds = models.calibration_feeds(model_name, calib)
    weights = initializer_bytes(model)
    memory = PeakMemory()
    start = time.perf_counter()
    pass_class(entry.options, PassContext(calibration=feeds), entry.overrides)(model)
    return {"seconds": time.perf_counter() - start, "peak_mb": memory.peak_mb(), "weights_mb": weights / 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm_l6", choices=models.MODEL_NAMES)
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS), metavar="PIPELINE")
    args = parser.parse_args()
    rows = []
    for spec in args.configs:
        try:
            result = in_fresh_process(pass_step, args.model, spec, args.calib, timeout=args.timeout)
        except StepFailed as exc:
            rows.append({"pass": f"`{spec}`", "seconds": f"failed: {exc}"})
            continue
        rows.append({"pass": f"`{spec}`", "seconds": result["seconds"], "peak MB": result["peak_mb"],
                     "weights MB": result["weights_mb"], "peak / weights": result["peak_mb"] / result["weights_mb"]})
        print(f"{spec}: {rows[-1]}", file=sys.stderr, flush=True)
    print(markdown_table(rows, ["pass", "seconds", "peak MB", "weights MB", "peak / weights"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
