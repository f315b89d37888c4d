"""Model configuration, presets (``tiny``, ``thesis``) and variants (which modalities are fed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple


class Modalities(NamedTuple):
    """Which inputs a variant feeds the model."""

    tags: bool
    geometry: bool
    images: bool


VARIANTS = {  # variant -> the modalities it feeds
    "T": Modalities(tags=True, geometry=False, images=False),
    "GT": Modalities(tags=True, geometry=True, images=False),
    "TI": Modalities(tags=True, geometry=False, images=True),
    "GTI": Modalities(tags=True, geometry=True, images=True),
}

DEFAULT_PRESET = "tiny"
# how a training step runs: eager, torch.compile, or compiled + CUDA graphs per length bucket (a GPU's fast path)
COMPILE_MODES = ("none", "default", "reduce-overhead")

# masking mixes (probability of each strategy per batch), from the method note
MASK_MIX_OSM = {"random": 0.31, "area": 0.69, "modality": 0.0}
MASK_MIX_WITH_IMAGES = {"random": 0.27, "area": 0.65, "modality": 0.08}


@dataclass(frozen=True)
class ModelConfig:
    """Sizes in tokens / features; probabilities in [0, 1]."""

    dim: int = 384  # d
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    predictor_dim: int = 192
    predictor_depth: int = 4
    predictor_heads: int = 8
    registers: int = 2
    tag_dim: int = 384  # input tag token size (the tag embedding model's)
    geometry_dim: int = 64  # input geometry token size (the PolygonGNN's)
    variant: str = "GT"
    modality_dropout: float = 0.3
    position_noise: float = 5e-4
    n_targets: int = 4
    target_fraction: float = 0.45
    min_context: float = 0.12
    vicreg_beta: float = 0.02
    mask_mix: dict = field(default_factory=lambda: dict(MASK_MIX_OSM))

    @property
    def uses(self) -> Modalities:
        """The variant's modalities: ``cfg.uses.geometry``, ``cfg.uses.images``."""
        return VARIANTS[self.variant]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # small enough to train the demo regions on 2 CPU cores in minutes
    "tiny": ModelConfig(dim=64, depth=2, heads=4, predictor_dim=32, predictor_depth=1, predictor_heads=4),
    # the thesis sizes: d 384, depth 12, 8 heads, predictor 192 / depth 4
    "thesis": ModelConfig(),
}


def model_config(preset: str, variant: str, **overrides) -> ModelConfig:
    """The preset's config for ``variant``; a variant with images gets the mix that includes modality masking."""
    from ..errors import GeojepaError

    if preset not in PRESETS:
        raise GeojepaError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    if variant not in VARIANTS:
        raise GeojepaError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    mix = dict(MASK_MIX_WITH_IMAGES if VARIANTS[variant].images else MASK_MIX_OSM)
    return replace(PRESETS[preset], variant=variant, mask_mix=mix, **overrides)
