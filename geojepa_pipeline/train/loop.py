"""The training loop: AdamW with schedules, EMA target, gradient clipping, checkpoints, resume, monitoring, DDP.

``train(config, sources, work_dir)`` trains one model from the token shards in ``sources``.
Checkpoints go to ``work_dir`` every ``ckpt_every`` steps and at the end of each epoch; a
new call with the same ``work_dir`` resumes from the newest one (after a crash or
``kill -9``), continuing the same batch order. Each epoch logs the collapse monitors (target
std per dimension, covariance term, effective rank) and a validation probe (ridge R² of the
building count from tile embeddings, fitted on train tiles, scored on validation tiles);
the best-by-probe checkpoint is kept in ``work_dir/best`` and the last in ``work_dir/last``.

Under ``torchrun`` (``torch.distributed`` initialised, gloo or nccl) the model is wrapped in
DistributedDataParallel, each rank reads every world-th tile (all ranks take the smallest
rank's number of batches per epoch), and rank 0 writes checkpoints.

The step has fixed shapes per length bucket: masks are drawn in the loader's thread (one
generator per batch, seeded by seed, rank, epoch and batch index, so a resume draws the same
masks), the epoch's one partial batch is padded with empty tiles, and the losses weight rows
instead of indexing them. ``compile="reduce-overhead"`` therefore compiles the step (the length
as a symbol, so one graph serves several buckets) and replays it as one CUDA graph per bucket;
``"default"`` compiles without CUDA graphs; ``"none"`` is eager.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..evaluate.probes import ridge_r2
from ..model.config import COMPILE_MODES, DEFAULT_PRESET, model_config
from ..model.geojepa import MODEL_INPUTS, GeoJEPA, draw_masks
from ..model.losses import covariance_term, effective_rank
from ..model.schedules import ema_momentum, learning_rate, weight_decay
from .checkpoint import WorkDir, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import ShardSource, TileSequences, bucketed_batches, prefetch

EMBED_BATCH = 256  # tiles per forward pass of the epoch-end probe (eager: fewer, larger launches)
STEP_STATS = ("loss", "smooth_l1", "variance", "covariance")  # the scalars a step returns in ``stats``
LENGTH_DIM = {"tag": 1, "geometry": 1, "position": 1, "valid": 1, "context": 1, "targets": 2}  # each input's token axis


@dataclass
class TrainConfig:
    preset: str = DEFAULT_PRESET  # tiny (2 CPU cores, minutes) or thesis (d 384, depth 12)
    variant: str = "GT"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    max_tokens: int = 128  # entity tokens per tile (the first ones of the shard)
    split_seed: int = 0  # the train / val / test split (geo.splits), independent of ``seed``
    ckpt_every: int = 50  # steps
    grad_clip: float = 10.0
    seed: int = 0
    max_steps: int = 0  # 0: all epochs; else stop after this many steps (tests, smoke runs)
    device: str = "auto"  # auto: cuda when available (bf16 autocast), else cpu
    compile: str = "none"  # none (eager) | default (torch.compile) | reduce-overhead (compiled + CUDA graphs per bucket)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    history: dict = field(default_factory=dict)
    last: Path | None = None
    best: Path | None = None
    resumed_from: int = 0
    seconds: float = 0.0
    param_checksum: str = ""  # sha256 over every parameter's bytes (DDP ranks must agree)


def _device(name: str) -> torch.device:
    """``auto``: this rank's GPU (``cuda:$LOCAL_RANK`` under torchrun, else ``cuda:0``) when there is one, else the CPU."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def mask_seed(seed: int, rank: int, epoch: int, index: int) -> int:
    """The seed of one batch's mask generator: the same batch gets the same masks after a resume."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + epoch) * 1_000_003 + index) % 2**63


def epoch_batches(sources: list[ShardSource], cfg: TrainConfig, model_cfg, epoch: int, rank: int = 0, world: int = 1,
                  skip: int = 0, pin: bool = False) -> Iterator[dict]:
    """One epoch's training batches, in the same order on every run, collated, masked (``draw_masks``) and,
    with ``pin``, in page-locked memory: all of it in a background thread (``prefetch``), ahead of the step.

    Leftovers move up a bucket and the one partial batch is padded to ``batch_size`` with empty tiles
    (``n_tiles`` counts the real ones), so every batch of a bucket has one shape. The first ``skip`` batches come unmasked (a resume skips them).
    """
    seqs = TileSequences(sources, "train", cfg.max_tokens, rank, world, cfg.split_seed,
                         shuffle=cfg.seed * 100_003 + epoch, with_images=model_cfg.uses.images)

    def masked():
        for i, batch in enumerate(bucketed_batches(seqs, cfg.batch_size, cfg.max_tokens, pad=True)):
            if i >= skip:
                batch = draw_masks(batch, model_cfg, mask_seed(cfg.seed, rank, epoch, i))
                if pin:
                    batch = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}
            yield batch

    return prefetch(masked())


class TrainStep:
    """One optimisation step: forward (bf16 autocast on CUDA), backward, gradient clipping, AdamW, EMA update.

    ``compile``: ``none`` runs eagerly; ``default`` compiles the model's forward and backward
    (``torch.compile``); ``reduce-overhead`` also replays them as CUDA graphs, one per batch shape
    (on CUDA; elsewhere it is ``default``). The sequence length is compiled as a symbol (``LENGTH_DIM``),
    so one compiled graph serves several length buckets: measured on CPU (thesis preset), buckets 16, 32
    and 64 shared one graph and 128 took a second (inductor's own range guard): 208 s to compile and step
    each bucket 3 times, against 249 s with four static graphs, at the same step times (``bench/compile_time.py``). Returns the forward's outputs
    plus ``stats``, a (4,) float tensor of ``STEP_STATS`` that stays valid after the next step (graph
    outputs do not).
    """

    def __init__(self, model: GeoJEPA, net: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
                 compile: str = "none", grad_clip: float = 10.0, symbolic_length: bool = True):
        from ..errors import GeojepaError

        if compile not in COMPILE_MODES:
            raise GeojepaError(f"unknown compile mode {compile!r}: use one of {', '.join(COMPILE_MODES)}")
        self.model, self.opt, self.device, self.grad_clip = model, opt, device, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs = compile == "reduce-overhead" and device.type == "cuda"
        if compile == "none":
            self.forward = net
        else:
            self.forward = torch.compile(net, mode="reduce-overhead" if self.graphs else None,
                                         dynamic=None if symbolic_length else False)
        self.symbolic_length = compile != "none" and symbolic_length  # False: one static graph per shape (bench/compile_time.py)

    def __call__(self, batch: dict, lr: float, weight_decay: float, momentum: float) -> dict:
        for g in self.opt.param_groups:
            g["lr"], g["weight_decay"] = lr, weight_decay
        inputs = {k: batch[k].to(self.device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
        if self.symbolic_length:  # the length as a symbol: one graph for several buckets (the batch size stays static)
            for k, dim in LENGTH_DIM.items():
                if k in inputs:
                    torch._dynamo.maybe_mark_dynamic(inputs[k], dim)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = self.forward(inputs)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.model.update_target(momentum)
        return {**out, "stats": torch.stack([out[k].detach().float() for k in STEP_STATS])}


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _ridge_fit_eval(xtr, ytr, xva, yva, alpha: float = 1.0) -> float:
    """R² on (xva, yva) of a ridge regression fitted on (xtr, ytr); 0 is the train mean."""
    if len(ytr) < 3 or len(yva) < 2:
        return float("nan")
    return ridge_r2(xtr, ytr, xva, yva, alpha)


@torch.no_grad()
def embed_tiles(model: GeoJEPA, sources, split: str, cfg: TrainConfig, limit: int = 2000,
                batch_size: int = EMBED_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(tile embeddings (N, 2d), building counts (N,)) of N = min(tiles, ``limit``) tiles of a split.

    The tiles are chosen before they are read or batched, evenly through the split's tiles (``TileSequences``'
    ``sample``), so the sample does not depend on ``batch_size`` or on tile length, and unchosen chips
    are not read. Cutting the length-bucketed stream at ``limit`` instead would keep whichever buckets filled first.
    """
    model.eval()
    xs, ys = [], []
    seqs = TileSequences(sources, split, cfg.max_tokens, split_seed=cfg.split_seed, with_images=model.cfg.uses.images,
                         sample=limit)
    device = next(model.parameters()).device
    for batch in bucketed_batches(seqs, batch_size, cfg.max_tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            xs.append(model.tile_embedding(to_device(batch, device)).float().cpu().numpy())
        ys.append(batch["buildings"].numpy())
    model.train()
    if not xs:
        return np.zeros((0, 2 * model.cfg.dim)), np.zeros(0)
    return np.concatenate(xs), np.concatenate(ys)


def train(cfg: TrainConfig, sources: list[ShardSource], work_dir: Path, log: Callable[[str], None] = print,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) in ``work_dir``; see the module docstring."""
    t0 = time.perf_counter()
    rank, world = _dist()
    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg.preset, cfg.variant)
    model = GeoJEPA(mcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    device = _device(cfg.device)
    model.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.04, fused=device.type == "cuda")

    def batches_of(epoch: int, skip: int = 0) -> Iterator[dict]:  # the same order for an epoch on every run: resumes line up
        return epoch_batches(sources, cfg, mcfg, epoch, rank, world, skip, pin=device.type == "cuda")

    # every batch but the last is full (leftovers move up a bucket), whatever the shuffle
    n_tiles = TileSequences(sources, "train", cfg.max_tokens, rank, world, cfg.split_seed).count()
    steps_per_epoch = -(-n_tiles // cfg.batch_size)
    if world > 1:  # every rank must take the same number of steps
        n = torch.tensor([steps_per_epoch])
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        steps_per_epoch = int(n)
    if steps_per_epoch == 0:
        from ..errors import GeojepaError

        raise GeojepaError("no training tiles: materialize tile_tokens for the regions first (the train split is 70 % of the 1.2 km blocks)")
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    history: dict = {"loss": [], "smooth_l1": [], "epoch": []}
    step, epoch, skip, best_probe = 0, 0, 0, -math.inf
    work = WorkDir(Path(work_dir))
    ckpt_root = work.steps
    found = latest_checkpoint(ckpt_root)
    if found is not None:
        state = load_checkpoint(found, model, opt)
        step, epoch, skip = state["step"], state["epoch"], state["batches_in_epoch"]
        history, best_probe = state["history"], state.get("best_probe", -math.inf)
        log(f"resumed from step {step} (epoch {epoch}, {skip} batches into it) at {found}")
    resumed_from = step
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True,
                                                        device_ids=[device.index] if device.type == "cuda" else None)
    train_step = TrainStep(model, net, opt, device, cfg.compile, cfg.grad_clip)
    pending: list[torch.Tensor] = []  # per-step stats still on the device: read in one go, not one sync per step

    def flush() -> None:
        if pending:
            for loss, smooth in torch.stack(pending)[:, :2].cpu().tolist():
                history["loss"].append(round(loss, 5))
                history["smooth_l1"].append(round(smooth, 5))
            pending.clear()

    def checkpoint(batches_in_epoch: int, target_dir: Path | None = None) -> Path | None:
        flush()
        if rank != 0:
            return None
        state = {"epoch": epoch, "batches_in_epoch": batches_in_epoch, "history": history, "best_probe": best_probe,
                 "train_config": cfg.to_dict(), "model_config": mcfg.to_dict(), "total_steps": total}
        path = save_checkpoint(ckpt_root, step, model, opt, state)
        if target_dir is not None:
            tmp = target_dir.with_name(f".{target_dir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            shutil.rmtree(target_dir, ignore_errors=True)
            tmp.rename(target_dir)
        return path

    log(f"training GeoJEPA-{cfg.variant} ({cfg.preset}): {steps_per_epoch} steps/epoch x {cfg.epochs} epochs"
        + (f", stopping at step {total}" if cfg.max_steps else "") + f" on {world} process(es)"
        + (f", compiled ({cfg.compile})" if cfg.compile != "none" else ""))
    model.train()
    while epoch < cfg.epochs and step < total:
        targets_seen = []
        last_steps = min(steps_per_epoch, skip + total - step) - 8  # the epoch's last 8 steps feed the collapse monitors
        batches = batches_of(epoch, skip)
        for i, batch in enumerate(batches):
            if i >= steps_per_epoch:
                break
            if i < skip:
                continue
            out = train_step(batch, learning_rate(step, total, peak=cfg.lr), weight_decay(step, total), ema_momentum(step, total))
            step += 1
            pending.append(out["stats"])
            if i >= last_steps:
                targets_seen.append(out["target_out"][out["valid"]][:512].float().cpu())
            if on_step:
                on_step(step, out)
            if step % cfg.ckpt_every == 0:
                checkpoint(i + 1)
            if step >= total:
                break
        batches.close()  # stops the prefetch thread when the epoch ends early
        flush()
        skip = 0
        epoch += 1
        # ---- end of epoch: collapse monitors and the validation probe ------------------------
        tgt = torch.cat(targets_seen[-8:]) if targets_seen else torch.zeros(0, mcfg.dim)
        std = tgt.std(0) if len(tgt) > 1 else torch.zeros(mcfg.dim)
        xtr, ytr = embed_tiles(model, sources, "train", cfg)
        xva, yva = embed_tiles(model, sources, "val", cfg)
        probe = _ridge_fit_eval(xtr, ytr, xva, yva)
        record = {"epoch": epoch, "step": step, "loss": float(np.mean(history["loss"][-steps_per_epoch:])),
                  "target_std_mean": float(std.mean()), "target_std_min": float(std.min()),
                  "covariance": float(covariance_term(tgt)) if len(tgt) > 1 else 0.0,
                  "rankme": effective_rank(tgt) if len(tgt) > 1 else 1.0, "probe_building_r2": probe}
        history["epoch"].append(record)
        log(f"epoch {epoch}: loss {record['loss']:.4f}, target std {record['target_std_mean']:.3f} "
            f"(min {record['target_std_min']:.3f}), RankMe {record['rankme']:.1f}, probe R² {probe:.3f}")
        is_best = not math.isnan(probe) and probe > best_probe
        if is_best:
            best_probe = probe
        path = checkpoint(0 if step < total else -1)
        if path is not None and is_best:
            checkpoint(0 if step < total else -1, work.best)
    last = checkpoint(-1, work.last) and work.last
    best = work.best if work.best.exists() else last
    import hashlib

    checksum = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    return TrainResult(step, epoch, history, last, best, resumed_from, time.perf_counter() - t0, checksum)
