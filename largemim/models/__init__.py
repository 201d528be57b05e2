from largemim.models.sizes import VIT_SIZES, ViTSize
from largemim.models.vit import ViTEncoder

__all__ = ["VIT_SIZES", "ViTSize", "ViTEncoder"]
