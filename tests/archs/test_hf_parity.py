"""Parity with `transformers` (Llama; DeepSeek-V3 for MLA) at the same weights: pins RoPE and weight layouts."""

import math
import re

import pytest
import torch

from kvlab import build_model

transformers = pytest.importorskip("transformers")


def _to_kvlab_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    name = name.replace("self_attn.", "mixer.")
    name = re.sub(r"input_layernorm", "mixer_norm", name)
    return re.sub(r"post_attention_layernorm", "mlp_norm", name)


def _ours(mixer: dict, tied: bool = False):
    """The kvlab twin of the tiny transformers configs below (3 layers, d_model 64, SwiGLU 160, eps 1e-6)."""
    return build_model(
        dict(
            vocab_size=101,
            d_model=64,
            n_layers=3,
            max_seq_len=128,
            norm={"kind": "rmsnorm", "eps": 1e-6},
            mlp={"kind": "swiglu", "hidden": 160},
            tie_embeddings=tied,
            mixer=mixer,
        )
    ).eval()


def _assert_same_logits_and_greedy_tokens(ours, hf):
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4
        hf_greedy = hf.generate(ids[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :5], max_new_tokens=10), hf_greedy)


@pytest.mark.parametrize("n_kv_heads,tied", [(2, False), (4, False), (1, True)])
def test_logits_match_llama(n_kv_heads, tied):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
        attention_bias=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    attention = {"kind": "attention", "n_heads": 4, "n_kv_heads": n_kv_heads, "head_dim": 16, "rope_theta": 5000.0}
    ours = _ours(attention, tied)
    state = {_to_kvlab_name(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=not tied)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    _assert_same_logits_and_greedy_tokens(ours, hf)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_mla_logits_match_deepseek_v3(q_lora_rank):
    """Dense-MLP DeepseekV3 (every layer below first_k_dense_replace), RoPE not interleaved."""
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        first_k_dense_replace=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_interleave=False,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    mla = {"kind": "mla", "n_heads": 4, "head_dim": 16, "rope_head_dim": 8, "kv_lora_rank": 32,
           "q_lora_rank": q_lora_rank, "rope_theta": 5000.0, "norm_eps": 1e-6}  # fmt: skip
    ours = _ours(mla)
    with torch.no_grad():  # norms away from 1, so their placement is checked too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours.load_state_dict({_to_kvlab_name(k): v for k, v in hf.state_dict().items()})
    _assert_same_logits_and_greedy_tokens(ours, hf)


ROPE_SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, {"kind": "linear", "factor": 4.0}),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 16},
    ),  # fmt: skip
    # YaRN (Qwen2.5's long-context settings): its attention factor from the factor, 0.1 ln 4 + 1
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {
            "kind": "yarn",
            "factor": 4.0,
            "original_max_seq_len": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": 0.1 * math.log(4.0) + 1,
        },
    ),  # fmt: skip
    # and with its own ramp and attention factor
    "yarn-own-factor": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
            "attention_factor": 1.25,
        },
        {
            "kind": "yarn",
            "factor": 8.0,
            "original_max_seq_len": 32,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
            "attention_factor": 1.25,
        },
    ),  # fmt: skip
    # LongRoPE (Phi-3.5, Phi-4-mini): a factor per frequency; past the original context (every call here) the long
    # ones, and the attention factor sqrt(1 + ln 8 / ln 16) of the context's extension 128 / 16
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.5, 11.5, 15.0],
            "original_max_position_embeddings": 16,
        },
        {
            "kind": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.5, 11.5, 15.0],
            "original_max_seq_len": 16,
            "attention_factor": math.sqrt(1 + math.log(8) / math.log(16)),
        },
    ),  # fmt: skip
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_llama_and_survives_import_and_export(kind, tmp_path):
    """Context-extended RoPE (positions up to 128, beyond the 16 the llama3 scaling was trained for)."""
    from kvlab.archs.hf import load_hf, save_hf

    theirs, ours = ROPE_SCALINGS[kind]
    hf_cfg = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, attention_bias=False,
        rope_parameters={"rope_theta": 5000.0, **theirs},
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "theirs")
    imported = load_hf(tmp_path / "theirs").eval()
    assert imported.config.mixer.rope_scaling == ours
    ids = torch.randint(0, 101, (2, 100))
    with torch.no_grad():
        assert (imported(ids) - hf(ids).logits).abs().max() <= 1e-4
        plain = _ours({"kind": "attention", "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "rope_theta": 5000.0})
        plain.load_state_dict(imported.state_dict())
        assert (plain(ids) - hf(ids).logits).abs().max() > 1e-3  # the scaling matters at these positions
    save_hf(imported, tmp_path / "again")  # native: transformers reads the same scaling back
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert (again(ids).logits - hf(ids).logits).abs().max() <= 1e-4


def test_mla_latent_norms_keep_deepseeks_eps_through_import_and_export(tmp_path):
    """DeepSeek builds its latent norms with eps 1e-6 whatever rms_norm_eps is (1e-5 here, as Moonlight's):
    both ways keep them apart. Latents of mean square ~1e-6 make the eps matter at float32 tolerance."""
    from kvlab.archs.hf import load_hf, save_hf

    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, rope_interleave=False, max_position_embeddings=128, rms_norm_eps=1e-5,
    )  # fmt: skip
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("kv_a_proj_with_mqa.weight", "q_a_proj.weight")):
                p.mul_(0.05)
    hf.save_pretrained(tmp_path / "theirs")
    ours = load_hf(tmp_path / "theirs").eval()
    assert ours.config.mixer.norm_eps == 1e-6 and ours.config.norm.eps == 1e-5
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-4
        save_hf(ours, tmp_path / "again")
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
        assert again.config.rms_norm_eps == 1e-5 and (again(ids).logits - expected).abs().max() <= 1e-4
        spec = ours.config.to_dict()
        spec["mixer"]["norm_eps"] = 1e-5
        moved = build_model(spec).eval()
        moved.load_state_dict(ours.state_dict())
        assert (moved(ids) - expected).abs().max() > 1e-2  # the eps matters at these latents
    with pytest.raises(ValueError, match="latent norms have eps 1e-06"):  # another latent eps has no native class
        save_hf(moved, tmp_path / "moved", remote_code=False)
