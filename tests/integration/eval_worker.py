"""One rank of a multi-process evaluation (started by torchrun from tests/integration/test_eval_lockstep.py).

Usage: python eval_worker.py OUT_JSON WEIGHTS DATASET [DATASET ...] -- [--section.key=value ...]
Rank 0 writes ``{dataset: {"top1", "top5", "loss", "samples"}}`` (its ``data.val_split``) to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from pipeline.build import build_model
from pipeline.config_io import load_config
from pipeline.data.loaders import build_eval
from pipeline.engine import Engine
from pipeline.evaluate import evaluate
from pipeline.optim import build_optimizer


def main(argv: list[str]) -> None:
    sep = argv.index("--")
    (out, weights, *datasets), overrides = argv[:sep], argv[sep + 1 :]
    cfg = load_config(None, overrides)
    engine = Engine(cfg.engine, cfg.data.batch_size, cfg.optim.clip_grad)
    acc = engine.acc
    net = build_model(cfg, weights=weights)
    model, _ = engine.prepare(net, build_optimizer(net, cfg.optim, 1e-3))
    results = {}
    for path in datasets:
        job = replace(cfg, data=replace(cfg.data, path=path))
        loader = build_eval(job, job.data.val_split, rank=acc.process_index, world_size=acc.num_processes,
                            device=acc.device)
        results[path] = evaluate(acc.unwrap_model(model), loader, acc.device, input_dtype=engine.input_dtype)
    if acc.is_main_process:
        with open(out, "w") as f:
            json.dump(results, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
