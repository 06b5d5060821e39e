"""Runs one part of ``bench/gpu.sh`` in this process: ``part.py NAME --ctx CTX.json --result RESULT.json``.

Called by bench/gpu/run.py, one process per part, so that a crash or a hang of one part never loses
the others; the part writes RESULT.json as it goes (bench/gpu/common.py ``Result``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from common import ROOT, Result, load_ctx, missing

sys.path.insert(0, str(ROOT))  # vitpipe, pipeline, model, data_prep


def implementations() -> dict:
    """Part name -> function(ctx, result)."""
    import parts_data
    import parts_loader
    import parts_model
    import parts_train

    return {"env": parts_data.env, "data": parts_data.data, "pytest_gpu": parts_train.pytest_gpu,
            "structsa": parts_model.structsa, "models": parts_model.models,
            "models_compile": parts_model.models_compile, "loader_images": parts_loader.loader_images,
            "loader_video": parts_loader.loader_video, "train_loader": parts_train.train_loader,
            "engines": parts_train.engines}


def main() -> int:
    """Runs the part; a failure is written into its result (status ``failed: ...``), exit 1."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name")
    p.add_argument("--ctx", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True)
    p.add_argument("--gpu-only", action="store_true", help="skip when there is no CUDA device")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = Result(a.result)
    if reason := missing("torch", "numpy", "PIL"):
        res.finish(reason)
        return 0
    import torch

    if a.gpu_only and not torch.cuda.is_available():
        res.finish("skipped: no CUDA device")
        return 0
    try:
        implementations()[a.name](load_ctx(a.ctx), res)
    except Exception as err:  # noqa: BLE001 - recorded in the results, the run goes on with the next part
        traceback.print_exc()
        res.obj["notes"].append(traceback.format_exc().strip().splitlines()[-1])
        res.finish(f"failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err) else ''}")
        return 1
    if res.obj["status"] == "running":
        res.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
