"""Floor 2: nn.Modules. Token mixers (one file per family), MLPs, norms.

Importing this package registers every mixer family in ``MIXERS``.
"""

# Importing a family registers its mixer kind.
from kvlab.layers.attention import Attention  # noqa: F401
from kvlab.layers.base import MIXERS, LayerFootprint, MixerConfig, mixer_config, register_mixer
from kvlab.layers.delta_net import GatedDeltaNet  # noqa: F401
from kvlab.layers.gau import GAU  # noqa: F401
from kvlab.layers.infini import InfiniAttention  # noqa: F401
from kvlab.layers.mamba import Mamba, Mamba2  # noqa: F401
from kvlab.layers.mla import MLA  # noqa: F401
from kvlab.layers.mlp import MLPConfig, build_mlp
from kvlab.layers.norm import NormConfig, build_norm
from kvlab.layers.parallel import Parallel  # noqa: F401
from kvlab.layers.retention import LightningAttention, Retention  # noqa: F401
from kvlab.layers.rglru import RGLRU  # noqa: F401
from kvlab.layers.rwkv import RWKV6, RWKV7  # noqa: F401
from kvlab.layers.short_conv import ShortConv  # noqa: F401

__all__ = [
    "MIXERS",
    "LayerFootprint",
    "MixerConfig",
    "MLPConfig",
    "NormConfig",
    "build_mlp",
    "build_norm",
    "mixer_config",
    "register_mixer",
]
