"""GeoJEPA: variants run forward and backward, the EMA target, padding-free tile embeddings, losses, schedules."""

from __future__ import annotations

import pytest
import torch

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.model.config import PRESETS, model_config
from geojepa_pipeline.model.geojepa import GeoJEPA
from geojepa_pipeline.model.losses import covariance_term, effective_rank, variance_term
from geojepa_pipeline.model.schedules import ema_momentum, learning_rate, weight_decay


def batch(B=6, L=30, seed=0, images=False):
    g = torch.Generator().manual_seed(seed)
    valid = torch.arange(L)[None] < torch.randint(4, L, (B, 1), generator=g)
    out = dict(tag=torch.randn(B, L, 384, generator=g), geometry=torch.randn(B, L, 64, generator=g),
               position=torch.rand(B, L, 8, generator=g), valid=valid)
    if images:
        out.update(images=torch.randint(0, 255, (B, 224, 224, 4), dtype=torch.uint8, generator=g),
                   has_image=torch.arange(B) % 3 != 0)
    return out


@pytest.mark.parametrize("variant", ["T", "GT", "TI", "GTI"])
def test_variants_train_one_step(variant):
    torch.manual_seed(0)
    model = GeoJEPA(model_config("tiny", variant))
    out = model(batch(images="I" in variant), torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["strategy"] in ("random", "area", "modality")
    out["loss"].backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())  # the target learns by EMA only
    assert model.encoder.blocks[0].qkv.weight.grad is not None
    uses_geometry = model.embed.geometry[0].weight.grad is not None
    assert uses_geometry == ("G" in variant)


def test_ema_moves_the_target_towards_the_encoder():
    model = GeoJEPA(model_config("tiny", "GT"))
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    t0 = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for before, t, c in zip(t0, model.target_encoder.parameters(), model.encoder.parameters()):
        assert torch.allclose(t, 0.9 * before + 0.1 * c)


def test_tile_embedding_ignores_padding():
    model = GeoJEPA(model_config("tiny", "GT")).eval()
    b = batch()
    e1 = model.tile_embedding(b)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["tag"][~b2["valid"]] = 100.0  # garbage in the padding
    assert e1.shape == (6, 128) and torch.allclose(e1, model.tile_embedding(b2), atol=1e-5)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GeoJEPA(model_config("tiny", "GT", dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = batch(B=16, L=24)
    losses = []
    for step in range(40):
        out = model(b, torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_target(0.99)
        losses.append(float(out["smooth_l1"]))
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5  # the targets move too (EMA), so a modest fall


def test_loss_terms_and_effective_rank():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(4000, 16, generator=g)
    assert variance_term(white) < 0.5 and covariance_term(white) < 0.05
    collapsed = torch.zeros(100, 16) + 0.001 * torch.randn(100, 16, generator=g)
    assert variance_term(collapsed) > 20
    assert effective_rank(white) > 14 and effective_rank(torch.randn(100, 1, generator=g).expand(100, 16)) < 1.5


def test_schedules_and_presets():
    assert learning_rate(0, 100) == pytest.approx(1e-4) and learning_rate(10, 100) == pytest.approx(1e-3)
    assert learning_rate(100, 100) == pytest.approx(1e-6)
    assert weight_decay(0, 10) == 0.04 and weight_decay(10, 10) == pytest.approx(0.4)
    assert ema_momentum(0, 10) == 0.997 and ema_momentum(10, 10) == pytest.approx(0.99999)
    thesis = PRESETS["thesis"]
    assert (thesis.dim, thesis.depth, thesis.heads, thesis.predictor_dim, thesis.predictor_depth) == (384, 12, 8, 192, 4)
    assert model_config("tiny", "GTI").mask_mix["modality"] > 0 and model_config("tiny", "GT").mask_mix["modality"] == 0
    with pytest.raises(GeojepaError):
        model_config("huge", "GT")
