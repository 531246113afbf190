"""Hymba's layer (Dong et al. 2024) against a float64 transcription of its equations and released code,
and meta tokens against the same model reading them as ordinary tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvlab import build_model
from kvlab.layers.base import StepState
from kvlab.layers.parallel import Parallel, ParallelConfig
from tests.conftest import tiny

D, HEADS, KV_HEADS, HEAD, V_HEAD, STATE, WINDOW, SINKS = 32, 4, 2, 8, 16, 4, 5, 3
BRANCHES = [
    {"kind": "attention", "n_heads": HEADS, "n_kv_heads": KV_HEADS, "head_dim": HEAD, "v_head_dim": V_HEAD,
     "window": WINDOW, "sinks": SINKS},
    {"kind": "mamba", "state_dim": STATE, "expand": 2, "dt_rank": 3, "conv_kernel": 3, "inner_norms": True},
]  # fmt: skip


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _rope(x, pos):
    """Llama's rotate-half RoPE, theta 10000, at positions ``pos``."""
    d = x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _attention_heads(att, x):
    """Hymba's attention branch before any output projection: softmax over the keys at most WINDOW - 1
    before the query, or among the first SINKS positions (its meta tokens), GQA in consecutive groups."""
    T = x.shape[0]
    q = (x @ att.q_proj.weight.T).view(T, HEADS, HEAD)
    k = (x @ att.k_proj.weight.T).view(T, KV_HEADS, HEAD)
    v = (x @ att.v_proj.weight.T).view(T, KV_HEADS, V_HEAD)
    pos = torch.arange(T)
    out = torch.empty(T, HEADS, V_HEAD, dtype=x.dtype)
    for h in range(HEADS):
        g = h // (HEADS // KV_HEADS)
        qh, kh = _rope(q[:, h], pos), _rope(k[:, g], pos)
        for t in range(T):
            seen = [s for s in range(t + 1) if t - s < WINDOW or s < SINKS]
            w = torch.softmax(torch.stack([qh[t] @ kh[s] for s in seen]) / math.sqrt(HEAD), 0)
            out[t, h] = sum(w_i * v[s, g] for w_i, s in zip(w, seen, strict=True))
    return out.reshape(T, HEADS * V_HEAD)


def _mamba_heads(m, x):
    """Mamba (Gu & Dao 2023, Algorithm 2) with Jamba's/Hymba's RMSNorms of dt, B and C, before the output
    projection: y = (C h_t + D x) * silu(z), h_t = exp(dt A) h_{t-1} + dt B x."""
    T, inner = x.shape[0], m.inner
    xs, z = (x @ m.in_proj.weight.T).split(inner, -1)
    K = m.conv_weight.shape[1]
    padded = torch.cat([xs.new_zeros(K - 1, inner), xs])
    xs = F.silu(sum(padded[j : j + T] * m.conv_weight[:, j] for j in range(K)) + m.conv_bias)
    dt_low, b, c = (xs @ m.x_proj.weight.T).split([3, STATE, STATE], -1)
    dt_low, b, c = _rms(dt_low, m.dt_norm.weight, 1e-6), _rms(b, m.b_norm.weight, 1e-6), _rms(c, m.c_norm.weight, 1e-6)
    dt = F.softplus(dt_low @ m.dt_proj.weight.T + m.dt_bias)
    A = -m.A_log.exp()
    h, ys = x.new_zeros(inner, STATE), []
    for t in range(T):
        h = torch.exp(dt[t, :, None] * A) * h + dt[t, :, None] * b[t][None] * xs[t, :, None]
        ys.append(h @ c[t] + m.D * xs[t])
    return torch.stack(ys) * F.silu(z)


def test_hymba_layer_matches_its_equations_in_float64():
    """Eq. (3) of the paper as its code computes it: out_proj((RMSNorm_1(attn) + RMSNorm_2(ssm)) / 2), the
    norms' weights being the betas, one output projection for both branches."""
    torch.manual_seed(0)
    layer = Parallel(ParallelConfig(mixers=BRANCHES, shared_output=True, norm_eps=1e-6), d_model=D, layer_idx=0,
                     kv_source=0, max_seq_len=32).double()  # fmt: skip
    with torch.no_grad():
        for p in layer.parameters():  # away from the init's ones and zeros, so every weight counts
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 11, D, dtype=torch.float64)
    att, ssm = layer.branches
    mixed = (_rms(_attention_heads(att, x[0]), layer.betas[0].weight, 1e-6)
             + _rms(_mamba_heads(ssm, x[0]), layer.betas[1].weight, 1e-6)) / 2  # fmt: skip
    expected = mixed @ layer.out_proj.weight.T
    torch.testing.assert_close(layer(x, state=StepState())[0], expected, rtol=1e-10, atol=1e-12)


def test_recurformer_layer_is_its_heads_side_by_side_in_float64():
    """RecurFormer's layer (combine: concat): the attention heads that stay and the Mamba that replaced the
    others, side by side before the one output projection, no norms: W_out [attention heads(x); mamba(x)]."""
    torch.manual_seed(0)
    branches = [BRANCHES[0], {**BRANCHES[1], "inner": 24}]  # a Mamba as wide as the heads it would replace
    layer = Parallel(ParallelConfig(mixers=branches, shared_output=True, combine="concat"), d_model=D, layer_idx=0,
                     kv_source=0, max_seq_len=32).double()  # fmt: skip
    assert not hasattr(layer, "betas") and layer.out_proj.in_features == HEADS * V_HEAD + 24
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 11, D, dtype=torch.float64)
    att, ssm = layer.branches
    expected = torch.cat([_attention_heads(att, x[0]), _mamba_heads(ssm, x[0])], -1) @ layer.out_proj.weight.T
    torch.testing.assert_close(layer(x, state=StepState())[0], expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"mixer.combine=concat .* needs shared_output: true"):
        ParallelConfig(mixers=branches, combine="concat").resolved(D, "mixer")
    with pytest.raises(ValueError, match=r"mixer.combine='max' is not one of mean, concat, sum"):
        ParallelConfig(mixers=branches, shared_output=True, combine="max").resolved(D, "mixer")


def test_falcon_h1_layer_is_its_branches_added_in_float64():
    """Falcon-H1's layer (combine: sum): each branch through its own output projection, added, no norms:
    W_o attention heads(x) + W_out mamba(x)."""
    torch.manual_seed(0)
    layer = Parallel(ParallelConfig(mixers=BRANCHES, combine="sum"), d_model=D, layer_idx=0, kv_source=0,
                     max_seq_len=32).double()  # fmt: skip
    assert not hasattr(layer, "betas") and not hasattr(layer, "out_proj")
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 11, D, dtype=torch.float64)
    att, ssm = layer.branches
    expected = _attention_heads(att, x[0]) @ att.o_proj.weight.T + _mamba_heads(ssm, x[0]) @ ssm.out_proj.weight.T
    torch.testing.assert_close(layer(x, state=StepState())[0], expected, rtol=1e-10, atol=1e-12)


def test_shared_output_needs_equal_widths_and_projections_without_bias():
    def check(mixers):
        ParallelConfig(mixers=mixers, shared_output=True).resolved(D, "mixer")

    with pytest.raises(ValueError, match=r"mixer.shared_output: the branches' outputs are \[64, 128\] wide"):
        check([BRANCHES[0], {"kind": "mamba", "expand": 4}])
    with pytest.raises(ValueError, match=r"mixer.mixers\[0\]: a shared output projection has no bias"):
        check([{**BRANCHES[0], "o_bias": True}, BRANCHES[1]])
    with pytest.raises(ValueError, match=r"mixers\[1\]: mixer kind 'retention' has no output projection to share"):
        check([BRANCHES[0], {"kind": "retention", "n_heads": 2}])


def test_meta_tokens_are_tokens_the_model_reads_first():
    """A model with M meta tokens gives the logits that the same weights give, without meta tokens, to the
    sequence of those M vectors (as M extra vocabulary entries) followed by the tokens; windows keep them
    in view (sinks) either way, since they sit at positions 0..M-1."""
    M = 3
    layer = {"kind": "parallel", "shared_output": True, "mixers": BRANCHES}
    spec = tiny(d_model=D, n_layers=2, mixer=layer, meta_tokens=M)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    plain = build_model({**spec, "meta_tokens": 0, "vocab_size": 97 + M}).eval()
    state = {k: v for k, v in model.state_dict().items() if k != "meta_tokens"}
    state["embed_tokens.weight"] = torch.cat([model.embed_tokens.weight, model.meta_tokens]).detach()
    state["lm_head.weight"] = torch.cat([model.lm_head.weight, torch.zeros(M, D)]).detach()
    plain.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = plain(torch.cat([torch.arange(97, 97 + M).expand(2, -1), ids], dim=1))[:, M:, :97]
        torch.testing.assert_close(model(ids), expected)
    assert model.meta_tokens.std() > 0.5  # Hymba's draw: standard normal, not the embeddings' 0.02


def test_meta_tokens_refuse_packed_documents_and_positions():
    model = build_model(tiny(meta_tokens=2))
    ids = torch.randint(0, 97, (1, 6))
    with pytest.raises(ValueError, match="meta_tokens=2 go before a sequence's first token"):
        model(ids, doc_ids=torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="meta_tokens=2 cannot be combined with blocks"):
        build_model(tiny(meta_tokens=2, blocks={"length": 4, "prefix": 1, "token_layers": 1}))


def test_a_parallel_layer_reads_kv_through_its_attention_branch_only():
    layer = {"kind": "parallel", "mixers": BRANCHES}
    build_model(tiny(d_model=D, n_layers=2, mixer=layer, kv_source=[0, 0]))  # Hymba's consecutive sharing
    plain = {"kind": "attention", "n_heads": HEADS, "n_kv_heads": KV_HEADS, "head_dim": HEAD, "v_head_dim": V_HEAD,
             "window": WINDOW, "sinks": SINKS}  # fmt: skip
    with pytest.raises(ValueError, match="the source must be a parallel layer with one attention branch"):
        build_model(tiny(d_model=D, n_layers=2, mixer=None, pattern="AP", mixers={"A": plain, "P": layer},
                         kv_source=[0, 0]))  # fmt: skip
    other = {**layer, "mixers": [{**BRANCHES[0], "sinks": 1}, BRANCHES[1]]}
    with pytest.raises(ValueError, match="sinks=1 differs from the source's sinks=3"):
        build_model(tiny(d_model=D, n_layers=2, mixer=None, pattern="PQ", mixers={"P": layer, "Q": other},
                         kv_source=[0, 0]))  # fmt: skip
    with pytest.raises(ValueError, match="sinks=2 keeps the first positions beside a sliding window"):
        build_model(tiny(mixer={"kind": "attention", "n_heads": 4, "sinks": 2}))
