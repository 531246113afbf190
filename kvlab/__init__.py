"""kvlab: a training library for KV-cache-efficient transformers."""

from kvlab import _auto
from kvlab.archs import Cache, CausalLM, Footprint, ModelConfig, build_model

_auto.install()  # AutoModelForCausalLM loads kvlab exports (model_type kvlab) once transformers is imported

__all__ = ["Cache", "CausalLM", "Footprint", "ModelConfig", "build_model"]
__version__ = "0.1.0"
