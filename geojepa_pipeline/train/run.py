"""``python -m geojepa_pipeline.train.run SPEC.json``: train from a JSON spec (used by torchrun and by tests).

SPEC: {"config": {TrainConfig fields}, "sources": [{"region", "tokens_file", "tiles_file",
"entities_file", "images_file" (optional)}], "work_dir": "..."}. Under torchrun, the process group is initialised (gloo
on CPU, nccl on GPU) and each rank writes ``work_dir/params-rank<R>.txt`` with a parameter
checksum at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import WorkDir
from .data import ShardSource
from .loop import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    distributed = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(1 if distributed else max(1, min(2, torch.get_num_threads())))
    sources = [ShardSource.from_json(s) for s in spec["sources"]]
    work = WorkDir(Path(spec["work_dir"]))
    rank = torch.distributed.get_rank() if distributed else 0
    def log(message: str) -> None:  # one write per line: print() writes text and newline apart, and ranks share a pipe
        sys.stdout.write(f"[rank {rank}] {message}\n")
        sys.stdout.flush()

    result = train(TrainConfig(**spec["config"]), sources, work.root, log=log)
    work.root.mkdir(parents=True, exist_ok=True)  # only rank 0 writes checkpoints: the directory may not exist here yet
    work.params(rank).write_text(result.param_checksum + "\n")
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    log(f"done: {result.steps} steps, resumed from {result.resumed_from}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
