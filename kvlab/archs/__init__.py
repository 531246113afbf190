"""Floor 3: models. ModelConfig, the one generic decoder, its cache and footprint."""

from kvlab.archs.cache import Cache
from kvlab.archs.config import KVSharingConfig, ModelConfig
from kvlab.archs.convert import convert_model, fold_kv_merge
from kvlab.archs.footprint import Footprint, FootprintRow
from kvlab.archs.model import CausalLM, build_model

__all__ = [
    "Cache",
    "CausalLM",
    "Footprint",
    "FootprintRow",
    "KVSharingConfig",
    "ModelConfig",
    "build_model",
    "convert_model",
    "fold_kv_merge",
]
