"""Image tokenizers for the 224 x 224 x 4 chips.

- ``patch`` (the default): each chip is cut into 14 x 14 patches of 16 x 16 x 4 raw values
  (scaled to [0, 1] and normalised per band); ``PatchTokenizer`` is the linear projection of
  a patch to a token. It is learned inside GeoJEPA, so nothing is cached.
- ``vit``: a frozen ``transformers`` ViT (a local path or a hub id; ``HF_HUB_OFFLINE=1`` is
  respected) reads the chip's RGB bands, normalised with the method's mean and std, and
  gives a CLS token plus one token per 16 x 16 patch. These are cached per shard by
  ``tile_tokens``.

Position of an image token (8 numbers, like an entity's min box): the 4 corners of its grid
cell in tile units [0, 1], counter-clockwise from the south-west corner (y up, north); the
CLS token gets the whole tile box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

PATCH_PX = 16
CHIP_PX = 224
GRID = CHIP_PX // PATCH_PX  # 14
RGB_MEAN = (0.4692, 0.4768, 0.4254)  # the method's normalisation (NAIP RGB)
RGB_STD = (0.1064, 0.0799, 0.0815)
NIR_MEAN, NIR_STD = 0.45, 0.15  # NIR: no reference value; a neutral choice for uint8 NIR
BAND_MEAN = torch.tensor(RGB_MEAN + (NIR_MEAN,))
BAND_STD = torch.tensor(RGB_STD + (NIR_STD,))


def normalise(images: torch.Tensor, bands: int = 4) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, bands, H, W) float32, scaled to [0, 1] and normalised per band."""
    x = images[..., :bands].permute(0, 3, 1, 2).float() / 255.0
    return (x - BAND_MEAN[:bands, None, None]) / BAND_STD[:bands, None, None]


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(N, 224, 224, 4) uint8 -> (N, 196, 1024) float32 patches (row-major over the grid, row 0 north)."""
    x = normalise(images)  # (N, 4, 224, 224)
    n, c = x.shape[:2]
    x = x.reshape(n, c, GRID, PATCH_PX, GRID, PATCH_PX).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, GRID * GRID, c * PATCH_PX * PATCH_PX)


def patch_positions() -> np.ndarray:
    """(196, 8) float32 corners of each patch's grid cell in tile units (x east, y north)."""
    rows, cols = np.divmod(np.arange(GRID * GRID), GRID)
    x0, x1 = cols / GRID, (cols + 1) / GRID
    y1, y0 = 1 - rows / GRID, 1 - (rows + 1) / GRID  # row 0 is the northern edge
    return np.stack([x0, y0, x1, y0, x1, y1, x0, y1], axis=1).astype(np.float32)


TILE_BOX = np.array([0, 0, 1, 0, 1, 1, 0, 1], np.float32)


class PatchTokenizer(nn.Module):
    """Linear projection of raw 16 x 16 x 4 patches: (N, 224, 224, 4) uint8 -> (N, 196, dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(4 * PATCH_PX * PATCH_PX, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(images))


class VitTokenizer:
    """A frozen transformers ViT over the chips' RGB: (N, 224, 224, 4) uint8 -> (N, 1 + 196, hidden)."""

    def __init__(self, model: str, device: str = "cpu"):
        from transformers import ViTModel

        from ..errors import GeojepaError

        source = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
        try:
            self.model = ViTModel.from_pretrained(source, add_pooling_layer=False).to(device).eval()
        except Exception as exc:
            raise GeojepaError(f"cannot load ViT {model!r}: {str(exc).splitlines()[0][:200]}; give a local path saved with save_pretrained or a cached hub id") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        if cfg.image_size != CHIP_PX or cfg.patch_size != PATCH_PX or cfg.num_channels != 3:
            raise GeojepaError(f"ViT {model!r} expects {cfg.image_size} px, patch {cfg.patch_size}, {cfg.num_channels} channels; "
                               f"chips are {CHIP_PX} px RGB with patch {PATCH_PX}")
        self.model_id = source
        self.hidden = int(cfg.hidden_size)
        self.device = device

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        """(N, 197, hidden) float32: the CLS token, then the 196 patch tokens row-major from the north-west."""
        out = []
        for start in range(0, len(images), batch):
            x = normalise(torch.from_numpy(np.ascontiguousarray(images[start:start + batch])), bands=3).to(self.device)
            out.append(self.model(pixel_values=x).last_hidden_state.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1 + GRID * GRID, self.hidden), np.float32)
