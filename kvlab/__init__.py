"""kvlab: a training library for KV-cache-efficient transformers."""

from kvlab.archs import Cache, CausalLM, Footprint, ModelConfig, build_model

__all__ = ["Cache", "CausalLM", "Footprint", "ModelConfig", "build_model"]
__version__ = "0.1.0"
