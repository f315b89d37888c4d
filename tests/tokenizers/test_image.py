"""Image tokenizers: raw patches with their grid cells, and a frozen ViT saved locally (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geojepa_pipeline.errors import GeojepaError
from geojepa_pipeline.tokenizers.image import (
    GRID, TILE_BOX, PatchTokenizer, VitTokenizer, patch_positions, patchify,
)


def test_patchify_keeps_band_order_and_grid_order():
    images = np.zeros((1, 224, 224, 4), np.uint8)
    images[0, :16, 16:32, 3] = 255  # NIR in the patch of row 0 (north), column 1
    patches = patchify(torch.from_numpy(images))
    assert patches.shape == (1, 196, 1024)
    hot = patches[0].reshape(196, 4, 256)[:, 3].mean(1)
    assert int(hot.argmax()) == 1 and hot[1] > hot[0] + 1
    pos = patch_positions()
    assert pos.shape == (196, 8) and np.allclose(pos[1], [1 / 14, 13 / 14, 2 / 14, 13 / 14, 2 / 14, 1, 1 / 14, 1])
    assert pos[-1][1] == 0 and TILE_BOX.tolist() == [0, 0, 1, 0, 1, 1, 0, 1]


def test_patch_tokenizer_is_trainable():
    tok = PatchTokenizer(32)
    out = tok(torch.randint(0, 255, (2, 224, 224, 4), dtype=torch.uint8))
    assert out.shape == (2, GRID * GRID, 32)
    out.sum().backward()
    assert tok.proj.weight.grad is not None


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    path = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    image_size=224, patch_size=16, num_channels=3)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    return path


def test_vit_tokenizer_is_frozen_and_gives_cls_plus_patches(tiny_vit):
    vit = VitTokenizer(str(tiny_vit))
    images = np.random.default_rng(0).integers(0, 255, (3, 224, 224, 4)).astype(np.uint8)
    out = vit.encode(images, batch=2)
    assert out.shape == (3, 1 + 196, 32) and np.isfinite(out).all()
    assert np.array_equal(out, vit.encode(images))  # frozen, eval mode
    assert not any(p.requires_grad for p in vit.model.parameters())
    changed = images.copy()
    changed[..., 3] = 0  # NIR is not a ViT input
    assert np.allclose(vit.encode(changed), out)


def test_vit_with_wrong_geometry_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=8), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(GeojepaError, match="expects 64 px"):
        VitTokenizer(str(tmp_path))
    with pytest.raises(GeojepaError, match="cannot load ViT"):
        VitTokenizer(str(tmp_path / "missing"))
