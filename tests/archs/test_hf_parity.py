"""Parity with `transformers` Llama at the same weights: pins RoPE and weight layout."""

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
    ours = build_model(
        dict(
            vocab_size=101,
            d_model=64,
            n_layers=3,
            max_seq_len=128,
            norm={"kind": "rmsnorm", "eps": 1e-6},
            mlp={"kind": "swiglu", "hidden": 160},
            tie_embeddings=tied,
            mixer={"kind": "attention", "n_heads": 4, "n_kv_heads": n_kv_heads, "head_dim": 16, "rope_theta": 5000.0},
        )
    ).eval()
    state = {_to_kvlab_name(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=not tied)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(0, 101, (2, 37))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert (got - want).abs().max() <= 1e-4
    with torch.no_grad():
        hf_greedy = hf.generate(ids[:, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:, :5], max_new_tokens=10), hf_greedy)
