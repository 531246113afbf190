"""The Block Transformer (Ho et al. 2024): blocks embedded, a block decoder over them, a token decoder within
each block; decoding from its two caches, its footprint, and its reduction at block length 1."""

from __future__ import annotations

import pytest
import torch

from kvlab.archs.block_transformer import BlockCache, BlockTransformer
from kvlab.archs.model import build_model
from kvlab.layers.base import StepState
from tests.conftest import tiny

MIXER = {"kind": "attention", "n_heads": 4, "n_kv_heads": 2}


def _model(length: int, prefix: int, **changes) -> BlockTransformer:
    d = tiny(n_layers=2, d_model=48, mixer=MIXER, blocks={"length": length, "prefix": prefix, "token_layers": 2})
    return build_model(d | changes).double().eval()


def _layers(layers, x: torch.Tensor) -> torch.Tensor:
    state = StepState()
    for layer in layers:
        x = layer(x, state)
    return x


@pytest.mark.parametrize("length,prefix", [(4, 2), (3, 1)])
def test_logits_follow_the_papers_flow(length, prefix):
    """Against the paper's flow written block by block in float64, the decoders as black boxes: block b's vector
    concat_i E_blk[x_{bL+i}]; the block decoder over [start, block 0, ..., block n-1]; block b's token decoder
    input [W h_b (as P vectors), E[x_{bL}], ..., E[x_{bL+L-2}]], h_b its output for the blocks before b; its
    output at position P - 1 + i predicts token bL + i."""
    model = _model(length, prefix)
    L, P, D = length, prefix, 48
    ids = torch.randint(0, 97, (2, 3 * L + 1))  # the last block has one token
    T = ids.shape[1]
    with torch.no_grad():
        got = model(ids)
        blocks = [torch.cat([model.block_embed(ids[:, b * L + i]) for i in range(L)], -1) for b in range(T // L)]
        h = _layers(model.layers, torch.stack([model.start_block.expand(2, D), *blocks], 1))
        h = model.expand(model.block_norm(h))
        predictions = []  # of tokens 0, 1, ..., (T // L + 1) L - 1
        for b in range(T // L + 1):
            tokens = [model.embed_tokens(ids[:, b * L + i]) for i in range(L - 1) if b * L + i < T]
            z = torch.stack([*h[:, b].view(2, P, D).unbind(1), *tokens], 1)
            predictions += _layers(model.token_layers, z)[:, P - 1 :].unbind(1)
        want = model.lm_head(model.norm(torch.stack(predictions[1 : T + 1], 1)))
    torch.testing.assert_close(got, want)


def test_block_length_one_is_a_decoder_whose_top_layers_see_one_position():
    """The paper's L_B = 1 case: the block decoder is an ordinary decoder over the tokens (after the start
    block), and each token's prediction comes from the token decoder run on its own prefix alone."""
    model = _model(1, 1)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        got = model(ids)
        x = torch.cat([model.start_block.expand(2, 1, 48), model.block_embed(ids)], 1)
        h = model.expand(model.block_norm(_layers(model.layers, x)))[:, 1:]  # the context after each token
        per_position = torch.cat([_layers(model.token_layers, h[:, t : t + 1]) for t in range(7)], 1)
        want = model.lm_head(model.norm(per_position))
    torch.testing.assert_close(got, want)
    # changing a later token changes no earlier logit: causal
    other = ids.clone()
    other[:, 5] = (ids[:, 5] + 1) % 97
    with torch.no_grad():
        torch.testing.assert_close(model(other)[:, :5], got[:, :5])


@pytest.mark.parametrize("length,prefix,prefill", [(4, 2, 0), (4, 2, 6), (1, 1, 3), (3, 2, 9)])
def test_decoding_from_both_caches_is_the_forward_and_the_cache_is_the_footprint(length, prefix, prefill):
    """Prefills ending inside a block or on its boundary, then token by token; after every step the cache holds
    exactly the footprint: the block decoder's entries per block (start block included), the token decoder's
    one block."""
    model = _model(length, prefix).float()
    ids = torch.randint(0, 97, (2, 14))
    fp = model.kv_footprint(torch.float32)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16, dtype=torch.float32)
        assert isinstance(cache, BlockCache)
        steps = [model(ids[:, :prefill], cache=cache)] if prefill else []
        for t in range(prefill, 14):
            steps.append(model(ids[:, t : t + 1], cache=cache))
            assert cache.nbytes() == fp.total_bytes(t + 1, 2)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    per_block = 2 * 2 * 2 * 12 * 4  # layers x (K, V) x K/V heads x head_dim x fp32
    token_block = 2 * (prefix + length - 1) * (2 * 2 * 12 * 4)
    assert fp.total_bytes(16) == per_block * (1 + 16 // length) + token_block
    assert fp.bytes_per_token == (per_block / length if per_block % length else per_block // length)
    assert cache.allocated_bytes() == 2 * (per_block * (1 + 16 // length) + token_block)


def test_generate_is_greedy_over_the_forward():
    model = _model(4, 2).float()
    ids = torch.randint(0, 97, (2, 5))
    out = model.generate(ids, 7)  # compile: falls back to eager by design
    with torch.no_grad():
        again = out[:, :5]
        for _ in range(7):
            again = torch.cat([again, model(again)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"blocks": {"length": 5}}, "blocks.length=5 must divide d_model=48"),
        ({"blocks": {"prefix": 0}}, "blocks.prefix=0"),
        ({"blocks": {"lenght": 4}}, "lenght"),
        ({"mixer": None, "pattern": "A", "mixers": {"A": MIXER}, "blocks": {}}, "blocks: a Block Transformer's token"),
    ],
)
def test_bad_blocks_name_the_field(changes, message):
    d = tiny(n_layers=2, d_model=48, mixer=MIXER) | changes
    if d["mixer"] is None:
        d.pop("mixer")
    with pytest.raises(ValueError) as e:
        build_model(d)
    assert message in str(e.value)


def test_packed_documents_are_refused():
    model = _model(4, 2)
    ids = torch.randint(0, 97, (1, 8))
    with pytest.raises(ValueError, match="unpacked rows"):
        model(ids, doc_ids=torch.zeros_like(ids))


def test_the_trainers_compiled_and_checkpointed_blocks_include_the_token_decoders(monkeypatch):
    """trainer.compile and trainer.activation_checkpointing reach the token decoder's layers as well as the block
    decoder's (before, the token decoder ran them plainly: half the model neither compiled nor checkpointed)."""
    import kvlab.archs.model as model_module

    compiled, checkpointed = [], []
    monkeypatch.setattr(model_module, "compiled_block", lambda layer, backend: compiled.append(layer) or layer)
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: checkpointed.append(1) or real(*a, **k))
    model = _model(4, 2).train()
    model.compile_blocks, model.activation_checkpointing = "inductor", True
    ids = torch.randint(0, 97, (2, 13))
    model(ids[:, :-1], labels=ids[:, 1:]).backward()
    assert compiled == [*model.layers, *model.token_layers]
    assert len(checkpointed) == len(model.layers) + len(model.token_layers) == 4
    with torch.no_grad():  # and neither outside training
        model.eval()(ids)
    assert len(compiled) == len(checkpointed) == 4
