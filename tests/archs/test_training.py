import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from kvlab import ModelConfig, build_model
from tests.archs.test_decode import VARIANTS
from tests.conftest import PRESETS, preset_dict


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_reach_every_parameter(name):
    model = build_model(VARIANTS[name])
    ids = torch.randint(0, 97, (2, 16))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_loss_falls_on_a_repeated_batch():
    model = build_model(VARIANTS["gqa"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 32))
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tied_embeddings_share_one_tensor():
    model = build_model(VARIANTS["bias_tied"])
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


CHECKPOINTED = {
    **{name: VARIANTS[name] for name in ("gqa", "cla2", "window", "dgqa", "matryoshka")},
    # LCKV's two passes with gradients: the first pass's layers recompute after the second rewrote what they read
    "lckv": VARIANTS["lckv"] | {"kv_sharing": {"kind": "lckv", "warmup": 1}, "passes": {"no_grad": 3, "grad": 2}},
}


@pytest.mark.parametrize("name", list(CHECKPOINTED))
def test_activation_checkpointing_gives_the_same_step(name):
    """In float64, the same loss, gradients and training state (DGQA's allocation, MatryoshkaKV's rank step) with
    and without activation checkpointing: the recomputation reads what the forward read. Before, MatryoshkaKV's
    recomputation took the next pair of ranks (an error) and LCKV's first pass read the second's keys (gradients
    3e-4 off)."""
    ids = torch.randint(0, 97, (2, 17))
    steps = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(CHECKPOINTED[name]).double().train()
        model.activation_checkpointing = ckpt
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        model.after_training_batch()
        steps.append((loss, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers())))
    (loss, grads, buffers), (loss_c, grads_c, buffers_c) = steps
    torch.testing.assert_close(loss_c, loss, atol=1e-13, rtol=1e-13)
    for n, g in grads.items():
        torch.testing.assert_close(grads_c[n], g, atol=1e-12, rtol=1e-10, msg=n)
    for n, b in buffers.items():
        torch.testing.assert_close(buffers_c[n], b, atol=0, rtol=0, msg=n)


def _losses(spec, compile_blocks, steps: int = 20, packed: bool = False, checkpointing: bool = False):
    torch.manual_seed(0)
    model = build_model(spec).train()
    model.compile_blocks, model.activation_checkpointing = compile_blocks, checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    doc_ids = torch.tensor([[0] * 10 + [1] * 22] * 2) if packed else None
    losses = []
    for step in range(steps):
        if step == 1:  # compiled after the first step: any later compilation is a recompilation
            graphs = counters["stats"]["unique_graphs"]
        ids = torch.randint(0, 97, (2, 33), generator=data)
        loss = model(ids[:, :-1], labels=ids[:, 1:], doc_ids=doc_ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.graphs_after_first_step = counters["stats"]["unique_graphs"] - graphs
    return torch.tensor(losses), model


@pytest.mark.parametrize(
    "name, packed, checkpointing, backend",
    [
        ("yoco_swa", True, False, "aot_eager"),
        ("lckv", False, True, "aot_eager"),
        ("mamba_moe", False, False, "aot_eager"),
        ("rwkv6", True, False, "aot_eager"),
        ("griffin", True, False, "aot_eager"),  # the RG-LRU's scan: a custom autograd function inside the graphs
        ("gemma2_softcaps", True, False, "aot_eager"),  # capped scores, formed (no fused kernel takes them on CPU)
        # gpt-oss's sinks as a key (one more channel, a query before the others), its experts' biases and clamps
        pytest.param("gpt_oss", True, False, "aot_eager", marks=pytest.mark.slow),
        # Dynamo's graphs alone: AOT autograd's decomposed ops round otherwise, which MatryoshkaKV's Cayley solves
        # amplify (4e-5 relative by step 18); through Dynamo alone its losses are eager's to the bit
        ("matryoshka", False, False, "eager"),
    ],  # fmt: skip
)
def test_compiled_blocks_train_like_eager(name, packed, checkpointing, backend):
    """trainer.compile: 20 AdamW steps through compiled blocks (traced into AOT autograd's forward and
    backward graphs; Inductor's code in the slow test) give eager's losses, packed documents and the
    parallel passes of layers that read later layers included; inference stays eager. Nothing recompiles
    after the first step: the experts' row counts, new every step, stay outside the graphs, as do Mamba-1's
    token loop (unrolled into a block's graph it took jamba 305 s to compile, then 15 s a step), the vector
    decays' choice of form (RWKV-6), which reads their values, and MatryoshkaKV's attention, whose ranks (and
    shapes) change every step."""
    expected, _ = _losses(VARIANTS[name], None, packed=packed, checkpointing=checkpointing)
    losses, model = _losses(VARIANTS[name], backend, packed=packed, checkpointing=checkpointing)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-5)
    assert model.graphs_after_first_step == 0
    # the compiled blocks live beside the model: its state dict is eager's, a copy compiles its own
    assert dict(model.state_dict()).keys() == dict(build_model(VARIANTS[name]).state_dict()).keys()
    twin = copy.deepcopy(model)
    twin.compile_blocks = None
    torch.testing.assert_close(twin(torch.arange(9)[None]), model(torch.arange(9)[None]))


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++")), reason="Inductor needs a C++ compiler")
def test_inductor_blocks_train_like_eager():
    expected, _ = _losses(VARIANTS["gqa"], None)
    losses, _ = _losses(VARIANTS["gqa"], "inductor")
    torch.testing.assert_close(losses, expected, atol=1e-4, rtol=1e-4)


BF16_DEFAULT = ("gqa", "mla", "mamba2", "rwkv7", "samba", "retnet")  # attention, MLA, four scans; the rest slow


@pytest.mark.parametrize("name", [n if n in BF16_DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in PRESETS])
def test_every_preset_trains_under_bf16_autocast_on_a_cpu(name):
    """trainer.precision=bf16-mixed on a CPU (README, "bf16 on a CPU"): one training step of each preset at its own
    shapes under bf16 autocast gives fp32's loss and gradient norm to bf16's rounding, gradients in the weights'
    float32. (KDGQA's groups follow its keys' norms, which bf16 may rank otherwise: 1.5% on the norm.)"""
    config = ModelConfig.from_dict(preset_dict(name))
    ids = torch.randint(0, config.vocab_size, (2, min(128, config.max_seq_len) + 1))
    context = torch.randint(0, config.vocab_size, (2, 32)) if config.context is not None else None
    torch.manual_seed(0)
    weights = build_model(config).state_dict()
    seen = []
    for autocast in (False, True):
        model = build_model(config).train()
        model.load_state_dict(weights)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(ids[:, :-1], labels=ids[:, 1:], context=context)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.dtype == torch.float32 for g in grads)
        seen.append((loss.item(), float(torch.stack([g.norm() for g in grads]).norm())))
    (loss, norm), (half_loss, half_norm) = seen
    assert half_loss == pytest.approx(loss, abs=0.02) and half_norm == pytest.approx(norm, rel=0.05)
