"""The mixture-of-experts MLP: routing against a plain loop over tokens and experts in float64, its two
execution paths, gradients, the load-balancing loss, per-layer MLPs in the config, and training."""

import copy

import pytest
import torch
import torch.nn.functional as F

from kvlab.archs.config import ModelConfig
from kvlab.archs.model import build_model
from kvlab.layers.mlp import MLPConfig, MoE
from tests.conftest import tiny

D = 12


def _moe(**settings) -> MoE:
    cfg = MLPConfig(kind="moe", hidden=8, **settings)
    cfg.validate(D, "mlp")
    torch.manual_seed(0)
    moe = MoE(D, cfg).double()
    moe.init_normal(0.3, 0.3)
    torch.nn.init.normal_(moe.router.weight, std=1.0)  # spread scores: no near-ties in the top k
    if moe.shared is not None:
        for p in moe.shared.parameters():
            torch.nn.init.normal_(p, std=0.3)
    if moe.shared_gate is not None:
        torch.nn.init.normal_(moe.shared_gate.weight, std=1.0)
    for bias in (moe.router.bias, moe.gate_up_bias, moe.down_bias):  # gpt-oss's (zero at init)
        if bias is not None:
            torch.nn.init.normal_(bias, std=0.5)
    return moe


def _loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations, one token and one expert at a time."""
    c = moe.cfg
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = moe.router.weight @ x[n] + (moe.router.bias if c.bias else 0)
        scores = torch.softmax(logits, 0) if c.score == "softmax" else torch.sigmoid(logits)
        chosen = sorted(range(c.n_experts), key=lambda e: -scores[e].item())[: c.top_k]
        total = sum(scores[e] for e in chosen)
        for e in chosen:
            g = scores[e] / total if c.norm_topk else scores[e]
            w_gate, w_up = moe.gate_up_proj[e][: c.hidden], moe.gate_up_proj[e][c.hidden :]
            gate, up = w_gate @ x[n], w_up @ x[n]
            if c.bias:
                gate, up = gate + moe.gate_up_bias[e][: c.hidden], up + moe.gate_up_bias[e][c.hidden :]
            if c.swiglu_limit is None:
                h = F.silu(gate) * up
            else:  # gpt-oss's: the gate clamped above, the up projection both ways, (u + 1) g sigmoid(alpha g)
                L = c.swiglu_limit
                gate, up = torch.minimum(gate, torch.tensor(L)), torch.maximum(torch.minimum(up, torch.tensor(L)),
                                                                               torch.tensor(-L))  # fmt: skip
                h = (up + 1) * gate / (1 + torch.exp(-c.swiglu_alpha * gate))
            down = moe.down_proj[e] @ h + (moe.down_bias[e] if c.bias else 0)
            out[n] += c.routed_scale * g * down
        if moe.shared is not None:
            s = moe.shared
            gate = torch.sigmoid(moe.shared_gate.weight[0] @ x[n]) if c.shared_gate else 1.0
            out[n] += gate * (s.down_proj.weight @ (F.silu(s.gate_proj.weight @ x[n]) * (s.up_proj.weight @ x[n])))
    return out


@pytest.mark.parametrize(
    "settings",
    [
        {"n_experts": 6, "top_k": 2},  # Jamba, DeepSeek-V2: softmax, the chosen scores as they are
        {"n_experts": 5, "top_k": 2, "norm_topk": True},  # Mixtral
        {"n_experts": 6, "top_k": 3, "score": "sigmoid", "norm_topk": True, "routed_scale": 2.5, "n_shared": 2},
        {"n_experts": 4, "top_k": 1},
        {"n_experts": 4, "top_k": 2, "n_shared": 2, "shared_gate": True},  # Qwen2-MoE: its shared expert gated
        # gpt-oss: biases on the router and the experts, the clamped SwiGLU (at 0.4: about half the values reach it)
        {"n_experts": 4, "top_k": 2, "norm_topk": True, "bias": True, "swiglu_limit": 0.4, "swiglu_alpha": 1.5},
    ],
    ids=["softmax", "renormalised", "sigmoid-shared", "top1", "gated-shared", "gpt-oss"],
)
def test_both_paths_match_a_loop_over_tokens_and_experts(settings):
    moe = _moe(**settings)
    x = torch.randn(2, 40, D, dtype=torch.float64)
    want = _loop_reference(moe, x.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(moe(x), want)  # 80 tokens: the grouped path
    scores, experts, weights = moe.route(x.reshape(-1, D))
    gathered = moe._gathered(x.reshape(-1, D), experts, weights.double())
    flat, shared = x.reshape(-1, D), 0
    if moe.shared is not None:  # (the gathered path is the routed experts' alone)
        shared = moe.shared(flat) * (torch.sigmoid(moe.shared_gate(flat)) if moe.shared_gate is not None else 1)
    torch.testing.assert_close(gathered + shared, want.reshape(-1, D))
    one = x[:1, :1]  # one token: the gathered path (decoding)
    torch.testing.assert_close(moe(one), want[:1, :1])


def test_every_expert_that_got_tokens_gets_a_gradient_and_the_others_a_zero_one():
    moe = _moe(n_experts=8, top_k=1)
    x = torch.randn(5, D, dtype=torch.float64)
    _, experts, _ = moe.route(x)
    used = set(experts.flatten().tolist())
    assert len(used) < 8  # 5 tokens, one expert each: some experts get nothing
    moe.train()
    moe(x).square().sum().backward()
    for e in range(8):
        norm = moe.gate_up_proj.grad[e].norm() + moe.down_proj.grad[e].norm()
        assert (norm > 0) == (e in used), e
    assert moe.router.weight.grad.norm() > 0  # through the chosen weights


def test_experts_run_in_float32_under_a_cpus_bf16_autocast():
    """On a CPU, bf16 products build a kernel per new shape, and the experts' row counts change every step: under
    autocast the experts compute as without it (float32), outputs and gradients alike."""
    moe = _moe(n_experts=4, top_k=2).float().train()
    x = torch.randn(2, 9, D, requires_grad=True)
    _, experts, weights = moe.route(x.reshape(-1, D))
    counts = torch.bincount(experts.flatten(), minlength=4)
    runs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = moe._grouped(x.reshape(-1, D), experts, weights.detach(), counts)
        runs.append((y, *torch.autograd.grad(y.square().sum(), [x, moe.gate_up_proj, moe.down_proj])))
    for a, b in zip(*runs, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_the_balance_loss_is_the_expert_level_formula():
    moe = _moe(n_experts=4, top_k=2, aux_loss_coef=0.1).train()
    x = torch.randn(9, D, dtype=torch.float64)
    moe(x)
    scores = torch.softmax(x @ moe.router.weight.T, -1)
    chosen = scores.topk(2, -1).indices
    f = [4 / (2 * 9) * (chosen == e).sum().item() for e in range(4)]
    P = scores.mean(0)
    torch.testing.assert_close(moe.aux_loss, 0.1 * sum(f[e] * P[e] for e in range(4)))
    # uniform scores and an even load give exactly 1
    load = torch.tensor([1, 1, 1, 1])  # two tokens, two experts each
    torch.testing.assert_close(moe.balance(torch.full((2, 4), 0.25, dtype=torch.float64), load),
                               torch.tensor(1.0, dtype=torch.float64))  # fmt: skip
    moe.eval()
    moe.aux_loss = None
    moe(x)
    assert moe.aux_loss is None  # only training forwards leave one


def _jamba_like(**extra) -> dict:
    return tiny(
        n_layers=4, mixer=None, pattern="MA",
        mixers={"M": {"kind": "mamba", "state_dim": 4, "inner_norms": True}, "A": {"kind": "attention", "n_heads": 4}},
        mlp_pattern="DE", mlps={"D": {"kind": "swiglu"}, "E": {"kind": "moe", "n_experts": 4, "hidden": 16}},
        **extra,
    )  # fmt: skip


def test_mlp_pattern_gives_each_layer_its_mlp_and_the_training_loss_its_balance_term():
    model = build_model(_jamba_like())
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["SwiGLU", "MoE", "SwiGLU", "MoE"]
    model.train()
    ids = torch.randint(0, 97, (2, 10))
    model(ids, labels=ids).backward()
    aux = model.aux_loss()
    assert aux is not None and aux.requires_grad
    layers = [layer.mlp.aux_loss for layer in model.layers if isinstance(layer.mlp, MoE)]
    torch.testing.assert_close(aux, layers[0] + layers[1])
    assert build_model(tiny()).aux_loss() is None
    # a copy after the step (its balance terms hold the step's graph, which deepcopy refuses) has none
    twin = copy.deepcopy(model)
    assert twin.aux_loss() is None
    torch.testing.assert_close(model.aux_loss(), aux)  # the model's own are kept
    torch.testing.assert_close(twin.state_dict(), model.state_dict())


def test_layers_specs_may_give_an_mlp():
    cfg = ModelConfig.from_dict(tiny(n_layers=3, mixer=None, layers=[
        {"mixer": {"kind": "attention", "n_heads": 4}, "repeat": 2},
        {"mixer": {"kind": "attention", "n_heads": 4}, "mlp": {"kind": "moe", "n_experts": 3, "top_k": 1}},
    ]))  # fmt: skip
    assert [p.mlp.kind for p in cfg.plan] == ["swiglu", "swiglu", "moe"]
    assert cfg.plan[2].mlp.hidden == 192  # an expert is as wide as a default SwiGLU: 8/3 x 64 rounded up to 64
    assert ModelConfig.from_dict(cfg.to_dict()).plan == cfg.plan


@pytest.mark.parametrize(
    "change, error",
    [
        ({"mlp": {"kind": "swiglu", "n_experts": 4}}, r"mlp\.n_experts=4 set but mlp\.kind=swiglu"),
        ({"mlp": {"kind": "moe", "n_experts": 2, "top_k": 3}}, r"mlp\.top_k=3 exceeds mlp\.n_experts=2"),
        ({"mlp": {"kind": "moe", "score": "relu"}}, r"mlp\.score='relu' is not one of"),
        ({"mlp": {"kind": "moe", "aux_loss_coef": -1.0}}, r"mlp\.aux_loss_coef=-1\.0 must be at least 0"),
        ({"mlp_pattern": "DX", "mlps": {"D": {"kind": "swiglu"}}}, r"mlp_pattern='DX' uses 'X', which is not in mlps"),
        ({"mlp_pattern": "D"}, r"mlps=None must map each name in mlp_pattern='D'"),
        ({"mlp_pattern": "D", "mlps": {"D": {"kind": "moe", "hiden": 3}}}, r"mlps\.D\.hiden: unknown key"),
        (
            {"mlp": {"kind": "moe", "shared_gate": True}},
            r"mlp\.shared_gate=true gates the shared experts, but "
            r"mlp\.n_shared=0",
        ),
    ],
    ids=[
        "moe-field-on-swiglu",
        "top-k",
        "score",
        "coefficient",
        "unknown-name",
        "no-mlps",
        "unknown-key",
        "gate-without-shared",
    ],
)
def test_bad_moe_settings_name_the_field(change, error):
    with pytest.raises(ValueError, match=error):
        ModelConfig.from_dict(tiny(**change))


def test_iso_params_refuses_per_layer_mlps():
    with pytest.raises(ValueError, match="the layers' MLPs differ"):
        ModelConfig.from_dict(_jamba_like()).with_params(100_000)


def test_native_export_refuses_per_layer_mlps(tmp_path):
    from kvlab.archs.hf import save_hf

    model = build_model(tiny(mlp_pattern="DE", mlps={"D": {"kind": "swiglu", "hidden": 96}, "E": {"kind": "moe"}}))
    with pytest.raises(ValueError, match=r"dense layers or norm_topk=False without qk_norm \(Mixtral has experts"):
        save_hf(model, tmp_path / "out", remote_code=False)
    assert not (tmp_path / "out").exists()


def test_deepseek_score_bias_chooses_without_weighing_and_moves_toward_balance():
    moe = _moe(n_experts=4, top_k=1, score="sigmoid", score_bias=True, bias_update=0.1)
    x = torch.randn(30, D, dtype=torch.float64)
    with torch.no_grad():
        moe.score_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))  # expert 0 now wins every choice ...
    scores, chosen, chosen_weights = moe.route(x)
    assert (chosen == 0).all()
    torch.testing.assert_close(chosen_weights, scores[:, :1])  # ... weighed by its score, not score + bias
    model = build_model(tiny(mlp={"kind": "moe", "hidden": 16, "n_experts": 4, "top_k": 1, "score": "sigmoid",
                                  "score_bias": True, "bias_update": 0.1})).train()  # fmt: skip
    ids = torch.randint(0, 97, (2, 20))
    model(ids, labels=ids)
    layer = model.layers[0].mlp
    load = layer.tokens_per_expert.double()
    model.update_routing()
    torch.testing.assert_close(layer.score_bias.double(), 0.1 * torch.sign(load.mean() - load))
    assert torch.equal(layer.score_bias > 0, load < load.mean())  # the underloaded experts are chosen more


def test_eager_decoding_groups_by_expert_past_one_assignment_each_and_a_compiled_step_gathers(monkeypatch):
    """A step of 8 tokens at top 2 over 4 experts: eager, grouped by expert (gathering each token's weights copies
    more than grouping reads); traced, gathered (static shapes: the compiled decode step stays one graph); the same
    outputs either way. One token's two assignments gather in both."""
    moe = _moe(n_experts=4, top_k=2).eval()
    gathered = []
    through = MoE._gathered

    def counted(self, *args):
        gathered.append(args[1].numel())
        return through(self, *args)

    monkeypatch.setattr(MoE, "_gathered", counted)
    x = torch.randn(8, 1, D, dtype=torch.float64)
    with torch.no_grad():
        eager = moe(x)
        moe(x[:1])
        assert gathered == [2]
        traced = torch.compile(moe, backend="eager", fullgraph=True)(x)
    assert gathered == [2, 16]
    torch.testing.assert_close(traced, eager)
