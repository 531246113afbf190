"""The Block Transformer (Ho et al. 2024, "Block Transformer: Global-to-Local Language Modeling for Fast
Inference"; its code, itsnamgyu/block-transformer), built from the decoder's own blocks and caches.

A sequence is cut into blocks of ``L`` tokens (``blocks.length``).

- **embedder** (the paper's lookup embedder): a block's ``L`` token embeddings of ``d_model / L`` channels
  each, concatenated into one ``d_model`` vector;
- **block decoder**: the model's plan (any mixers), causal over the block vectors, preceded by a learned
  start block; its output at block ``b`` (normalised) is the context of block ``b + 1``;
- **token decoder** (the prefix strategy): a linear map (the paper's expansion layer) turns a block's
  context into ``P`` vectors (``blocks.prefix``) that precede the block's own tokens, and
  ``blocks.token_layers`` layers of ``mixer`` run causally over those ``P + L - 1`` positions and nothing
  else. The prefix's last output predicts the block's first token; token ``i`` predicts token ``i + 1``.
  Its embeddings, final norm and head are the decoder's ``embed_tokens``, ``norm`` and ``lm_head``.

So the logits at position ``t`` (predicting token ``t + 1``) come from the token decoder of that token's
block, which sees the block decoder's context of every earlier block and the block's tokens up to ``t``:
causal, as ``CausalLM``'s. With ``L = 1`` the block decoder is an ordinary decoder over the tokens and the
token decoder sees only its own position's prefix: a deeper decoder whose top ``token_layers`` layers mix no
positions.

Cache: the block decoder's slots hold one entry per block (plus the start block); the token decoder's hold the
``P + L - 1`` positions of the current block and are rewritten from its prefix when a block begins. The
footprint counts the former per ``L`` tokens and the latter as fixed bytes (allocated once, whatever the
context); ``cache.nbytes()`` equals it.

Deviations (README): a learned start block precedes the first (the official code pads the first block with
pad tokens, or trains on randomly padded first blocks), so every token is predicted; the block decoder's
positions are block indices and the token decoder's restart at 0 in each block (RoPE; the official GPT-NeoX
models do the same); decoding is eager (a step does different work at the end of a block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvlab.archs.cache import Cache
from kvlab.archs.config import ModelConfig
from kvlab.archs.footprint import Footprint, FootprintRow
from kvlab.archs.model import Block, CausalLM, module_rng
from kvlab.layers import build_norm
from kvlab.layers.base import StepState
from kvlab.layers.cache_policy import CachePolicy, policy_footprints


class BlockCache(Cache):
    """A Block Transformer's cache: the block decoder's (``blocks``: one position per block, ``seen`` of them),
    the token decoder's (``tokens``: the current block's prefix and tokens) and the current block's tokens so
    far (``pending``). ``seen`` counts tokens."""

    def __init__(self, blocks: Cache, tokens: Cache, block_length: int, prefix: int, max_len: int, config, dtype,
                 device):  # fmt: skip
        self.blocks, self.tokens, self.block_length, self.prefix = blocks, tokens, block_length, prefix
        super().__init__([], blocks.batch_size, max_len, [], config=config, dtype=dtype, policy=blocks.policy)
        self.pending = torch.zeros(blocks.batch_size, block_length, dtype=torch.long, device=device)

    @property
    def seen(self) -> int:
        return self._seen

    @seen.setter
    def seen(self, tokens: int) -> None:
        """Tokens seen; the two decoders' counts follow from it (the start block and every completed block;
        the current block's prefix and its tokens but the last), so setting it (a benchmark's cache of zeros
        at a context) leaves the cache as that many tokens would."""
        self._seen = tokens
        self.blocks.seen = 1 + tokens // self.block_length if tokens else 0
        self.tokens.seen = self.prefix + tokens % self.block_length if tokens else 0

    def nbytes(self) -> int:
        # the token decoder's slots are fixed: what they hold when full (their allocation, but for KIVI's residual)
        return self.blocks.nbytes() + self.tokens.nbytes(self.tokens.max_len)

    def allocated_bytes(self) -> int:
        return self.blocks.allocated_bytes() + self.tokens.allocated_bytes()

    def reorder(self, batch_idx) -> None:
        self.blocks.reorder(batch_idx)
        self.tokens.reorder(batch_idx)
        self.pending.copy_(self.pending.index_select(0, batch_idx.to(self.pending.device)))

    def reset(self) -> None:
        self.blocks.reset()
        self.tokens.reset()
        self.seen = 0  # and the decoders' counts with it

    def __repr__(self) -> str:
        return (f"BlockCache(batch_size={self.batch_size}, max_len={self.max_len}, seen={self.seen}, "
                f"blocks={self.blocks.seen}, allocated_bytes={self.allocated_bytes():,})")  # fmt: skip


class BlockTransformer(CausalLM):
    static_decode = False  # a step's work depends on where its token falls in its block
    takes_padded_rows = False  # blocks count from a row's first token
    prefills_in_pieces = False  # a prompt's blocks are embedded in one pass
    takes_packed_documents = False  # blocks would straddle packed documents

    def __init__(self, config: ModelConfig):
        if config.blocks is None:
            raise ValueError("BlockTransformer needs a config with blocks: {length, prefix, token_layers}")
        self.block_length, self.prefix = config.blocks.length, config.blocks.prefix
        self.token_config = config.token_decoder_config()
        super().__init__(config)  # the block decoder (layers), and the token decoder's embeddings, norm and head

    def _build_extra(self) -> None:
        cfg, d = self.config, self.config.d_model
        self.block_embed = nn.Embedding(cfg.vocab_size, d // self.block_length)  # the lookup embedder
        self.start_block = nn.Parameter(torch.empty(d))
        self.block_norm = build_norm(cfg.norm, d)
        self.expand = nn.Linear(d, self.prefix * d)  # the prefix strategy's expansion layer
        self.token_layers = nn.ModuleList(Block(self.token_config, i) for i in range(self.token_config.n_layers))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        super().init_weights(seed)
        with module_rng(seed, "start_block", self.start_block.device):
            nn.init.normal_(self.start_block, std=self.config.init_std)

    # -- forward --------------------------------------------------------------

    def _forward(self, input_ids, cache, positions, doc_ids, last_only, head: bool = True, states=None, pads=None):
        # states: a context's, which a Block Transformer never has (its config refuses context); pads: none
        # (forward refuses them: takes_padded_rows)
        if doc_ids is not None or positions is not None:
            raise ValueError(
                "doc_ids/positions: a Block Transformer takes unpacked rows (its blocks would straddle packed "
                "documents); train it with data.doc_mask=false"
            )
        B, T = input_ids.shape
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
            hidden = self._parallel(input_ids)
        else:
            if not isinstance(cache, BlockCache) or cache.config != self.config:
                raise ValueError("cache: expected the BlockCache of this model (model.new_cache(...))")
            if B != cache.batch_size:
                raise ValueError(f"input batch size {B} does not match the cache's batch_size={cache.batch_size}")
            if cache.seen + T > cache.max_len:
                raise ValueError(f"cache holds {cache.seen} tokens; {T} more exceed its max_len={cache.max_len}")
            hidden = self._continue(input_ids, cache)
            cache.seen += T
        return self._output(hidden[:, -1:] if last_only else hidden, head)

    def decode_step(self, token, cache, start):
        raise NotImplementedError("the Block Transformer decodes eagerly: model(token, cache=cache)")

    def _contexts(self, h: torch.Tensor) -> torch.Tensor:
        """Block decoder outputs [B, n, D] -> the token decoder prefixes they give, [B, n, P, D]."""
        return self.expand(self.block_norm(h)).unflatten(-1, (self.prefix, self.config.d_model))

    def _block_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, n * L] -> the embedder's block vectors [B, n, D]."""
        return self.block_embed(ids).flatten(-2).unflatten(1, (-1, self.config.d_model))

    def _token_stack(self, z: torch.Tensor, start: int, cache: Cache | None) -> torch.Tensor:
        """The token decoder's layers over ``z`` [B, n, D] at positions ``start..`` of a block's input."""
        state = StepState(start)
        for i, layer in enumerate(self.token_layers):  # (compiled and checkpointed in training, as the blocks')
            z = self._block(layer, z, state, (cache.slots[i], cache.mlp_slots[i]) if cache is not None else None)
        return z

    def _parallel(self, ids: torch.Tensor, cache: BlockCache | None = None) -> torch.Tensor:
        """Every position's last hidden state [B, T, D] (before the final norm), all blocks at once; with an
        empty ``cache`` (a prefill), the caches left as these tokens leave them."""
        L, P, D = self.block_length, self.prefix, self.config.d_model
        B, T = ids.shape
        n = T // L  # complete blocks; block n, partial or empty, needs only their context
        start = self.start_block.to(self.embed_tokens.weight.dtype).expand(B, 1, D)
        x = torch.cat([start, self._block_vectors(ids[:, : n * L])], dim=1)
        blocks_cache = cache.blocks if cache is not None else None
        context = self._contexts(self._stack(x, StepState(0), blocks_cache, False))  # [B, n + 1, P, D]
        inputs = F.pad(ids, (0, (n + 1) * L - T)).view(B, n + 1, L)[..., : L - 1]  # the last token: input to none
        z = torch.cat([context, self.embed_tokens(inputs)], dim=2).flatten(0, 1)  # [B (n + 1), P + L - 1, D]
        predictions = self._token_stack(z, 0, None)[:, P - 1 :].reshape(B, (n + 1) * L, D)  # of tokens 0..
        if cache is not None:  # the current block's prefix and tokens, into the token decoder's cache
            rest = ids[:, n * L :]
            self._begin_block(cache, context[:, n])
            if rest.shape[1]:
                self._token_stack(self.embed_tokens(rest), P, cache.tokens)
            cache.pending[:, : rest.shape[1]] = rest
        return predictions[:, 1 : T + 1]  # position t predicts token t + 1

    def _continue(self, ids: torch.Tensor, cache: BlockCache) -> torch.Tensor:
        """The hidden states of ``ids`` after what ``cache`` holds, the cache brought up to date (its counts
        follow from ``cache.seen``, which the caller advances)."""
        if cache.seen == 0:
            return self._parallel(ids, cache)
        L, P = self.block_length, self.prefix
        j = cache.seen % L  # tokens of the current block already seen
        tokens = torch.cat([cache.pending[:, :j], ids], dim=1)  # from the current block's start
        out, at, blocks = [], 0, cache.blocks.seen
        while True:
            block = tokens[:, at : at + L]
            first = j if at == 0 else 0  # the first new token's place in this block
            inputs_end = min(block.shape[1], L - 1)  # the block's last token is never a token decoder input
            if inputs_end > first:
                out.append(self._token_stack(self.embed_tokens(block[:, first:inputs_end]), P + first, cache.tokens))
            if block.shape[1] < L:
                break
            # the block is complete: the block decoder takes it, and the next block's prefix predicts its first
            h = self._stack(self._block_vectors(block), StepState(blocks), cache.blocks, False)
            blocks += 1
            out.append(self._begin_block(cache, self._contexts(h)[:, 0]))
            at += L
        rest = tokens[:, at:]
        cache.pending[:, : rest.shape[1]] = rest
        return torch.cat(out, dim=1)

    def _begin_block(self, cache: BlockCache, context: torch.Tensor) -> torch.Tensor:
        """A new block from its context [B, P, D]: the prefix written into the token decoder's cache; returns
        the prefix's last hidden state (the prediction of the block's first token)."""
        cache.tokens.reset()
        return self._token_stack(context, 0, cache.tokens)[:, -1:]

    # -- cache and footprint --------------------------------------------------

    def new_cache(self, batch_size=1, max_len=None, dtype=None, device=None, policy=None) -> BlockCache:
        """The block decoder's slots for the start block and ``max_len / L`` blocks, and the token decoder's for
        one block's ``P + L - 1`` positions; ``policy`` for both (``CausalLM.new_cache``)."""
        batch_size, max_len, dtype, device = self._cache_settings(batch_size, max_len, dtype, device)
        policy = CachePolicy.from_spec(policy)
        blocks = self._layer_cache(self.layers, batch_size, 1 + max_len // self.block_length, dtype, device,
                                   policy=policy)  # fmt: skip
        tokens = self._layer_cache(self.token_layers, batch_size, self.prefix + self.block_length - 1, dtype, device,
                                   policy=policy)  # fmt: skip
        return BlockCache(blocks, tokens, self.block_length, self.prefix, max_len, self.config, dtype, device)

    def kv_footprint(self, dtype: torch.dtype = torch.bfloat16, policy=None) -> Footprint:
        """The block decoder's rows per block of ``L`` tokens (and the start block), the token decoder's as
        fixed bytes (one block's positions, allocated once); K/V held through ``policy``."""
        policy = CachePolicy.from_spec(policy)
        rows = [
            FootprintRow(
                r.layer,
                r.kind,
                r.bytes_per_token,
                r.fixed_bytes,
                r.kv_source,
                r.max_tokens,
                per_tokens=self.block_length,
                entries_before=1,
                held=r.held,
            )  # fmt: skip
            for r in super().kv_footprint(dtype, policy).per_layer
        ]
        positions = self.prefix + self.block_length - 1
        first = len(rows)
        mixers = [layer.mixer for layer in self.token_layers]
        held_as = (
            [None] * len(mixers)
            if policy is None
            else policy_footprints(mixers, positions, dtype, policy, "token layer")
        )
        for i, (layer, held) in enumerate(zip(self.token_layers, held_as, strict=True)):
            fp = layer.mixer.kv_footprint(dtype)
            if held is None:
                fixed = fp.total_bytes(positions)
            else:  # the token decoder's slots fill every block: its whole length (or what the policy keeps)
                kept = min(positions, held.max_tokens or positions)
                fixed = held.held(kept) if held.held is not None else held.bytes_per_token * kept
            rows.append(FootprintRow(first + i, f"token {layer.mixer.cfg.kind}", 0, fixed, first + i))
        return Footprint(tuple(rows), dtype, policy=None if policy is None else policy.describe())
