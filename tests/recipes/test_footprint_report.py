"""python -m kvlab.footprint: published footprints, budgets, reads per step, JSON, errors."""

import json
import subprocess
import sys

import pytest

from kvlab.recipes.footprint import main, parse_bytes
from tests.conftest import REPO


def report(capsys, *args: str) -> dict:
    main([*args, "--json", "-"])
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


@pytest.mark.parametrize(
    "model,per_token",
    [
        ("reference/llama2_7b", 512 * 1024),  # MHA: 2 x 32 layers x 32 heads x 128 x 2 bytes
        ("reference/llama3_8b", 128 * 1024),  # GQA-8
        ("reference/deepseek_v2", 576 * 60 * 2),  # MLA: 512 latent + 64 RoPE key, 60 layers
    ],
)
def test_reference_configs_reproduce_published_footprints(capsys, model, per_token):
    r = report(capsys, f"model={model}")
    assert r["bytes_per_token"] == per_token
    assert r["total_bytes"]["32768"] == per_token * 32768


def test_llama2_7b_has_its_parameter_count(capsys):
    assert report(capsys, "model=reference/llama2_7b")["params"] == 6_738_415_616


def test_budget_gives_the_largest_batch_that_fits(capsys):
    r = report(capsys, "model=reference/llama3_8b", "--budget", "80GiB", "--context", "32768")
    assert r["budget"]["max_batch_size"] == 20  # 4 GiB per sequence at 32K tokens


def test_cross_layer_readers_read_what_they_do_not_store(capsys):
    r = report(capsys, "model=cla")  # MQA-CLA2: 3 owners, 6 readers
    assert r["read_bytes_per_decode_step"]["2048"] == 2 * r["total_bytes"]["2048"]


def test_overrides_and_dtype(capsys):
    r = report(capsys, "model=gqa", "model.n_layers=12", "--dtype", "fp32")
    assert r["bytes_per_token"] == 12 * 2 * 2 * 32 * 4


def test_recurrent_models_fit_any_batch_per_token(capsys):
    r = report(capsys, "model=mamba2", "--budget", "1GiB")
    assert r["bytes_per_token"] == 0 and r["total_bytes"]["2048"] == r["total_bytes"]["1048576"] > 0


def test_sizes_parse():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    with pytest.raises(ValueError, match="--budget='lots' is not a size"):
        parse_bytes("lots")


def test_bad_config_is_one_line_naming_the_field():
    proc = subprocess.run([sys.executable, "-m", "kvlab.footprint", "model=gqa", "model.mixer.n_kv_heads=3"],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1
    assert "kvlab: error: mixer.n_heads=8 is not divisible by mixer.n_kv_heads=3" in proc.stderr


def test_a_cache_policy_counts_its_codes_scales_and_residual(capsys):
    # Llama-2-7B, 32 layers x 32 heads x 128 channels, keys and values; bf16 scales and zero points
    r = report(capsys, "model=reference/llama2_7b", "--policy", "int4")
    assert r["bytes_per_token"] == 32 * 32 * 2 * (64 + 2 * 2) and r["dtype"] == "bfloat16, K/V int4"
    r = report(capsys, "model=reference/llama2_7b", "--policy", '{"kind": "kivi", "bits": 2}')
    # KIVI-2 (group 32, residual 128): after 2,048 tokens all 2,048 keys and 1,920 values are codes
    keys = 2048 * 128 * 2 // 8 + 128 * (2048 // 32) * 2 * 2
    values = 1920 * (128 * 2 // 8 + 128 // 32 * 2 * 2) + 128 * 128 * 2
    assert r["total_bytes"]["2048"] == 32 * 32 * (keys + values)


def test_a_hugging_face_config_as_load_hf_imports_it(capsys, tmp_path):
    """--hf: Gemma 3 1B's shapes (written by transformers' own config class: no weights anywhere): 22 layers of
    512-token windows, 4 full layers (every sixth), one K/V head of 256."""
    transformers = pytest.importorskip("transformers")
    transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6,
        max_position_embeddings=32768,
    ).save_pretrained(tmp_path)  # fmt: skip
    r = report(capsys, "--hf", str(tmp_path))
    per_layer = 2 * 256 * 2  # K and V, one head of 256, bf16
    assert [row["max_tokens"] for row in r["layers"]].count(512) == 22
    assert r["total_bytes"]["32768"] == 4 * per_layer * 32768 + 22 * per_layer * 512
    assert r["params"] == 999_885_952  # Gemma 3 1B's count (its embeddings tied)
    with pytest.raises(SystemExit):
        main(["--hf", str(tmp_path), "model=gqa"])
    assert "--hf gives the model; the overrides model=gqa would be ignored" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    ["deepseek-v2-lite", "mixtral-8x7b", "gemma-2-2b", "qwen1.5-moe-a2.7b", "phi-4-mini", "mamba-130m", "gpt-oss-20b",
     "qwen3-next-80b-a3b", "recurrentgemma-2b", "lfm2-1.2b", "minimax-text-01", "minimax-m1"],
)  # fmt: skip
def test_hugging_face_configs_of_mla_and_experts_count_as_published(capsys, tmp_path, case):
    """--hf on the hub's own config.json of DeepSeek-V2-Lite (MLA: 576 elements a token and layer, DeepSeek-V2's
    Table 9, over 27 layers; its YaRN; 15.7B parameters), of Mixtral 8x7B (8 K/V heads of 128 over 32 layers;
    46.7B parameters) and of Gemma 2 2B (4 K/V heads of 256 in 13 full layers, 13 of 4,096-token windows; 2.61B
    parameters, its embeddings tied) and of Qwen1.5-MoE-A2.7B (MHA, 16 heads of 128 over 24 layers; 60 experts
    beside a gated shared expert: 14.3B parameters) and of Phi-4-mini (8 K/V heads of 128 over 32 layers, RoPE
    on three quarters of each with LongRoPE's 48 factors, placeholders here; its window past its context, so full
    attention; 3.84B parameters, tied) and of Mamba-130M (24 layers of 1,536 channels, a 16-wide state and 3
    convolution inputs each, nothing per token; 129M parameters) and of gpt-oss-20b and -120b (8 K/V heads of 64 in
    12 or 18 full layers, as many of 128-token windows; 32 or 128 experts with biases; 20.9B and 116.8B parameters,
    as its model card and `transformers`' count of its class on these configs give; its MXFP4 quantization_config
    read) and of Qwen3-Next-80B-A3B (2 K/V heads of 256 in 12 full attention layers; 36 gated DeltaNet layers of 32
    states of 128 x 128 and 3 convolution inputs of 8,192 channels; 512 experts and a gated shared one: 79.67B
    parameters, its card's 80B and `transformers`' count of its class on this config) and of RecurrentGemma-2B (18
    RG-LRU layers of 2,560 states and 3 convolution inputs; 8 MQA layers of 2,048-token windows, one K/V head of 256:
    nothing per token past the windows; 2.68B parameters, its paper's 2.7B and `transformers`' count) and of LFM2-1.2B
    (6 GQA layers of 8 K/V heads of 64; 10 gated convolutions holding 2 inputs of 2,048 channels; its SwiGLU's width
    derived from block_ff_dim; 1,170,340,608 parameters, its model card's and `transformers`' count) and of
    MiniMax-Text-01 (8 K/V heads of 128 in 10 softmax layers; 70 lightning layers of 64 states of 128 x 128; 32
    experts in every layer: 456.09B parameters, its paper's 456B and `transformers`' count; MiniMax-M1's remote-code
    config.json, the same layers in its own fields, alike): the caches and parameter counts their papers give."""
    config = {
        "deepseek-v2-lite": {
            "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
            "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6,
            "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
            "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
            "routed_scaling_factor": 1.0, "topk_method": "greedy", "norm_topk_prob": False, "scoring_func": "softmax",
            "tie_word_embeddings": False,
        },
        "mixtral-8x7b": {
            "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
            "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1e6, "sliding_window": None,
            "tie_word_embeddings": False,
        },
        "gemma-2-2b": {
            "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
            "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "query_pre_attn_scalar": 256, "sliding_window": 4096, "max_position_embeddings": 8192,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
        },
        "qwen1.5-moe-a2.7b": {
            "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
            "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
            "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
            "decoder_sparse_step": 1, "norm_topk_prob": False, "max_position_embeddings": 8192,
            "max_window_layers": 21, "sliding_window": 32768, "use_sliding_window": False, "rope_theta": 1e6,
            "tie_word_embeddings": False,
        },
        "phi-4-mini": {
            "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
            "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
        },
        "mamba-130m": {
            "model_type": "mamba", "vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24,
            "state_size": 16, "expand": 2, "conv_kernel": 4, "time_step_rank": 48, "layer_norm_epsilon": 1e-5,
            "use_bias": False, "use_conv_bias": True, "tie_word_embeddings": True,
        },
        "gpt-oss-20b": {
            "model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
            "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
            "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4, "attention_bias": True,
            "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 12,
            "max_position_embeddings": 131072, "rope_theta": 150000, "rope_scaling": {
                "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                "rope_type": "yarn", "truncate": False},
            "swiglu_limit": 7.0, "router_aux_loss_coef": 0.9, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]},
        },
        "qwen3-next-80b-a3b": {
            "model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120,
            "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
            "full_attention_interval": 4, "partial_rotary_factor": 0.25, "rope_theta": 10000000,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
            "linear_num_value_heads": 32, "linear_value_head_dim": 128, "num_experts": 512, "num_experts_per_tok": 10,
            "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": False,
        },
        "recurrentgemma-2b": {
            "model_type": "recurrent_gemma", "vocab_size": 256000, "hidden_size": 2560, "intermediate_size": 15360,
            "num_hidden_layers": 26, "num_attention_heads": 10, "num_key_value_heads": 1, "lru_width": 2560,
            "attention_window_size": 2048, "block_types": ["recurrent", "recurrent", "attention"],
            "conv1d_width": 4, "logits_soft_cap": 30.0, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
        },
        "lfm2-1.2b": {
            "model_type": "lfm2", "vocab_size": 65536, "hidden_size": 2048, "block_ff_dim": 12288,
            "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0, "block_multiple_of": 256,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "conv_L_cache": 3,
            "conv_bias": False, "layer_types": ["conv", "conv", "full_attention"] * 3 + ["conv", "full_attention"] * 3
            + ["conv"], "max_position_embeddings": 128000, "norm_eps": 1e-5, "rope_theta": 1e6, "tie_embedding": True,
        },
        "minimax-text-01": {
            "model_type": "minimax", "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 9216,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
            "num_local_experts": 32, "num_experts_per_tok": 2, "layer_types": (["linear_attention"] * 7
            + ["full_attention"]) * 10, "rotary_dim": 64, "rope_theta": 10000000, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 10240000, "tie_word_embeddings": False, "block_size": 256,
            **dict.fromkeys(("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"),
                            3.5565588200778455),
        },
        "minimax-m1": {
            "model_type": "minimax_m1", "vocab_size": 200064, "hidden_size": 6144, "intermediate_size": 9216,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
            "num_local_experts": 32, "num_experts_per_tok": 2, "attn_type_list": ([0] * 7 + [1]) * 10,
            "rotary_dim": 64, "rope_theta": 10000000, "rms_norm_eps": 1e-5, "max_position_embeddings": 10240000,
            "tie_word_embeddings": False, "postnorm": True, "shared_intermediate_size": 0,
            **{f"layernorm_{kind}_{which}": 3.5565588200778455 if which == "alpha" else 1.0
               for kind in ("full_attention", "linear_attention", "mlp") for which in ("alpha", "beta")},
        },
    }[case]  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = report(capsys, "--hf", str(tmp_path))
    per_token, params = {"deepseek-v2-lite": (576 * 27 * 2, 15_706_484_224),
                         "mixtral-8x7b": (2 * 8 * 128 * 32 * 2, 46_702_792_704),
                         "gemma-2-2b": (2 * 4 * 256 * 13 * 2, 2_614_341_888),
                         "qwen1.5-moe-a2.7b": (2 * 16 * 128 * 24 * 2, 14_315_784_192),
                         "phi-4-mini": (2 * 8 * 128 * 32 * 2, 3_836_021_760),
                         "mamba-130m": (0, 129_135_360),
                         "gpt-oss-20b": (2 * 8 * 64 * 12 * 2, 20_914_757_184),
                         "qwen3-next-80b-a3b": (2 * 2 * 256 * 12 * 2, 79_674_391_296),
                         "recurrentgemma-2b": (0, 2_682_862_080),
                         "lfm2-1.2b": (2 * 8 * 64 * 6 * 2, 1_170_340_608),
                         "minimax-text-01": (2 * 8 * 128 * 10 * 2, 456_089_655_296),
                         "minimax-m1": (2 * 8 * 128 * 10 * 2, 456_089_655_296)}[case]  # fmt: skip
    assert (r["bytes_per_token"], r["params"]) == (per_token, params)
    if case == "gemma-2-2b":
        assert r["fixed_bytes"] == 13 * 4096 * 2 * 4 * 256 * 2  # the windows, once full
    if case == "recurrentgemma-2b":  # the windows once full, and per RG-LRU layer its states and convolution inputs
        assert r["fixed_bytes"] == 8 * 2048 * 2 * 256 * 2 + 18 * (2560 + 3 * 2560) * 2
    if case == "lfm2-1.2b":
        assert r["fixed_bytes"] == 10 * 2 * 2048 * 2
    if case.startswith("minimax"):
        assert r["fixed_bytes"] == 70 * 64 * 128 * 128 * 2
    if case == "mamba-130m":
        assert r["fixed_bytes"] == 24 * 1536 * (16 + 3) * 2  # the state and the convolution's inputs, bf16
    if case == "qwen3-next-80b-a3b":  # the states and the convolution's inputs (q, k and v: 2 x 2,048 + 4,096)
        assert r["fixed_bytes"] == 36 * (32 * 128 * 128 + 3 * 8192) * 2
    if case == "gpt-oss-20b":
        assert r["fixed_bytes"] == 12 * 128 * 2 * 8 * 64 * 2  # the windows, once full
        # gpt-oss-120b: the same layers, 36 of them, 128 experts (116.83B parameters, its model card's)
        bigger = {"num_hidden_layers": 36, "num_local_experts": 128, "layer_types": config["layer_types"][:2] * 18}
        (tmp_path / "config.json").write_text(json.dumps(config | bigger))
        r = report(capsys, "--hf", str(tmp_path))
        assert (r["bytes_per_token"], r["params"], r["fixed_bytes"]) == (
            2 * 8 * 64 * 18 * 2, 116_829_156_672, 18 * 128 * 2 * 8 * 64 * 2)  # fmt: skip
