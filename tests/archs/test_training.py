import pytest
import torch
import torch.nn.functional as F

from kvlab import build_model
from tests.archs.test_decode import VARIANTS


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


@pytest.mark.parametrize("name", ["gqa", "cla2", "window"])
def test_activation_checkpointing_gives_the_same_gradients(name):
    ids = torch.randint(0, 97, (2, 16))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(VARIANTS[name])
        model.activation_checkpointing = ckpt
        F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)
