"""Footprint: exact against the cache, and against published numbers."""

import pytest
import torch

from kvlab import ModelConfig, build_model
from tests.archs.test_decode import VARIANTS
from tests.conftest import preset_dict


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_equal_footprint(name, dtype):
    model = build_model(VARIANTS[name]).eval()
    fp = model.kv_footprint(dtype)
    cache = model.new_cache(batch_size=3, max_len=20, dtype=dtype)
    assert cache.allocated_bytes() == fp.total_bytes(20, batch_size=3)
    assert cache.nbytes() == fp.total_bytes(0, batch_size=3)  # 0, or the fixed states held from the start
    ids = torch.randint(0, 97, (3, 20))
    seen = 0
    with torch.no_grad():
        for size in [6, 1, 1, 5, 1, 6]:
            model(ids[:, seen : seen + size], cache=cache)
            seen += size
            assert cache.nbytes() == fp.total_bytes(seen, batch_size=3)
    assert cache.allocated_bytes() == fp.total_bytes(20, batch_size=3)


def test_readers_own_no_slot_and_add_nothing():
    model = build_model(VARIANTS["kv_source"])  # kv_source = [0, 0, 0, 3]
    cache = model.new_cache(1, 8)
    assert [s is not None for s in cache.slots] == [True, False, False, True]
    fp = model.kv_footprint(torch.float32)
    assert [r.bytes_per_token for r in fp.per_layer] == [256, 0, 0, 256]  # (K and V) x 2 heads x 16 dims x 4 bytes
    assert [r.kv_source for r in fp.per_layer] == [0, 0, 0, 3]


def test_window_footprint_is_fixed_once_full():
    spec = dict(VARIANTS["hybrid_window"])  # pattern WWG over 4 layers: W W G W
    fp = build_model(spec).kv_footprint(torch.bfloat16)
    window_row = 2 * 1 * 16 * 2  # 1 K/V head of 16 dims, K and V, 2 bytes
    global_row = 2 * 2 * 16 * 2
    assert fp.bytes_per_token == global_row
    assert fp.fixed_bytes == 3 * window_row * 3  # three window layers holding 3 tokens each
    assert fp.total_bytes(2) == 2 * (3 * window_row + global_row)
    assert fp.total_bytes(1000) == 1000 * global_row + fp.fixed_bytes


def test_yoco_caches_one_layer_of_kv_per_token_plus_the_self_decoders_windows():
    fp = build_model(VARIANTS["yoco_swa"]).kv_footprint(torch.bfloat16)  # S S C C, layers 2-3 read layer 2
    assert [r.kv_source for r in fp.per_layer] == [0, 1, 2, 2]
    assert fp.bytes_per_token == 2 * 2 * 16 * 2  # the global K/V: 2 heads of 16, K and V, bf16
    assert fp.fixed_bytes == 2 * (2 * 1 * 16 * 2) * 3  # two window layers, 1 head, holding 3 tokens each


@pytest.mark.parametrize("name", ["retnet", "mamba2", "rwkv6", "rwkv7", "gau"])
def test_pure_recurrent_presets_cache_nothing_per_token(name):
    fp = build_model(preset_dict(name)).kv_footprint(torch.bfloat16)
    assert fp.bytes_per_token == 0
    assert fp.total_bytes(10) == fp.total_bytes(100_000) == fp.fixed_bytes > 0


@pytest.mark.parametrize("name", ["jamba", "yoco_gret", "mixcon"])
def test_a_hybrids_bytes_per_token_are_its_attention_layers_alone(name):
    fp = build_model(preset_dict(name)).kv_footprint(torch.bfloat16)
    # one layer owns growing K/V: 2 K/V heads of 32, K and V, bf16; the recurrent layers are fixed
    assert [r.bytes_per_token > 0 for r in fp.per_layer].count(True) == 1
    assert fp.bytes_per_token == 2 * 2 * 32 * 2
    assert fp.fixed_bytes == sum(r.fixed_bytes for r in fp.per_layer if r.kind != "attention") > 0


def test_parallel_heads_grow_in_their_full_attention_layers_only():
    fp = build_model(preset_dict("parallel_heads")).kv_footprint(torch.bfloat16)  # pattern F S S F S F
    assert [r.bytes_per_token for r in fp.per_layer] == [256, 256, 256, 256, 256, 256]  # every layer's attention
    assert [r.max_tokens for r in fp.per_layer] == [None, 64, 64, None, 64, None]
    assert fp.bytes_per_token == 3 * 2 * 2 * 32 * 2
    assert all(r.fixed_bytes > 0 for r in fp.per_layer)  # the SSM heads' states


def test_hymba_counts_its_meta_tokens_and_shares_its_windows_kv():
    fp = build_model(preset_dict("hymba")).kv_footprint(torch.bfloat16)  # F S S F S S F, kv_source 0 1 1 3 4 4 6
    per_token = 2 * (32 + 64) * 2  # 2 K/V heads, values twice as wide as keys, bf16
    assert [r.bytes_per_token for r in fp.per_layer] == [per_token, per_token, 0, per_token, per_token, 0, per_token]
    assert [r.max_tokens for r in fp.per_layer] == [None, 16 + 128, None, None, 16 + 128, None, None]
    assert [r.entries_before for r in fp.per_layer] == [16, 16, 0, 16, 16, 0, 16]  # the meta tokens
    assert fp.bytes_per_token == 3 * per_token
    mamba = 512 * 16 + 3 * 512  # state and convolution inputs of 512 channels, per layer
    assert fp.fixed_bytes == 7 * mamba * 2 + 3 * 16 * per_token + 2 * (16 + 128) * per_token
    assert fp.total_bytes(1) == 7 * mamba * 2 + 5 * 17 * per_token


def test_rwkv6_shared_mla_caches_one_compressed_latent_per_token_for_all_its_attention_layers():
    fp = build_model(preset_dict("rwkv6_shared_mla")).kv_footprint(torch.bfloat16)
    assert [r.bytes_per_token for r in fp.per_layer] == [0, 0, 0, 0, (16 + 8) * 2, 0]
    assert [r.kv_source for r in fp.per_layer] == [0, 1, 2, 3, 4, 4]


@pytest.mark.parametrize("name", ["samba", "samba_m2"])
def test_samba_cache_stops_growing_at_the_window(name):
    spec = preset_dict(name)
    window = spec["mixers"]["W"]["window"]
    fp = build_model(spec).kv_footprint(torch.bfloat16)
    assert fp.total_bytes(window) == fp.total_bytes(100_000) > fp.total_bytes(window - 1)


def _meta_model(n_heads, n_kv_heads, head_dim, n_layers, **extra):
    cfg = ModelConfig(
        vocab_size=32000,
        d_model=n_heads * head_dim,
        n_layers=n_layers,
        max_seq_len=4096,
        mixer={"kind": "attention", "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim},
        **extra,
    )
    with torch.device("meta"):
        return build_model(cfg)


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,head_dim,extra,expected",
    [
        (16, 16, 128, {}, 163_840),  # CLA Table 1: H128 MHA
        (16, 4, 128, {}, 40_960),  # H128 GQA4
        (16, 1, 128, {}, 10_240),  # H128 MQA
        (32, 1, 64, {}, 5_120),  # H64 MQA
        (16, 1, 128, {"kv_sharing": {"kind": "cla", "every": 2}}, 5_120),  # H128 MQA-CLA2
        (16, 1, 128, {"kv_sharing": {"kind": "cla", "every": 3}}, 3_584),  # H128 MQA-CLA3: 7 KV layers
    ],
)
def test_footprint_reproduces_cla_paper_table1(n_heads, n_kv_heads, head_dim, extra, expected):
    model = _meta_model(n_heads, n_kv_heads, head_dim, 20, **extra)
    assert model.kv_footprint(torch.bfloat16).bytes_per_token == expected


def test_footprint_reproduces_deepseek_v2_mha_row():
    # DeepSeek-V2 Table 9: MHA with 16 heads of 128 over 27 layers caches 110,592 elements per token.
    fp = _meta_model(16, 16, 128, 27).kv_footprint(torch.bfloat16)
    assert fp.bytes_per_token // torch.bfloat16.itemsize == 110_592


@pytest.mark.parametrize("n_layers,elements", [(1, 576), (27, 15_552), (60, 34_560)])
def test_footprint_reproduces_deepseek_v2_mla_row(n_layers, elements):
    # DeepSeek-V2 Table 9: MLA with d_c = 512, d_R = 64 caches (d_c + d_R) elements per token and layer,
    # however many heads (here DeepSeek-V2's 128 heads of 128).
    mla = {
        "kind": "mla",
        "n_heads": 128,
        "head_dim": 128,
        "rope_head_dim": 64,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
    }
    cfg = ModelConfig(vocab_size=32000, d_model=5120, n_layers=n_layers, max_seq_len=4096, mixer=mla)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.kv_footprint(torch.bfloat16).bytes_per_token == elements * 2


def test_meta_device_builds_a_7b_config_without_allocating():
    # Llama-2-7B shapes: 32 layers, 32 heads of 128, MHA: 512 KiB per token in 16-bit.
    cfg = ModelConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        max_seq_len=4096,
        mlp={"hidden": 11008},
        mixer={"kind": "attention", "n_heads": 32},
    )
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert 6.5e9 < model.num_parameters() < 7e9
    fp = model.kv_footprint(torch.float16)
    assert fp.bytes_per_token == 512 * 1024
    assert fp.total_bytes(4096, batch_size=2) == 2 * 4096 * 512 * 1024


@pytest.mark.parametrize("name", ["gqa", "bias_tied"])
def test_meta_model_materialises_with_to_empty(name):
    cfg = ModelConfig.from_dict(VARIANTS[name])
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = build_model(cfg)
    ids = torch.randint(0, 97, (1, 9))
    # Same RoPE tables and a finite forward after materialising.
    torch.testing.assert_close(model.layers[0].mixer.rotary.cos, reference.layers[0].mixer.rotary.cos)
    assert torch.isfinite(model(ids)).all()
    if cfg.tie_embeddings:  # to_empty unties; init_weights ties again
        assert model.lm_head.weight is model.embed_tokens.weight
