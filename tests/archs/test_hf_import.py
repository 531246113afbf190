"""load_hf: logits equal `transformers` on the same tokens for Llama-family and dense DeepSeek-V3 directories."""

import json
import math
import re

import pytest
import torch

from kvlab import build_model
from kvlab.archs.hf import hf_to_kvlab_name, kvlab_to_hf_name, load_hf, save_hf
from tests.conftest import tiny

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=128, rms_norm_eps=1e-6)  # fmt: skip

CASES = {
    "llama-gqa": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_theta=5000.0)),
    "llama-mha-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-bias": (transformers.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True)),
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    # transformers puts Qwen2's windows on the layers from max_window_layers on: all of them here, none below
    "qwen2-window": (transformers.Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                                    max_window_layers=0)),
    "qwen2-window-on-no-layer": (transformers.Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=True,
                                                                sliding_window=5, max_window_layers=3)),
    # windows on some layers only, as transformers reads them (layer_types, else from max_window_layers on)
    "qwen2-window-on-some-layers": (transformers.Qwen2Config, dict(num_key_value_heads=2, use_sliding_window=True,
                                                                   sliding_window=5, max_window_layers=1)),
    "qwen3-windows-alternating": (transformers.Qwen3Config, dict(
        num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "ministral-windows-alternating": (transformers.MinistralConfig, dict(
        num_key_value_heads=2, head_dim=16, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # SmolLM3: RoPE left out of every other layer (no_rope_layer_interval), a window on those, biases
    "smollm3-nope": (transformers.SmolLM3Config, dict(
        num_key_value_heads=2, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=5,
        attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # a window over more positions than the model takes (Mistral's default 4096 on a shorter model): full attention
    "mistral-window-past-every-position": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=256)),
    # per-head query and key norms before RoPE (Qwen3's q_norm, k_norm), with and without biases
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=32)),
    "qwen3-bias": (transformers.Qwen3Config, dict(num_key_value_heads=1, attention_bias=True)),
    # Phi-3: fused qkv_proj and gate_up_proj, split on import; a sliding window; Phi-4-mini's partial RoPE
    "phi3-window": (transformers.Phi3Config, dict(num_key_value_heads=2, sliding_window=7, pad_token_id=0)),
    "phi3-partial-rope": (transformers.Phi3Config, dict(num_key_value_heads=1, partial_rotary_factor=0.75,
                                                        sliding_window=None, pad_token_id=0)),
    "smollm-style": (transformers.LlamaConfig, dict(num_key_value_heads=1, head_dim=32, tie_word_embeddings=True)),
    # MLA; DeepSeek's own checkpoints rotate neighbouring RoPE channels (rope_interleave), which import reorders
    **{
        f"deepseek-v3-{name}": (transformers.DeepseekV3Config, dict(
            num_key_value_heads=4, first_k_dense_replace=3, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=q_lora_rank, rope_interleave=interleave))
        for name, q_lora_rank, interleave in [("interleaved", None, True), ("q-lora", 24, False)]
    },
    # with MoE above the first layer: 8 experts in 4 groups (tokens choose from the best 2), top 2 renormalised
    # and scaled, a shared expert, and a score bias that moves the choice
    "deepseek-v3-moe": (transformers.DeepseekV3Config, dict(
        num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    # DeepSeek-V2/V3's YaRN (factor 40 in their configs; 4 over 16 positions here), its mscale_all_dim folded into
    # the softmax scale, mscale over it the RoPE tables' attention factor
    "deepseek-v3-yarn": (transformers.DeepseekV3Config, dict(
        num_key_value_heads=4, first_k_dense_replace=3, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32,
                                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7,
                                        "original_max_position_embeddings": 16})),
    # DeepSeek-V2 (V2-Lite's layout): neighbouring RoPE pairs always, a dense first layer, then experts routed by
    # softmax, the top 2 of 4 scaled and not renormalised, a shared expert; and its YaRN
    "deepseek-v2": (transformers.DeepseekV2Config, dict(
        num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.7,
                         "mscale_all_dim": 0.7, "original_max_position_embeddings": 16})),
    # DeepSeek-V2's (236B, V2.5) group-limited choice: the 2 of 4 groups with the best single scores
    "deepseek-v2-groups": (transformers.DeepseekV2Config, dict(
        num_key_value_heads=4, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        moe_intermediate_size=32, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    # GPT-NeoX (Pythia): LayerNorms, attention beside a biased GELU MLP, RoPE on a quarter of each head, q/k/v
    # fused head by head; and its sequential block with tanh's GELU and a tied head
    "gpt-neox-pythia": (transformers.GPTNeoXConfig, dict(rotary_pct=0.25, rotary_emb_base=5000)),
    "gpt-neox-sequential": (transformers.GPTNeoXConfig, dict(use_parallel_residual=False, hidden_act="gelu_new",
                                                             tie_word_embeddings=True, rotary_pct=0.5)),
    # Gemma 3: windows on layers 0 and 2 (with their own RoPE base), full attention on layer 1; sandwich norms
    # weighing by 1 + w, query and key norms, GeGLU, embeddings times sqrt(hidden_size)
    "gemma3": (transformers.Gemma3TextConfig, dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                                   sliding_window=5, sliding_window_pattern=2, rope_theta=20000.0,
                                                   rope_local_base_freq=500.0)),
    # Gemma 3 27B's scale: scores over sqrt(query_pre_attn_scalar), not sqrt(head_dim)
    "gemma3-scalar": (transformers.Gemma3TextConfig, dict(num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=21,
                                                          sliding_window=5, sliding_window_pattern=3)),
    # Gemma 1: Llama's block with Gemma's norms, GeGLU and scaled embeddings; Gemma 2: sandwich norms, windows on
    # every other layer, scores and logits soft-capped (caps low enough to bend these tiny models' values)
    "gemma": (transformers.GemmaConfig, dict(num_key_value_heads=2, head_dim=16)),
    "gemma2": (transformers.Gemma2Config, dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=21,
                                               sliding_window=5, attn_logit_softcapping=0.1,
                                               final_logit_softcapping=0.2)),
    # Granite: Llama with multipliers on the embeddings, the sublayer outputs, the scores (not 1/sqrt(head_dim))
    # and the logits
    "granite": (transformers.GraniteConfig, dict(num_key_value_heads=2, embedding_multiplier=12.0,
                                                 residual_multiplier=0.22, logits_scaling=8.0,
                                                 attention_multiplier=0.0078125, pad_token_id=0)),
    # OLMo 2: no norm before the sublayers, one after each; query and key norms over the whole projections; and
    # OLMo 3's windows on three of four layers, RoPE per kind of layer
    "olmo2": (transformers.Olmo2Config, dict(num_key_value_heads=2, attention_bias=True, pad_token_id=0)),
    "olmo3-local-layers": (transformers.Olmo3Config, dict(num_key_value_heads=4, sliding_window=5, pad_token_id=0)),
    # Mixtral: Mistral's attention (a window) with 4 experts, top 2 renormalised, in every layer (save_pretrained
    # writes the hub's names: block_sparse_moe, each expert's w1, w2, w3); Qwen3-MoE: Qwen3's attention, experts
    # with the chosen scores as they are, a SwiGLU in the layer mlp_only_layers names
    "mixtral": (transformers.MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4, sliding_window=5)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(num_key_value_heads=2, head_dim=16, num_experts=4,
                                                    num_experts_per_tok=2, moe_intermediate_size=32,
                                                    mlp_only_layers=[1], attention_bias=True)),
    # Qwen2-MoE: Qwen2's attention (windows on the first layer, as layer_types derives them from max_window_layers),
    # experts not renormalised beside a shared expert twice their width, gated per token; a SwiGLU in layer 1
    "qwen2-moe": (transformers.Qwen2MoeConfig, dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                    mlp_only_layers=[1], use_sliding_window=True, sliding_window=5,
                                                    max_window_layers=2)),
    # OLMoE: Llama's block, query and key norms over the whole projections, experts not renormalised
    "olmoe": (transformers.OlmoeConfig, dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                             attention_bias=True, pad_token_id=0)),
    # gpt-oss: biases, learned sinks, windows on every other layer (its default layer_types), YaRN untruncated (over 16
    # positions here); experts with biases and the clamped SwiGLU (at 0.1: small weights' products reach it)
    "gpt-oss": (transformers.GptOssConfig, dict(num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                                num_experts_per_tok=2, sliding_window=5, swiglu_limit=0.1,
                                                rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                                 "original_max_position_embeddings": 16})),
    # Qwen3-Next: gated DeltaNet (2 query/key heads for 4 value heads) and gated attention (RoPE on a quarter of each
    # head, biases), zero-centred norms; experts beside a gated shared expert twice their width, a SwiGLU in layer 1
    "qwen3-next": (transformers.Qwen3NextConfig, dict(
        num_key_value_heads=2, head_dim=16, attention_bias=True,
        layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64, mlp_only_layers=[1])),
    # Qwen3.5: Qwen3-Next's layers with the gated DeltaNet's projections apart; dense (a SwiGLU in every layer) or
    # experts in every layer (renormalised) beside a gated shared expert
    **{name: (cls, dict(num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention",
                                                                          "linear_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=8, **extra))
       for name, cls, extra in [("qwen3.5", transformers.Qwen3_5TextConfig, {}),
                                ("qwen3.5-moe", transformers.Qwen3_5MoeTextConfig,
                                 dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64))]},
    # Kimi Linear: KDA (a decay per key channel, low-rank forget and sigmoid output gates) and MLA without RoPE, a
    # SwiGLU in layer 0 and DeepSeek-V3's experts (2 groups) after it; save_pretrained writes the hub's names (the
    # q, k and v convolutions apart, each expert's own tensors under block_sparse_moe)
    "kimi-linear": (transformers.KimiLinearConfig, dict(
        num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        n_group=2, topk_group=1, linear_head_dim=16, linear_num_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention"], mlp_layer_types=["dense", "sparse",
                                                                                                  "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # RecurrentGemma: Griffin's recurrent blocks (RG-LRU, 48 channels in 4 gate blocks) twice, then local MQA (RoPE
    # on half of each head); Gemma's block, a GeGLU with biases
    "recurrent-gemma": (transformers.RecurrentGemmaConfig, dict(lru_width=48, num_key_value_heads=1,
                                                                attention_window_size=5)),
    # LFM2: gated short convolutions (with biases) around one GQA layer with query/key norms; its SwiGLU's width
    # derived from intermediate_size (2/3 of 160, rounded up to 256)
    "lfm2": (transformers.Lfm2Config, dict(num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"],
                                           conv_bias=True, norm_eps=1e-6)),
    # Nemotron-H: Mamba-2 (2 groups, 6 heads of 16: 1.5 hidden_size, as Nemotron Nano 2's width is no multiple of
    # it), attention without positions, squared-ReLU MLP layers after some mixers (each joins the mixer before it: 3
    # blocks from 5 layers)
    "nemotron-h": (transformers.NemotronHConfig, dict(
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"], mamba_num_heads=6,
        mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8, num_key_value_heads=2, head_dim=16)),
    # MiniMax-01: lightning attention around one GQA layer, experts in every layer, the block's alpha and beta (its
    # class saves its decay tables, which the import drops)
    "minimax": (transformers.MiniMaxConfig, dict(
        layer_types=["linear_attention", "full_attention", "linear_attention"], num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, block_size=8,
        **dict.fromkeys(("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"), 2.5),
        **dict.fromkeys(("full_attn_beta_factor", "linear_attn_beta_factor", "mlp_beta_factor"), 0.8))),
    # Falcon-H1: attention and Mamba-2 (its own width, 2 groups) added in every layer; every muP multiplier away
    # from 1 (folded into the weights on import)
    "falcon-h1": (transformers.FalconH1Config, dict(
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head=16, mamba_d_state=8,
        mamba_n_groups=2, mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False,
        embedding_multiplier=5.6, lm_head_multiplier=0.4, key_multiplier=0.3, attention_in_multiplier=0.9,
        attention_out_multiplier=0.7, ssm_in_multiplier=0.8, ssm_out_multiplier=0.6,
        ssm_multipliers=[0.35, 0.25, 0.18, 0.5, 0.35], mlp_multipliers=[0.29, 0.6])),
    # its class's default: Mamba-2's gated output not normalised (mamba_rms_norm false)
    "falcon-h1-unnormalised": (transformers.FalconH1Config, dict(
        num_key_value_heads=2, head_dim=16, mamba_d_ssm=96, mamba_n_heads=6, mamba_d_head=16, mamba_d_state=8,
        mamba_chunk_size=8, key_multiplier=0.3)),
    # OLMo Hybrid: gated DeltaNet (negative eigenvalues) in Llama's block, OLMo 3's attention in OLMo 2's; the hub's
    # names (its save_pretrained writes them: the q, k and v convolutions apart, the norms renamed)
    "olmo-hybrid": (transformers.OlmoHybridConfig, dict(
        num_key_value_heads=2, layer_types=["linear_attention", "full_attention", "linear_attention"],
        pad_token_id=0, eos_token_id=1)),
    # EXAONE 4.0: OLMo 2's block, per-head query/key norms, windows with RoPE beside a full layer without positions
    "exaone4": (transformers.Exaone4Config, dict(num_key_value_heads=2, sliding_window=5, sliding_window_pattern=2)),
    # Mamba and Mamba-2 alone (state-spaces', Codestral's): an RMSNorm and the mixer in every layer, no MLP;
    # Mamba-2's B and C in 2 groups
    "mamba": (transformers.MambaConfig, dict(state_size=8, time_step_rank=8, pad_token_id=0)),
    "mamba2": (transformers.Mamba2Config, dict(state_size=16, num_heads=8, head_dim=16, n_groups=2, chunk_size=8,
                                               pad_token_id=0)),
    # Falcon-Mamba: Mamba with weightless RMS norms of dt, B and C (ours, weights of one)
    "falcon-mamba": (transformers.FalconMambaConfig, dict(state_size=8, time_step_rank=8, mixer_rms_eps=1e-5,
                                                          pad_token_id=0)),
    # Bamba: Mamba-2 and attention (RoPE on half of each head) in the layers attn_layer_indices names, SwiGLU in all
    "bamba": (transformers.BambaConfig, dict(num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8,
                                             mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16,
                                             mamba_chunk_size=8)),
    # Granite 4.0-H: Bamba's layers in Granite's block and multipliers, attention without RoPE (NoPE, the released
    # models'), experts (160 wide) beside a shared SwiGLU twice their width; the dense form, its attention with RoPE
    **{f"granite-4.0-h-{name}": (transformers.GraniteMoeHybridConfig, dict(
        num_key_value_heads=2, layer_types=["mamba", "attention", "mamba"], mamba_n_heads=8, mamba_d_head=16,
        mamba_n_groups=2, mamba_d_state=16, mamba_chunk_size=8, embedding_multiplier=12.0, residual_multiplier=0.22,
        logits_scaling=8.0, attention_multiplier=0.0078125, **extra))
       for name, extra in [("moe", dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=320,
                                        position_embedding_type="nope")),
                           ("dense-rope", dict(num_local_experts=0, shared_intermediate_size=48,
                                               position_embedding_type="rope"))]},
    # Mamba and attention layers, MoE in every other one; save_pretrained writes each expert's own tensors
    "jamba-moe": (transformers.JambaConfig, dict(
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=8)),
}  # fmt: skip


PER_LAYER = {  # (window, rope_dims) of each layer
    "qwen2-window-on-some-layers": [(None, 16), (5, 16), (5, 16)],
    "qwen3-windows-alternating": [(5, 16), (None, 16), (5, 16)],
    "smollm3-nope": [(None, 16), (5, 0), (None, 16)],
    "ministral-windows-alternating": [(5, 16), (None, 16), (5, 16)],
    "qwen2-moe": [(5, 16), (None, 16), (None, 16)],
    "gpt-oss": [(5, 16), (None, 16), (5, 16)],
    "exaone4": [(5, 16), (None, 0), (5, 16)],
}

# transformers' grouped expert products take no float64 (an option of transformers 5)
EAGER = {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("sharded", [False, True])
def test_import_matches_transformers(tmp_path, case, sharded):
    cls, extra = CASES[case]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cls(**COMMON, **extra), attn_implementation="eager").eval()
    with torch.no_grad():  # random biases and norm weights, so a dropped or misplaced one would show
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
            elif "norm" in name:
                p.normal_(mean=1.0, std=0.3)
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):  # routers (Qwen3-MoE's start
                p.normal_(std=0.3)  # at zero: every score tied), Qwen2-MoE's gate of its shared expert
            elif name.endswith("block_sparse_moe.router.weight"):  # Granite 4.0-H's router (0.02 at init)
                p.normal_(std=0.3)
            elif name.endswith(".sinks"):  # gpt-oss's sink logits (0.02 at init: barely a sink)
                p.normal_(std=1.0)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(std=0.05)  # the router's scores are near 0.5 at init: this changes which experts win
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = load_hf(tmp_path).eval()
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert (got - want).abs().max() <= 1e-4
    if not sharded:  # in float64, where float32's rounding no longer hides another constant (an eps, a scale);
        # transformers' own float32 parts (RoPE angles, norms, routers, Jamba's scan) leave 3e-7
        hf64 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, **EAGER).eval()
        # (Gemma's seven norms a layer compute in float32 whatever the input, x.float(): 2.5e-6 here)
        # (transformers' Mamba computes its scan in float32 whatever the model's dtype: 1.5e-6 here)
        # (and Qwen3-Next's gated delta rule: in float32 too)
        bound = (
            1e-5
            if case.startswith(
                (
                    "gemma",
                    "mamba",
                    "bamba",
                    "falcon",
                    "qwen3-next",
                    "qwen3.5",
                    "kimi",
                    "recurrent",
                    "lfm2",
                    "nemotron",
                    "minimax",
                    "olmo-hybrid",
                )
            )
            else 1e-6
        )
        with torch.no_grad():
            assert (load_hf(tmp_path, dtype=torch.float64)(ids) - hf64(ids).logits).abs().max() <= bound
    if case in PER_LAYER:
        assert [(m.window, m.rope_dims) for m in ours.config.layer_mixers] == PER_LAYER[case]
    elif "window" in case:
        assert ours.config.mixer.window == (None if "no-layer" in case or "past-every" in case else
                                            7 if "phi3" in case else 5)  # fmt: skip
    if "partial-rope" in case:
        assert ours.config.mixer.rope_dims == 12  # 0.75 of 16
    if case == "gemma3-scalar":
        assert ours.config.mixers["L"].softmax_scale == 21**-0.5
    if case == "gemma2":
        assert ours.config.logit_softcap == 0.2 and ours.config.post_norms and ours.config.pattern == "LGL"
        assert [(m.softcap, m.window, m.softmax_scale) for m in ours.config.layer_mixers[:2]] == [
            (0.1, 5, 21**-0.5), (0.1, None, 21**-0.5)]  # fmt: skip
    if case == "qwen3-moe":
        assert ours.config.mlp_pattern == "EDE" and not ours.config.mlps["E"].norm_topk
    if case == "mixtral":
        assert ours.config.mlp.kind == "moe" and ours.config.mlp.norm_topk and ours.config.mixer.window == 5
    if case == "bamba":
        assert ours.config.pattern == "MAM" and ours.config.mixers["A"].rope_dims == 8
    if case.startswith("qwen3.5"):  # exported as Qwen3-Next, which computes the same
        assert ours.config.pattern == "DAD" and ours.config.mlp.kind == ("moe" if "moe" in case else "swiglu")
        assert ours.config.mixers["A"].rope_dims == 4 and ours.config.mixers["D"].n_qk_heads == 2
        save_hf(ours, tmp_path / "next", remote_code=False)
        qwen3_next = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "next", **EAGER).eval()
        assert type(qwen3_next).__name__ == "Qwen3NextForCausalLM"
        with torch.no_grad():
            assert (qwen3_next(ids).logits - want).abs().max() <= 1e-4
    if case == "recurrent-gemma":  # (its normaliser sqrt(64) = 8 in bf16 too)
        r, a = ours.config.mixers["R"], ours.config.mixers["A"]
        assert (ours.config.pattern, ours.config.embed_scale, ours.config.mlp.hidden, ours.config.mlp.bias) == (
            "RRA", 8.0, 80, True)  # fmt: skip
        assert (r.width, r.n_heads, a.window, a.rope_dims, a.n_kv_heads) == (48, 4, 5, 8, 1)
    if case == "nemotron-h":
        assert (ours.config.n_layers, ours.config.pattern, ours.config.mlp_pattern) == (3, "MAM", "DND")
        assert ours.config.mixers["M"].inner == 96
    if case == "olmo-hybrid":
        c, g = ours.config, ours.config.mixers["D"]
        assert (c.pattern, c.norm_pattern, g.negative_eigenvalues, g.head_dim, g.value_head_dim) == (
            "DAD", "POP", True, 12, 24)  # fmt: skip
    if case == "falcon-h1":
        c, s = ours.config, ours.config.mixer.mixers[1]
        assert (c.mixer.combine, s.inner, s.n_groups, c.embed_scale, c.logit_scale) == ("sum", 96, 2, 5.6, 0.4)
    if case == "falcon-h1-unnormalised":
        assert not ours.config.mixer.mixers[1].gated_norm
        with pytest.raises(ValueError, match=r"Mamba-2 with gated_norm=False \(its output is normalised\)"):
            unnormalised = {"kind": "mamba2", "head_dim": 16, "state_dim": 8, "gated_norm": False}
            save_hf(build_model(tiny(mixer=unnormalised, mlp={"kind": "none"})), tmp_path / "m2", remote_code=False)
    if case == "minimax":
        c = ours.config
        assert (c.pattern, c.normed_residual, c.residual_alpha, c.residual_scale, c.mixers["L"].chunk_size) == (
            "LAL", True, 2.5, 0.8, 8)  # fmt: skip
        assert (c.mlp.kind, c.mlp.n_experts, c.mlp.norm_topk) == ("moe", 4, True)
    if case == "lfm2":
        assert (ours.config.pattern, ours.config.mlp.hidden, ours.config.mixers["C"].bias) == ("CAC", 256, True)
    if case == "kimi-linear":
        kda, mla = ours.config.mixers["K"], ours.config.mixers["A"]
        assert (ours.config.pattern, ours.config.mlp_pattern, mla.rope, kda.decay) == ("KAK", "DEE", False, "channel")
    if case == "qwen3-next":
        a, linear, moe = ours.config.mixers["A"], ours.config.mixers["D"], ours.config.mlps["E"]
        assert (ours.config.pattern, ours.config.mlp_pattern, a.rope_dims, a.output_gate) == ("DAD", "EDE", 4, True)
        assert (linear.n_heads, linear.n_qk_heads, linear.value_head_dim, moe.n_shared) == (4, 2, 8, 2)
    if case.startswith("granite-4.0-h"):
        a, mlp = ours.config.mixers["A"], ours.config.mlp
        assert (ours.config.pattern, a.rope_dims, a.softmax_scale, ours.config.residual_scale) == (
            "MAM", 16 if "rope" in case else 0, 0.0078125, 0.22)  # fmt: skip
        assert (mlp.kind, mlp.n_shared) == ("moe", 2) if "moe" in case else (mlp.kind, mlp.hidden) == ("swiglu", 48)
    if "mamba" in case:
        assert ours.config.mlp.kind == "none" and ours.config.max_seq_len == 128  # (its max_position_embeddings)
    if case == "falcon-mamba":  # (the norms' weights train: no native class takes them)
        assert ours.config.mixer.inner_norms and ours.config.mixer.norm_eps == 1e-5
        with pytest.raises(ValueError, match="Mamba with inner_norms"):
            save_hf(ours, tmp_path / "again", remote_code=False)
    if case == "qwen2-moe":
        moe = ours.config.mlps["E"]
        assert ours.config.mlp_pattern == "EDE" and (moe.n_shared, moe.shared_gate, moe.norm_topk) == (2, True, False)
    if case == "gemma":
        assert not ours.config.post_norms and ours.config.mixer is None and ours.config.pattern == "GGG"
    if case == "gemma3":
        assert ours.config.pattern == "LGL" and [m.window for m in ours.config.layer_mixers] == [5, None, 5]
        assert [m.rope_theta for m in ours.config.layer_mixers] == [500.0, 20000.0, 500.0]
    if "deepseek" in case:
        assert ours.config.mixer.kind == "mla" and ours.config.mixer.kv_lora_rank == 32
    if case == "deepseek-v2":
        moe = ours.config.mlps["E"]
        assert ours.config.mlp_pattern == "DEE" and (moe.score, moe.norm_topk, moe.routed_scale) == (
            "softmax",
            False,
            1.5,
        )
    if case == "deepseek-v2-groups":
        moe = ours.config.mlps["E"]
        assert (moe.n_groups, moe.topk_groups, moe.group_rank) == (4, 2, "max")
    if case == "deepseek-v3-yarn":
        assert ours.config.mixer.mscale_all_dim == 0.7 and ours.config.mixer.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("sharded", [False, True])
def test_import_reads_pytorch_pickled_weights(tmp_path, sharded):
    """Older checkpoints hold ``pytorch_model.bin`` (or its shards and their index) alone; written here by hand
    (transformers 5 writes safetensors only), as earlier versions of it did."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = hf.state_dict()
    if sharded:
        names = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map = {k: file for file, keys in shards.items() for k in keys}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        assert (load_hf(tmp_path)(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_gpt_oss_mxfp4_experts_load_as_transformers_dequantizes_them(tmp_path):
    """OpenAI's gpt-oss checkpoints hold the experts as MXFP4 (``*_blocks``, ``*_scales``, quantization_config
    mxfp4): dequantized on import exactly as `transformers`' own function does, the model's logits then equal to
    theirs with those weights (float64); another quantization is refused by name."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    cfg = transformers.GptOssConfig(**COMMON | {"num_hidden_layers": 2}, num_key_value_heads=2, head_dim=16,
                                    num_local_experts=4, num_experts_per_tok=2, sliding_window=5)  # fmt: skip
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, **EAGER).double().eval()
    theirs.save_pretrained(tmp_path)
    state, g = load_file(tmp_path / "model.safetensors"), torch.Generator().manual_seed(0)
    for i in range(2):
        for part, (rows, columns) in (("gate_up_proj", (320, 64)), ("down_proj", (64, 160))):
            name = f"model.layers.{i}.mlp.experts.{part}"
            blocks = torch.randint(0, 256, (4, rows, columns // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(119, 125, (4, rows, columns // 32), dtype=torch.uint8, generator=g)
            del state[name]
            state |= {f"{name}_blocks": blocks, f"{name}_scales": scales}
            with torch.no_grad():  # [E, in, out], as their class keeps the experts
                theirs.get_parameter(name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float64))
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    quantized = config | {"quantization_config": {"quant_method": "mxfp4"}}
    (tmp_path / "config.json").write_text(json.dumps(quantized))
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        assert (load_hf(tmp_path, dtype=torch.float64)(ids) - theirs(ids).logits).abs().max() <= 1e-6
    (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported"):
        load_hf(tmp_path)


def test_longrope_takes_its_long_factors_in_calls_past_the_original_context_as_transformers_does(tmp_path):
    """Phi-3's LongRoPE (Phi-3.5-mini, Phi-4-mini: partial RoPE here as Phi-4-mini's) against `transformers` in
    float64: a call whose last position is within the original 8 positions turns at the short factors, one past
    it at the long ones, all its positions; so stepping past position 8 on a cache leaves the keys cached before
    it turned at the short ones, as theirs does, while ``generate`` fills the cache again there, as Phi-3's
    generation does (greedy tokens, eager and compiled). A prompt is prefilled in one call (pieces would choose
    apart), and StreamingLLM's sinks, which would turn keys cached at one set by the other's angles, are
    refused by name."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    short, long = (1 + torch.rand(6, generator=g)).tolist(), (1 + 8 * torch.rand(6, generator=g)).tolist()
    cfg = transformers.Phi3Config(**COMMON, num_key_value_heads=2, partial_rotary_factor=0.75, pad_token_id=0,
                                  original_max_position_embeddings=8, rope_parameters={
                                      "rope_type": "longrope", "short_factor": short, "long_factor": long})  # fmt: skip
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours = load_hf(tmp_path, dtype=torch.float64).eval()
    extension = COMMON["max_position_embeddings"] / 8  # the attention factor: sqrt(1 + ln(extension) / ln 8)
    assert ours.config.mixer.rope_scaling["attention_factor"] == pytest.approx((1 + math.log(extension) / math.log(8))
                                                                               ** 0.5, rel=1e-15)  # fmt: skip
    ids = torch.randint(1, 101, (2, 12))
    cache, their_cache = ours.new_cache(2, 12, dtype=torch.float64), DynamicCache(config=theirs.config)
    with torch.no_grad():
        for T in (8, 9):  # positions 0-7: short; 0-8: long
            assert (ours(ids[:, :T]) - theirs(ids[:, :T]).logits).abs().max() <= 1e-6
        for at, end in [(0, 6), *((t, t + 1) for t in range(6, 12))]:  # a prefill, then steps past position 8
            want = theirs(ids[:, at:end], past_key_values=their_cache, use_cache=True).logits
            assert (ours(ids[:, at:end], cache=cache) - want).abs().max() <= 1e-6, at
        whole = ours.prefill(ids[:, :10], ours.new_cache(2, 12, dtype=torch.float64), chunk=4)
        assert (whole - theirs(ids[:, :10]).logits[:, -1]).abs().max() <= 1e-6
    rotary = ours.layers[0].mixer.rotary  # positions as tensors (the compiled step's, padded rows') choose alike
    for start, length in [(7, 1), (8, 1), (0, 8), (0, 9)]:
        for by_int, by_tensor in zip(rotary(start, length), rotary(torch.tensor(start), length), strict=True):
            assert torch.equal(by_int, by_tensor), (start, length)
    # generate: at the first token past the original context, Phi-3's generation fills the cache again from the
    # whole sequence (every key at the long factors); without it the last two of these rows would differ
    prompt = torch.cat([torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(s)) for s in range(5)])
    greedy = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    for compiled in (False, True):
        assert torch.equal(ours.generate(prompt, max_new_tokens=16, compile=compiled), greedy), compiled
    with pytest.raises(ValueError, match=r"cache policy sinks: layer 0 has LongRoPE, whose frequencies change"):
        ours.new_cache(1, 40, policy={"kind": "sinks", "sinks": 2, "window": 8})


@pytest.mark.parametrize("case", ["phi3-su", "phi3-yarn-top-level", "llama3-top-level", "yarn-in-rope"])
def test_scaled_ropes_original_context_is_read_as_transformers_reads_it(case):
    """Where a config.json puts the context its RoPE scaling extends (Phi-3's top-level field, its class default
    4096, inside the RoPE settings) and Phi-3's earlier names of LongRoPE (su, yarn): read as `transformers`'
    own configs standardise them."""
    from kvlab.archs.hf_families import read_rope

    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    hf = {
        "phi3-su": {"model_type": "phi3", "rope_scaling": {"type": "su", **factors}},
        "phi3-yarn-top-level": {"model_type": "phi3", "original_max_position_embeddings": 32,
                                "rope_scaling": {"type": "yarn", **factors}},
        "llama3-top-level": {"model_type": "llama", "original_max_position_embeddings": 32, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}},
        "yarn-in-rope": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16}},
    }[case] | {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 8192}  # fmt: skip
    theirs = transformers.AutoConfig.for_model(**hf).rope_parameters
    ours = read_rope(hf).scaling
    assert ours["kind"] == theirs["rope_type"] and ours["original_max_seq_len"] == theirs[
        "original_max_position_embeddings"]  # fmt: skip


def test_import_reads_pythia_checkpoints_as_the_hub_holds_them(tmp_path):
    """Pythia's config.json names RoPE rotary_pct and rotary_emb_base, and its weights hold buffers of older
    transformers (each layer's causal mask, masked_bias, inv_freq): read, and dropped."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**COMMON, rotary_pct=0.25)).eval()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"rotary_pct": 0.5, "rotary_emb_base": 500}))
    state = load_file(tmp_path / "model.safetensors")
    for i in range(3):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.rand(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_hf(tmp_path).eval()
    assert (ours.config.mixer.rope_dims, ours.config.mixer.rope_theta) == (8, 500.0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # as transformers reads the same
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("names", ["transformers 5", "hub"])
def test_import_reads_the_text_model_of_gemma3_multimodal_checkpoints(tmp_path, names):
    """Gemma 3 4B-27B are Gemma3ForConditionalGeneration: the text model is read (under transformers 5's names, or
    the hub's language_model.model.*), the vision tower and projector are not; logits as transformers' on tokens."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    text = dict(COMMON, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                sliding_window_pattern=2)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=100, boi_token_index=98, eoi_token_index=99)  # fmt: skip
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(std=0.3)
    hf.save_pretrained(tmp_path)
    if names == "hub":  # as the hub's checkpoints (transformers 4) hold them
        state = load_file(tmp_path / "model.safetensors")
        renamed = (re.sub(r"^model\.(vision|multi)", r"\1", k) for k in state)
        hub = {re.sub(r"^model\.language_model\.", "language_model.model.", k): v
               for k, v in zip(renamed, state.values(), strict=True)}  # fmt: skip
        assert any(k.startswith("vision_tower.") for k in hub) and any(
            k.startswith("language_model.model.") for k in hub
        )
        save_file(hub, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = load_hf(tmp_path).eval()
    assert ours.config.pattern == "LGL" and ours.config.tie_embeddings
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() <= 1e-4


def test_import_reads_the_text_model_of_qwen3_5_multimodal_checkpoints(tmp_path):
    """Qwen3.5's hub checkpoints are Qwen3_5ForConditionalGeneration: the text model is read (model.language_model.*),
    the vision tower (model.visual.*) is not; logits as transformers' on tokens."""
    torch.manual_seed(0)
    text = dict(COMMON, num_key_value_heads=2, head_dim=16, layer_types=["linear_attention", "full_attention"] * 2,
                num_hidden_layers=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=8)  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    hf = transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=text, vision_config=vision)
    )
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(std=0.3)
    hf.eval().save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.pattern == "DADA" and ours.config.n_layers == 4
    ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() <= 1e-4


def test_a_fused_projection_of_other_rows_names_the_fields(tmp_path):
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0))
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    with pytest.raises(ValueError, match=r"layer 0's qkv_proj has 128 rows, but config.json makes it 96; check"):
        load_hf(tmp_path)


def test_names_round_trip():
    moe = ["gate.weight", "gate.e_score_correction_bias", "experts.gate_up_proj", "experts.down_proj",
           "shared_experts.down_proj.weight", "shared_expert_gate.weight"]  # fmt: skip
    for name in ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.1.post_attention_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "lm_head.weight", "model.layers.2.mlp.gate_proj.weight",
                 *(f"model.layers.2.mlp.{n}" for n in moe)]:  # fmt: skip
        assert kvlab_to_hf_name(hf_to_kvlab_name(name)) == name


def test_unsupported_and_missing_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported; supported: llama, mistral, qwen2"):
        load_hf(tmp_path)
    moe = transformers.DeepseekV3Config(**COMMON, first_k_dense_replace=1).to_dict() | {"scoring_func": "softmax"}
    (tmp_path / "config.json").write_text(json.dumps(moe))
    with pytest.raises(ValueError, match="scoring_func='softmax', topk_method=None is not supported"):
        load_hf(tmp_path)
    gemma = transformers.Gemma3TextConfig(**COMMON, head_dim=16, query_pre_attn_scalar=16).to_dict()
    for change, message in (
        ({"hidden_activation": "relu"}, "hidden_activation='relu' is not supported"),
        ({"attn_logit_softcapping": 50.0}, "transformers' Gemma 3 does not apply it"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=true is not supported"),
    ):
        (tmp_path / "config.json").write_text(json.dumps(gemma | change))
        with pytest.raises(ValueError, match=message):
            load_hf(tmp_path)
    neox = transformers.GPTNeoXConfig(**COMMON).to_dict() | {"hidden_act": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(neox))
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported for gpt_neox"):
        load_hf(tmp_path)
    cfg = transformers.LlamaConfig(**COMMON).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"mlp_bias": True}))
    with pytest.raises(ValueError, match="mlp_bias=true is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_parameters.rope_type='dynamic': this RoPE scaling is not supported"):
        load_hf(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0}  # (its factors missing)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: the field 'short_factor' is missing"):
        load_hf(tmp_path)
    # transformers reads a legacy rope_scaling in place of rope_parameters: so must we
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4}
    cfg["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_scaling.rope_type='dynamic': this RoPE scaling is not supported"):
        load_hf(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_import_builds_in_the_dtype_asked_for(tmp_path, dtype):
    """A float64 checkpoint keeps its digits (not rounded through float32 on the way), a bf16 one loads as its
    bits; the RoPE tables are computed in the dtype's own precision, as a model cast to it has them."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2)).to(dtype)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p))  # digits beyond float32's
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path, dtype=dtype)
    theirs = {hf_to_kvlab_name(k): v for k, v in hf.state_dict().items()}
    assert all(torch.equal(p, theirs[name]) for name, p in ours.named_parameters())
    cast = load_hf(tmp_path).to(dtype)  # through float32 and cast: the same buffers
    assert all(torch.equal(b, dict(cast.named_buffers())[name]) for name, b in ours.named_buffers())


def test_minimax_m1_as_its_hub_repository_holds_it(tmp_path):
    """MiniMax-M1's remote-code checkpoint (model_type minimax_m1: attn_type_list, layernorm_*_alpha, postnorm,
    rope_theta and rotary_dim in its own fields; block_sparse_moe with one tensor per expert, w1/w3/w2) imports as
    the same model MiniMaxForCausalLM holds: logits equal; shared experts and a scaled plain residual are refused."""
    from safetensors.torch import load_file, save_file

    from kvlab.archs.hf_families import _minimax_remote_from_hf

    scales = dict.fromkeys(("full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor"), 2.5)
    cfg = transformers.MiniMaxConfig(**COMMON | {"intermediate_size": 48}, num_key_value_heads=2, head_dim=16,
                                     num_local_experts=4, layer_types=["linear_attention", "full_attention",
                                                                       "linear_attention"], **scales)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.MiniMaxForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("mlp.gate.weight"):
                p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.3)
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    remote = {
        k: v
        for k, v in config.items()
        if k not in ("layer_types", "rope_parameters", "architectures") and not k.endswith("_factor")
    } | {  # fmt: skip
        "model_type": "minimax_m1",
        "attn_type_list": [0, 1, 0],
        "postnorm": True,
        "rope_theta": config["rope_parameters"]["rope_theta"],
        "rotary_dim": 16,
        "shared_intermediate_size": 0,
        **{f"layernorm_{kind}_alpha": 2.5 for kind in ("full_attention", "linear_attention", "mlp")},
    }
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "config.json").write_text(json.dumps(remote))
    weights = {}
    for name, value in load_file(tmp_path / "hf" / "model.safetensors").items():
        prefix = name.rsplit("mlp.experts.", 1)[0] + "block_sparse_moe.experts."
        if name.endswith("mlp.experts.gate_up_proj"):
            for e, (gate, up) in enumerate(v.chunk(2) for v in value):
                weights |= {f"{prefix}{e}.w1.weight": gate, f"{prefix}{e}.w3.weight": up}
        elif name.endswith("mlp.experts.down_proj"):
            weights |= {f"{prefix}{e}.w2.weight": down for e, down in enumerate(value)}
        else:
            weights[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = value
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "m1" / "model.safetensors")
    ours = load_hf(tmp_path / "m1").eval()
    assert (ours.config.pattern, ours.config.residual_alpha) == ("LAL", 2.5)
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"shared_intermediate_size=8 is not supported"):
        _minimax_remote_from_hf(remote | {"shared_intermediate_size": 8})
    with pytest.raises(ValueError, match=r"postnorm=false with layernorm alphas or betas other than 1"):
        _minimax_remote_from_hf(remote | {"postnorm": False})
