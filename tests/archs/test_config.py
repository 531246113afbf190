import pytest
import torch

from kvlab import ModelConfig, build_model
from kvlab.layers import MIXERS
from tests.conftest import PRESETS, REPO, preset_dict, tiny


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_build(name):
    cfg = ModelConfig.from_yaml(REPO / "configs" / "model" / f"{name}.yaml")
    model = build_model(cfg)
    assert 5e6 <= model.num_parameters() <= 21e6  # CPU-sized (the largest, mixcon: jamba and Conba's maps, 20.1M)
    assert model.config is cfg


def test_a_preset_by_name_with_top_level_settings_replaced():
    assert ModelConfig.from_preset("mla") == ModelConfig.from_yaml(REPO / "configs" / "model" / "mla.yaml")
    mixer = {"kind": "attention", "n_heads": 4, "n_kv_heads": 1}
    cfg = ModelConfig.from_preset("reference/llama3_8b", n_layers=2, d_model=64, mixer=mixer)
    assert (cfg.n_layers, cfg.d_model, cfg.mixer.n_kv_heads, cfg.vocab_size) == (2, 64, 1, 128256)
    with pytest.raises(ValueError, match=r"preset 'nope' is not one of kvlab's model presets: .*gqa, .*mla"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match="preset 'gqa': n_layrs: unknown key"):
        ModelConfig.from_preset("gqa", n_layrs=3)
    with pytest.raises(ValueError, match="preset 'goldfinch' was renamed 'rwkv6_shared_mla' on 2026-12-06"):
        ModelConfig.from_preset("goldfinch")


def test_attention_presets_differ_only_in_kv_heads():
    dicts = {name: preset_dict(name) for name in ("mha", "gqa", "mqa")}
    for d in dicts.values():
        d["mixer"].pop("n_kv_heads")
    assert dicts["mha"] == dicts["gqa"] == dicts["mqa"]


def test_round_trip_through_dict():
    for spec in [
        tiny(),
        tiny(kv_sharing={"kind": "cla", "every": 2}),
        tiny(
            mixer=None,
            pattern="AB",
            mixers={"A": {"kind": "attention", "n_heads": 4, "window": 8}, "B": {"kind": "attention", "n_heads": 2}},
        ),
    ]:
        cfg = ModelConfig.from_dict(spec)
        again = ModelConfig.from_dict(cfg.to_dict())
        assert again.to_dict() == cfg.to_dict()
        assert again.layer_kv_source == cfg.layer_kv_source


def test_defaults_are_filled_in():
    cfg = ModelConfig.from_dict(tiny(mixer={"kind": "attention", "n_heads": 4}))
    assert (cfg.mixer.n_kv_heads, cfg.mixer.head_dim, cfg.mixer.rope_dims) == (4, 16, 16)
    assert ModelConfig(d_model=96, mlp={"hidden": None}).mlp.hidden == 256  # 8/3 x 96 rounded up to 64


def test_pattern_is_tiled_to_n_layers():
    cfg = ModelConfig.from_dict(
        tiny(
            n_layers=5,
            mixer=None,
            pattern="LLG",
            mixers={"L": {"kind": "attention", "n_heads": 4, "window": 4}, "G": {"kind": "attention", "n_heads": 4}},
        )
    )
    assert [m.window for m in cfg.layer_mixers] == [4, 4, None, 4, 4]


def test_cla_preset_expands_to_kv_source():
    assert ModelConfig.from_dict(tiny(n_layers=7, kv_sharing={"kind": "cla", "every": 3})).layer_kv_source == [
        0,
        0,
        0,
        3,
        3,
        3,
        6,
    ]


BAD = {
    "indivisible heads": (
        tiny(mixer={"kind": "attention", "n_heads": 8, "n_kv_heads": 3}),
        r"mixer\.n_heads=8 is not divisible by mixer\.n_kv_heads=3",
    ),
    "unknown kind": (tiny(mixer={"kind": "atention"}), r"mixer\.kind='atention' is not a known mixer kind.*attention"),
    "unknown key": (tiny(mixer={"kind": "attention", "n_kv_head": 2}), r"mixer\.n_kv_head: unknown key.*n_kv_heads"),
    "unknown top key": (tiny(n_layer=3), r"n_layer: unknown key"),
    "unknown nested key": (tiny(mlp={"kind": "swiglu", "hiden": 3}), r"mlp\.hiden: unknown key"),
    "head_dim mismatch": (
        tiny(d_model=66, mixer={"kind": "attention", "n_heads": 4}),
        r"d_model=66 is not divisible by mixer\.n_heads=4.*head_dim",
    ),
    "negative size": (tiny(d_model=-8), r"d_model=-8 must be >= 1"),
    "zero layers": (tiny(n_layers=0), r"n_layers=0 must be >= 1"),
    "negative window": (tiny(mixer={"kind": "attention", "n_heads": 4, "window": -1}), r"mixer\.window=-1"),
    "odd rope dims": (tiny(mixer={"kind": "attention", "n_heads": 4, "rope_dims": 7}), r"mixer\.rope_dims=7"),
    "wrong type": (tiny(vocab_size="97"), r"vocab_size='97' must be an integer"),
    "bad norm": (tiny(norm={"kind": "batchnorm"}), r"norm\.kind='batchnorm' is not one of"),
    "bad mlp": (tiny(mlp={"kind": "relu3"}), r"mlp\.kind='relu3' is not one of"),
    "kv_source length": (tiny(kv_source=[0, 0]), r"kv_source has 2 entries.*n_layers=4"),
    "kv_source outside": (
        tiny(kv_source=[0, 5, 2, 3]),
        r"kv_source\[1\]=5: layer 1 cannot read layer 5's K/V: "
        r"there is no layer 5 \(layers 0..3\)",
    ),
    "kv_source chain": (
        tiny(kv_source=[0, 0, 1, 3]),
        r"kv_source\[2\]=1: layer 2 cannot read layer 1's K/V: layer 1 reads layer 0 itself",
    ),
    "kv_source shapes": (
        tiny(
            mixer=None,
            pattern="AB",
            mixers={
                "A": {"kind": "attention", "n_heads": 4},
                "B": {"kind": "attention", "n_heads": 4, "n_kv_heads": 1},
            },
            kv_source=[0, 0, 2, 3],
        ),
        r"kv_source\[1\]=0.*n_kv_heads=1 differs",
    ),
    "both sharing forms": (tiny(kv_source=[0, 0, 2, 2], kv_sharing={"kind": "cla"}), r"kv_source and kv_sharing"),
    "bad sharing kind": (tiny(kv_sharing={"kind": "yolo"}), r"kv_sharing\.kind='yolo'"),
    "pattern name": (
        tiny(mixer=None, pattern="AX", mixers={"A": {"kind": "attention", "n_heads": 4}}),
        r"pattern='AX' uses 'X'",
    ),
    "mixer and pattern": (tiny(pattern="A", mixers={"A": {"kind": "attention"}}), r"mixer and pattern/mixers"),
    "hidden without an mlp": (tiny(mlp={"kind": "none", "hidden": 64}), r"mlp\.hidden=64 is set but mlp\.kind=none"),
    "gqkva heads": (
        tiny(mixer={"kind": "attention", "n_heads": 6, "n_q_heads": 2, "n_kv_heads": 2}),
        r"mixer\.n_heads=6 must be n_q_heads \* n_kv_heads",
    ),
    "mamba2 heads": (tiny(mixer={"kind": "mamba2", "head_dim": 48}), r"expand \* d_model = 128 is not divisible"),
    "rwkv7 value residual over attention": (
        tiny(
            mixer=None,
            pattern="AR",
            mixers={"A": {"kind": "attention", "n_heads": 4}, "R": {"kind": "rwkv7", "head_dim": 16}},
        ),
        r"layer 1 cannot read layer 0's values: rwkv7 with value_residual needs an rwkv7 layer 0 with head_dim=16 "
        r"\(got attention with head_dim=16\)$",
    ),
    "retention decay": (tiny(mixer={"kind": "retention", "decay": "learned"}), r"mixer\.decay='learned' is not one of"),
    "bias on rwkv's channel mix": (
        tiny(mlp={"kind": "rwkv_channel_mix", "bias": True}),
        r"mlp\.bias=True set but mlp\.kind=rwkv_channel_mix",
    ),
    "gelu settings on swiglu": (
        tiny(mlp={"kind": "swiglu", "approximate": "none"}),
        r"mlp\.approximate='none' set but mlp\.kind=swiglu",
    ),
    "bias not a bool": (tiny(mlp={"kind": "geglu", "bias": "yes"}), r"mlp\.bias='yes' must be true or false"),
    "gelu approximation": (tiny(mlp={"kind": "gelu", "approximate": "erf"}), r"mlp\.approximate='erf' is not one of"),
    "swiglu gain without its clamp": (
        tiny(mlp={"kind": "moe", "swiglu_alpha": 1.7}),
        r"mlp\.swiglu_alpha=1\.7 is the gain of gpt-oss's clamped SwiGLU: set mlp\.swiglu_limit too",
    ),
    "learned sinks": (tiny(mixer={"kind": "attention", "learned_sinks": 1}), r"mixer\.learned_sinks=1 must be true or"),
    "yarn truncate": (
        tiny(
            mixer={
                "kind": "attention",
                "rope_scaling": {
                    "kind": "yarn",
                    "factor": 4.0,
                    "original_max_seq_len": 16,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "attention_factor": 1.1,
                    "truncate": "no",
                },
            }
        ),
        r"mixer\.rope_scaling\.truncate='no' must be true or false",
    ),  # fmt: skip
    "unit offset on a layernorm": (tiny(norm={"kind": "layernorm", "unit_offset": True}), r"norm\.unit_offset=true"),
    "qk norm offset without norms": (
        tiny(mixer={"kind": "attention", "qk_norm_unit_offset": True}),
        r"mixer\.qk_norm_unit_offset=true without mixer\.qk_norm",
    ),
    "embed scale": (tiny(embed_scale=-2.0), r"embed_scale=-2.0"),
    "qk norm span without norms": (
        tiny(mixer={"kind": "attention", "qk_norm_over": "projection"}),
        r"mixer\.qk_norm_over='projection' without mixer\.qk_norm",
    ),
    "qk norm span over merged heads": (
        tiny(mixer={"kind": "attention", "qk_norm": True, "qk_norm_over": "projection", "kv_merge": 2}),
        r"kv_merge=2 \(WGQA\) projects more heads",
    ),
    "softmax scale": (tiny(mixer={"kind": "attention", "softmax_scale": 0.0}), r"mixer\.softmax_scale=0.0"),
    "parallel block without an mlp": (
        tiny(
            parallel_residual=True,
            mixer=None,
            mixers={"A": {"kind": "attention"}},
            pattern="A",
            layers=None,
            mlp_pattern="DN",
            mlps={"D": {"kind": "swiglu"}, "N": {"kind": "none"}},
        ),
        r"parallel_residual=true, but layers \[1, 3\] have no MLP",
    ),  # fmt: skip
    "norm pattern letters": (tiny(norm_pattern="PX"), r"norm_pattern='PX' must be a non-empty string of P"),
    "norm pattern beside pre_norms": (tiny(norm_pattern="PO", pre_norms=False, post_norms=True),
                                      r"norm_pattern='PO' places every layer's norms: leave pre_norms true"),
    "residual alpha alone": (tiny(residual_alpha=2.0), r"residual_alpha=2.0 scales the normalised residual: it needs "
                             r"normed_residual: true"),
    "normed residual after post norms": (tiny(normed_residual=True, norm_pattern="PO"),
                                         r"normed_residual=true .* no O in norm_pattern"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_names_the_field(case):
    spec, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(spec)


def test_attention_is_registered():
    assert MIXERS["attention"].Config.kind == "attention"


@pytest.mark.parametrize("name", ["gqa", "retnet", "rwkv7"])
def test_with_params_widens_the_mlp_to_a_parameter_count(name):
    cfg = ModelConfig.from_dict(preset_dict(name))
    target = 9_000_000
    wider = cfg.with_params(target)
    with torch.device("meta"):
        params = build_model(wider).num_parameters()
        step = build_model(wider.with_params(target + 10**6)).num_parameters() - params  # a million more, about
    assert wider.mlp.hidden > cfg.mlp.hidden and wider.mlp.hidden % 8 == 0
    layers, d = cfg.n_layers, cfg.d_model
    per_unit = {"swiglu": 3, "rwkv_channel_mix": 2}[cfg.mlp.kind] * d * layers  # parameters per hidden unit
    assert abs(params - target) <= 4 * per_unit
    assert abs(step - 10**6) <= 8 * per_unit
    with pytest.raises(ValueError, match="mlp.kind=none has no width"):
        ModelConfig.from_dict(preset_dict("gau")).with_params(target)


def test_norm_pattern_places_each_layers_norms():
    """P: norms before the mixer and the MLP (Llama's), O: on their outputs alone (OLMo 2's), tiled to n_layers."""
    model = build_model(tiny(n_layers=3, norm_pattern="PO"))
    placed = [(type(b.mixer_norm).__name__, b.mixer_post_norm is not None, b.mlp_post_norm is not None)
              for b in model.layers]  # fmt: skip
    assert placed == [("RMSNorm", False, False), ("Identity", True, True), ("RMSNorm", False, False)]
