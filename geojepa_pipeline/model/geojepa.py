"""GeoJEPA, top to bottom: token embedding -> conditional prior -> encoder; EMA target encoder; predictor.

A batch (see ``train/``) holds per tile a sequence of entity tokens, padded to L:
    tag (B, L, tag_dim), geometry (B, L, geometry_dim), position (B, L, 8) min-box corners in
    [0, 1], valid (B, L) bool; and, for image variants, images (B, 224, 224, 4) uint8 with
    has_image (B,) bool. Image variants append 196 patch tokens per tile (``tokenizers/image.py``).

Training step: masks are drawn (``masking.py``); the context encoder sees the context tokens
only (attention is restricted to them); the EMA target encoder, always in eval mode, sees every
valid token without the context path's dropout and noise, and its outputs are layer-normed; for each target the predictor sees the context outputs plus a
mask token at each target position, and predicts the target outputs there.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..tokenizers.image import GRID, PatchTokenizer, patch_positions
from .config import ModelConfig
from .losses import jepa_loss
from .masking import IMG, OSM, PAD, min_box_centroid, sample_masks
MODEL_INPUTS = ("tag", "geometry", "position", "valid", "images", "has_image", "context", "targets")  # the batch keys a step reads


def mlp(i: int, h: int, o: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, o))


class TokenEmbedding(nn.Module):
    """Entity tokens: tag -> Linear+LN, geometry -> Linear+LN, fused by MLP(2d -> 2d -> d).

    Modality dropout: in training, with probability ``modality_dropout`` one half (tag or
    geometry, 50/50) is zeroed. A variant without geometry feeds zeros in its place.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.tag = nn.Sequential(nn.Linear(cfg.tag_dim, d), nn.LayerNorm(d))
        self.geometry = nn.Sequential(nn.Linear(cfg.geometry_dim, d), nn.LayerNorm(d))
        self.fuse = mlp(2 * d, 2 * d, d)
        self.patches = PatchTokenizer(d) if cfg.uses.images else None

    def forward(self, tag: torch.Tensor, geometry: torch.Tensor, stochastic: bool = True) -> torch.Tensor:
        """(B, L, tag_dim), (B, L, geometry_dim) -> (B, L, d). ``stochastic=False``: no modality dropout."""
        t = self.tag(tag)
        g = self.geometry(geometry) if self.cfg.uses.geometry else torch.zeros_like(t)
        if stochastic and self.training and self.cfg.modality_dropout > 0 and self.cfg.uses.geometry:
            drop = torch.rand(t.shape[0], t.shape[1], 1, device=t.device) < self.cfg.modality_dropout
            which = torch.rand(t.shape[0], t.shape[1], 1, device=t.device) < 0.5
            t = torch.where(drop & which, 0.0, t)
            g = torch.where(drop & ~which, 0.0, g)
        return self.fuse(torch.cat([t, g], dim=-1))


class ConditionalPrior(nn.Module):
    """Added to every token: MLP(position 8 -> 4d -> d) and MLP(modality one-hot), fused by MLP(2d -> 2d -> d),
    GELU, dropout. In training, positions get Gaussian noise (sigma ``position_noise``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.noise = cfg.position_noise
        self.position = mlp(8, 4 * d, d)
        self.modality = mlp(3, d, d)
        self.fuse = mlp(2 * d, 2 * d, d)
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(cfg.dropout))

    def forward(self, position: torch.Tensor, modality: torch.Tensor, stochastic: bool = True) -> torch.Tensor:
        """(B, L, 8), (B, L) long -> (B, L, d). ``stochastic=False``: no position noise, no dropout."""
        stochastic = stochastic and self.training
        if stochastic and self.noise > 0:
            position = position + self.noise * torch.randn_like(position)
        onehot = F.one_hot(modality, 3).to(position.dtype)
        y = self.fuse(torch.cat([self.position(position), self.modality(onehot)], dim=-1))
        return self.out(y) if stochastic else F.gelu(y)


class Block(nn.Module):
    """Pre-norm transformer block; attention through ``scaled_dot_product_attention`` with a key mask."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = mlp(dim, int(dim * mlp_ratio), dim, dropout)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x (B, L, D); keys (B, L) bool: the tokens that may be attended to."""
        b, length, d = x.shape
        keys = keys | ~keys.any(1, keepdim=True)  # a row with no key at all (an empty tile) attends to everything
        q, k, v = self.qkv(self.norm1(x)).reshape(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = keys[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, length, d))
        return x + self.ffn(self.norm2(x))


class Encoder(nn.Module):
    """Depth x Block, final LayerNorm: (B, L, d) -> (B, L, d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, keys)
        return self.norm(x)


class Predictor(nn.Module):
    """Narrow transformer: context outputs and mask tokens (plus the prior) -> predictions at target positions.

    Projects d -> predictor_dim (the prior gets its own projection), prepends ``registers``
    learned tokens, runs ``predictor_depth`` blocks, projects back to d.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        p = cfg.predictor_dim
        self.inp = nn.Linear(cfg.dim, p)
        self.prior = nn.Linear(cfg.dim, p)
        self.mask_token = nn.Parameter(torch.zeros(p))
        self.registers = nn.Parameter(torch.zeros(cfg.registers, p))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.registers, std=0.02)
        self.blocks = nn.ModuleList([Block(p, cfg.predictor_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.predictor_depth)])
        self.norm = nn.LayerNorm(p)
        self.out = nn.Linear(p, cfg.dim)

    def forward(self, context_out: torch.Tensor, prior: torch.Tensor, context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """context_out, prior (N, L, d); context, target (N, L) bool -> (N, L, d) predictions (read at ``target``)."""
        n = context_out.shape[0]
        x = torch.where(context[..., None], self.inp(context_out), self.mask_token.expand(n, context_out.shape[1], -1))
        x = x + self.prior(prior)
        reg = self.registers.expand(n, -1, -1)
        x = torch.cat([reg, x], dim=1)
        keys = torch.cat([torch.ones(n, reg.shape[1], dtype=torch.bool, device=x.device), context | target], dim=1)
        for blk in self.blocks:
            x = blk(x, keys)
        return self.out(self.norm(x[:, reg.shape[1]:]))


def _layout(xp, valid, position, has_image, patch_position):
    """The token layout, in torch or numpy (``xp``): the entity tokens, then, when ``has_image`` (B,) is given,
    each tile's 196 patch tokens at ``patch_position`` (196, 8). Returns (valid, position, modality (int64))."""
    modality = xp.where(valid, OSM, PAD)
    if has_image is None:
        return valid, position, modality
    b = valid.shape[0]
    has = xp.broadcast_to(has_image[:, None], (b, GRID * GRID))
    patches = xp.broadcast_to(patch_position, (b, GRID * GRID, 8))
    return (xp.concatenate([valid, has], axis=1), xp.concatenate([position, patches], axis=1),
            xp.concatenate([modality, xp.where(has, IMG, PAD)], axis=1))


def token_layout(batch: dict, uses_images: bool, patch_position: torch.Tensor | None = None):
    """(valid (B, L'), position (B, L', 8), modality (B, L') long) of a batch's tokens as the model lays them out:
    the entity tokens, then (image variants, when the batch has chips) each tile's 196 patch tokens."""
    valid, position = batch["valid"], batch["position"]
    if not (uses_images and "images" in batch):
        return _layout(torch, valid, position, None, None)
    if patch_position is None:
        patch_position = torch.as_tensor(patch_positions())
    return _layout(torch, valid, position, batch["has_image"], patch_position.to(position.device, position.dtype))


def draw_masks(batch: dict, cfg: ModelConfig, rng: np.random.Generator | int | None = None) -> dict:
    """The batch (CPU tensors) plus ``strategy`` (str), ``context`` (B, L') bool and ``targets`` (B, K, L') bool.

    Numpy only (no torch kernels: see ``masking``), laid out as ``token_layout`` lays them out (the same
    ``_layout``): run where the batch is collated (the loader's thread), so the training step needs no host
    work. ``rng``: a generator or a seed."""
    images = cfg.uses.images and "images" in batch
    valid, position, modality = _layout(np, batch["valid"].numpy(), batch["position"].numpy(),
                                        batch["has_image"].numpy() if images else None, patch_positions() if images else None)
    strategy, context, targets = sample_masks(cfg.mask_mix, valid, min_box_centroid(position), modality, cfg.n_targets,
                                              cfg.target_fraction, cfg.min_context, np.random.default_rng(rng))
    return {**batch, "strategy": strategy, "context": torch.from_numpy(context), "targets": torch.from_numpy(targets)}


class GeoJEPA(nn.Module):
    """Context encoder, EMA target encoder (not trained by gradients) and predictor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = TokenEmbedding(cfg)
        self.prior = ConditionalPrior(cfg)
        self.encoder = Encoder(cfg)
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad_(False)
        self.predictor = Predictor(cfg)
        if cfg.uses.images:  # a constant: a buffer moves with the model and needs no copy per step
            self.register_buffer("patch_position", torch.as_tensor(patch_positions()), persistent=False)

    def train(self, mode: bool = True) -> "GeoJEPA":
        """Train or eval mode for the context path; the target encoder stays in eval mode (no dropout), as in I-JEPA."""
        super().train(mode)
        self.target_encoder.train(False)
        return self

    def tokens(self, batch: dict, stochastic: bool = True):
        """(tokens x (B, L', d), prior (B, L', d), valid (B, L'), position (B, L', 8), modality (B, L')).

        Image variants append each tile's 196 patch tokens (L' = L + 196). ``stochastic=False``: without
        modality dropout, position noise and dropout even in training mode (the target encoder's input)."""
        x = self.embed(batch["tag"], batch["geometry"], stochastic)
        valid, position, modality = token_layout(batch, self.cfg.uses.images, getattr(self, "patch_position", None))
        if valid.shape[1] > x.shape[1]:
            x = torch.cat([x, self.embed.patches(batch["images"])], dim=1)  # (B, 196, d) patch tokens
        prior = self.prior(position, modality, stochastic)
        return x, prior, valid, position, modality

    @torch.no_grad()
    def target_outputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer-normed target-encoder outputs (B, L', d), valid (B, L')): deterministic, whatever the mode.

        The target encoder is always in eval mode and reads the tokens without any of the context
        path's noise, so two passes over one batch give identical outputs."""
        x, prior, valid, _, _ = self.tokens(batch, stochastic=False)
        return F.layer_norm(self.target_encoder(x + prior, valid), (self.cfg.dim,)), valid

    def forward(self, batch: dict, rng: np.random.Generator | int | None = None) -> dict:
        """One training step's losses (see ``losses.jepa_loss``) plus monitoring tensors.

        The masks come from the batch (``draw_masks``, in the loader); without them they are drawn
        here from ``rng`` (a generator or a seed) on the CPU. Outputs: ``loss``, ``smooth_l1``, ``variance``, ``covariance``,
        ``target_out`` (B, L', d) layer-normed target-encoder outputs, ``valid`` (B, L'), ``n_context``, ``n_targets``.
        """
        if "targets" not in batch:
            cpu = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
            masks = draw_masks(cpu, self.cfg, rng)
            device = batch["valid"].device
            batch = {**batch, "context": masks["context"].to(device), "targets": masks["targets"].to(device)}
        context, targets = batch["context"], batch["targets"]
        x, prior, valid, position, modality = self.tokens(batch)
        context_out = self.encoder(x + prior, context)
        target_out, _ = self.target_outputs(batch)
        b, k, length = targets.shape
        rep = lambda t: t[:, None].expand(b, k, *t.shape[1:]).reshape(b * k, *t.shape[1:])  # noqa: E731
        pred = self.predictor(rep(context_out), rep(prior), rep(context), targets.reshape(b * k, length))
        pred = pred.reshape(b, k, length, -1)
        out = jepa_loss(pred, target_out[:, None].expand(b, k, length, -1), targets, context_out, context, self.cfg.vicreg_beta)
        out.update(target_out=target_out.detach(), valid=valid, n_context=context.sum(), n_targets=targets.any(1).sum())
        return out

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * context encoder."""
        targets, sources = list(self.target_encoder.parameters()), [c.detach() for c in self.encoder.parameters()]
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)  # a few fused kernels, not two per tensor

    @torch.no_grad()
    def tile_embedding(self, batch: dict) -> torch.Tensor:
        """(B, 2d): concat(mean, max) over each tile's valid tokens of the target encoder's outputs (padding excluded).

        A tile with no valid token (everything removed by a task's masking) embeds as zeros."""
        out, valid = self.target_outputs(batch)
        m = valid[..., None]
        mean = (out * m).sum(1) / m.sum(1).clamp_min(1)
        mx = out.masked_fill(~m, float("-inf")).amax(1)
        mx = torch.where(torch.isfinite(mx), mx, 0.0)
        return torch.cat([mean, mx], dim=-1)

