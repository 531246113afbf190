"""The one generic decoder: every architecture is a ModelConfig of it.

embeddings -> n_layers x [x + mixer(norm(x)); x + mlp(norm(x))] -> norm -> LM head.
The mixer of each layer comes from the registry by its config's ``kind``;
nothing here knows which families exist. Parameter names follow
`transformers` Llama where the two overlap (``q_proj``, ``gate_proj``,
``embed_tokens``, ``lm_head``), which keeps HF import/export a renaming.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kvlab._config import check_float, check_int
from kvlab.archs.cache import Cache
from kvlab.archs.config import ModelConfig
from kvlab.archs.decode import cache_length, compiled_block, decode_step_for
from kvlab.archs.footprint import Footprint, FootprintRow
from kvlab.archs.plan import PassesConfig, Read, cycle_span
from kvlab.kernels.attention import doc_ids_from_cu_seqlens, positions_in_documents
from kvlab.kernels.ops import linear_cross_entropy
from kvlab.kernels.precision import upcast
from kvlab.kernels.registry import use_kernels
from kvlab.layers import MIXERS, build_mlp, build_norm
from kvlab.layers.attention import pads_refused_by_window
from kvlab.layers.base import StepState
from kvlab.layers.cache_policy import CachePolicy, check_model, policy_cache_slots, policy_footprints
from kvlab.layers.cross_attention import ContextEncoder, CrossAttention, CrossBlock
from kvlab.layers.norm import RMSNorm
from kvlab.layers.rope import Rotary

# ``prefill`` (and so ``generate``) takes a longer prompt in pieces of this many tokens. A 16K-token prompt at the
# presets' widths on 2 CPU cores (benchmarks/RESULTS.md, "Chunked prefill"), against one call: x1.01 to x1.10 for
# gqa, mla, cla and yoco_swa, x1.4 to x1.8 for rwkv7, samba_m2 and mamba2 (their scans' activations outgrow the
# caches); 2,048-token pieces were no faster (x0.97 to x1.02 of these), 512-token ones slower for mla and gqa.
PREFILL_CHUNK = 4096


class ScaledEmbedding(nn.Embedding):
    """Embeddings times ``scale`` (``embed_scale``), the scale rounded to the weights' dtype first (as Gemma does:
    a bf16 model multiplies by the bf16 nearest sqrt(d_model))."""

    def __init__(self, num_embeddings: int, dim: int, scale: float):
        super().__init__(num_embeddings, dim)
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * torch.tensor(self.scale, dtype=self.weight.dtype, device=self.weight.device)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, cross_rotary: Rotary | None = None):
        super().__init__()
        plan = cfg.plan[layer_idx]
        # Cross-attention to the context encoder's states (a layer that reads them): CEPE's sublayer between
        # the mixer and the MLP, or XC-Llama's block before the layer (a shared one is the model's, set here by
        # it as ``_shared_cross_block``). Without a context they are skipped: the layer is the plain one.
        self.cross_norm = self.cross = self.cross_block = None
        if any(r.what == "encoder" for r in plan.reads):
            ctx = cfg.context
            d_states, heads = cfg.context_width, ctx.cross_heads
            if ctx.cross == "sublayer":
                self.cross_norm = build_norm(plan.norm, cfg.d_model)
                self.cross = CrossAttention(cfg.d_model, d_states, heads, heads, cfg.d_model // heads, cross_rotary)
            elif not ctx.shared_cross:
                self.cross_block = CrossBlock(cfg.d_model, d_states, heads, plan.norm, cross_rotary)
        # (none before the mixer and the MLP with pre_norms false: OLMo 2 normalises their outputs alone)
        pre_norms, post_norms = cfg.norm_placement(layer_idx)
        self.mixer_norm = build_norm(plan.norm, cfg.d_model) if pre_norms else nn.Identity()
        # what only some mixers are told: attention weights given to or taken from other layers (SA), and the
        # model's depth (lightning's decays)
        extras = {}
        if plan.attention_source != layer_idx:
            extras["attention_source"] = plan.attention_source
        if any(Read("attention", layer_idx) in p.reads for p in cfg.plan):
            extras["shares_attention"] = True
        if plan.mixer.takes_depth:
            extras["n_layers"] = cfg.n_layers
        self.mixer = MIXERS[plan.mixer.kind](
            plan.mixer,
            d_model=cfg.d_model,
            layer_idx=layer_idx,
            kv_source=plan.kv_source,
            max_seq_len=cfg.positions,
            **extras,
        )
        mlp = build_mlp(plan.mlp, cfg.d_model)  # None: no MLP (mlp kind none)
        self.mlp_norm = None if mlp is None else build_norm(plan.norm, cfg.d_model) if pre_norms else nn.Identity()
        self.mlp = mlp
        self.mlp_stateful = getattr(mlp, "stateful", False)
        self.parallel_residual = cfg.parallel_residual
        # norms on the mixer's and the MLP's outputs (post_norms: Gemma's, and OLMo 2's without pre-norms)
        self.mixer_post_norm = build_norm(plan.norm, cfg.d_model) if post_norms else None
        self.mlp_post_norm = build_norm(plan.norm, cfg.d_model) if post_norms and mlp is not None else None
        self.residual_scale = cfg.residual_scale  # Granite's residual_multiplier (None: 1); MiniMax-01's beta
        # MiniMax-01's: the residual is the sublayer's normalised input, times alpha (None: the input itself)
        self.normed_residual = cfg.normed_residual
        self.residual_alpha = cfg.residual_alpha

    def forward(self, x, state: StepState, cache=None, mlp_cache=None, last_only: bool = False):
        """``last_only``: only the last position's output is wanted (a prefill's top layer). The mixer still
        runs over every position, which its cache needs; a stateless MLP runs over the last alone."""
        context = state.context
        block = self.cross_block if self.cross_block is not None else self.__dict__.get("_shared_cross_block")
        if block is not None and context is not None:
            x = block(x, context, state.start, state.positions)
        h = self.mixer_norm(x)
        if self.normed_residual:
            x = h if self.residual_alpha is None else h * self.residual_alpha
        last_only = last_only and not self.mlp_stateful  # a stateful MLP takes every position in
        if last_only and self.cross is None and getattr(self.mixer, "takes_last_only", False):
            mixed = self.mixer(h, cache=cache, state=state, last_only=True)  # [B, 1, D] (or [B, T, D])
        else:
            mixed = self.mixer(h, cache=cache, state=state)
        if self.mixer_post_norm is not None:
            mixed = self.mixer_post_norm(mixed)
        if self.residual_scale is not None:
            mixed = mixed * self.residual_scale
        if self.cross is not None and context is not None:  # the mixer's residual, then the cross sublayer's
            x = x + mixed
            mixed = self.cross(self.cross_norm(x), context, state.start, state.positions)
        if last_only:
            x, mixed = x[:, -1:], mixed[:, -1:]
        if self.mlp is None:
            return x + mixed
        if self.parallel_residual:  # GPT-NeoX's block: the MLP reads the block's input, beside the mixer
            h = self.mlp_norm(x)
            x = x + mixed
        elif isinstance(self.mlp_norm, RMSNorm):  # the residual add fused into the norm
            h, x = self.mlp_norm(mixed, residual=x)
        else:
            x = x + mixed
            h = self.mlp_norm(x)
        if self.normed_residual:
            x = h if self.residual_alpha is None else h * self.residual_alpha
        if self.mlp_stateful:
            out = self.mlp(h, cache=mlp_cache, doc_ids=state.doc_ids, real=state.real)
        else:
            out = self.mlp(h)
        if self.mlp_post_norm is not None:
            out = self.mlp_post_norm(out)
        return x + (out if self.residual_scale is None else out * self.residual_scale)


def _checkpointed(layer: nn.Module, x: torch.Tensor, state: StepState) -> torch.Tensor:
    """``layer(x, state)`` under non-reentrant activation checkpointing: the forward graph is recorded as usual (K/V
    published to readers get their gradients), only activations are recomputed in the backward. The
    recomputation must read what the forward read, and two things change in between: LCKV's passes rewrite what
    layers published (``state.published``, ``state.earlier_pass``) before the backward of a pass that is not the
    last, and a training forward moves the layer's own training state (DGQA's allocation, MatryoshkaKV's rank
    step: the buffers its modules name in ``moved_by_forward``). So each run reads a copy of the publications as
    they were, and the recomputation those buffers as they were (restored after it); what the forward publishes
    goes on to the layers after it."""
    published, earlier = dict(state.published), dict(state.earlier_pass)
    buffers = [
        b
        for m in layer.modules()
        for name in getattr(m, "moved_by_forward", ())
        if (b := getattr(m, name, None)) is not None
    ]
    before = [b.clone() for b in buffers]
    runs = []

    def run(x: torch.Tensor) -> torch.Tensor:
        view = dataclasses.replace(state, published=dict(published), earlier_pass=earlier)
        runs.append(view)
        if len(runs) == 1:  # the forward
            return layer(x, view)
        now = [b.clone() for b in buffers]
        with torch.no_grad():
            for b, old in zip(buffers, before, strict=True):
                b.copy_(old)
        try:
            return layer(x, view)
        finally:
            with torch.no_grad():
                for b, current in zip(buffers, now, strict=True):
                    b.copy_(current)

    out = checkpoint(run, x, use_reentrant=False)
    state.published.update(runs[0].published)
    return out


class CausalLM(nn.Module):
    # Whether ``decode_step`` serves every position with one static-shape graph (compiled decoding); a model
    # whose step does different work by position decodes eagerly
    static_decode = True
    # Whether forward takes packed rows (doc_ids); a model whose units straddle documents does not
    takes_packed_documents = True
    # Whether forward takes left-padded rows (attention_mask); a model whose units count from a row's start does not
    takes_padded_rows = True
    # Whether ``generate`` may prefill a long prompt in pieces, each on the cache the ones before filled
    prefills_in_pieces = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        if config.embed_scale is None:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        else:
            self.embed_tokens = ScaledEmbedding(config.vocab_size, config.d_model, config.embed_scale)
        if config.meta_tokens:  # Hymba: learned vectors before every sequence, at positions 0..meta_tokens-1
            self.meta_tokens = nn.Parameter(torch.empty(config.meta_tokens, config.d_model))
            self.takes_packed_documents = False  # they go before a row, not before each document in it
        rotary = self._build_context()
        self.layers = nn.ModuleList(Block(config, i, rotary) for i in range(config.n_layers))
        if getattr(self, "shared_cross_block", None) is not None:
            for i in config.context.cross_layers:  # a reference, not a submodule: its parameters are the model's
                self.layers[i].__dict__["_shared_cross_block"] = self.shared_cross_block
        self.norm = build_norm(config.norm, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # Layers low..high rerun in parallel passes when some read later layers (LCKV); the sources read so.
        self._cycle = cycle_span(config.plan)
        self._later_sources = sorted({r.layer for p in config.plan for r in p.reads if r.is_later(p.index)})
        # Recompute each block in the backward pass instead of keeping its activations.
        self.activation_checkpointing = False
        # A torch.compile backend ("inductor") for each block of a training forward (grad on, no cache); None:
        # eager. Per block, so compilation does not grow with depth beyond one trace per block (Inductor's
        # kernels, equal for equal blocks, are compiled once); inference and validation stay eager.
        self.compile_blocks: str | None = None
        self._build_extra()
        # LongRoPE's original context, the first position its long factors turn (None: no layer has it), read from
        # the rotaries once: generate, prefill and the remote code's every step ask for it
        self._longrope_switch = min((m.original for m in self.modules() if isinstance(m, Rotary) and m.original
                                     is not None), default=None)  # fmt: skip
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def _build_context(self) -> Rotary | None:
        """A context encoder's modules (``config.context``): the encoder of its own (CEPE), the shared cross
        block (XC-Llama); the rotary of the cross-attention (``cross_rope``), returned for the blocks."""
        c = self.config.context
        if c is None:
            return None
        longest = max(self.config.max_seq_len, c.max_len)
        rotary = Rotary(self.config.d_model // c.cross_heads, 10000.0, longest) if c.cross_rope else None
        if c.encoder == "separate":
            self.context_encoder = ContextEncoder(self.config.vocab_size, c.encoder_d_model, c.encoder_layers,
                                                  c.encoder_heads, c.encoder_hidden, self.config.norm,
                                                  c.chunk or c.max_len)  # fmt: skip
        if c.shared_cross:
            self.shared_cross_block = CrossBlock(self.config.d_model, self.config.context_width,
                                                 c.cross_heads, self.config.norm, rotary)  # fmt: skip
        return rotary

    def encode_context(self, context: torch.Tensor) -> torch.Tensor:
        """The context encoder's states [B, C, d] for context token ids [B, C]: the context is cut into
        ``context.chunk``-token chunks encoded independently and in parallel (the last may be shorter)."""
        B, C = context.shape
        size = self.config.context.chunk or C
        whole = C // size * size
        parts = [self._encode(context[:, :whole].reshape(-1, size)).reshape(B, whole, -1)] if whole else []
        if whole < C:
            parts.append(self._encode(context[:, whole:]))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _encode(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.context.encoder == "separate":
            training = self.training and torch.is_grad_enabled()
            compiled = None if not training or self.compile_blocks is None else (
                lambda layer: compiled_block(layer, self.compile_blocks))  # fmt: skip
            return self.context_encoder(ids, checkpointed=self.activation_checkpointing and training, compiled=compiled)
        with torch.no_grad():  # XC-Llama: the frozen decoder's final (normalised) states, no gradient
            return self._run(ids, StepState(), None, last_only=False, head=False)

    def _build_extra(self) -> None:
        """Where a model made of this decoder (the Block Transformer) adds its own modules, before the weights
        are initialised."""

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when the config asks (``to_empty`` unties them)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; residual-output projections scaled by
        1/sqrt(2 n_layers) (GPT-2). Also call after ``to_empty`` from the meta device.

        ``seed``: each module draws from a generator of its own, seeded by ``seed`` and the module's name, instead
        of from torch's global one in module order. Two models then start with the same weights wherever they
        have a module of the same name (and the same leading rows where its shape differs: MHA's and GQA's key
        projections), whatever else differs between them: common random numbers, which make a comparison of
        architectures at one seed differ by the architecture and not by the luck of their draws."""
        self.tie_weights()
        std = self.config.init_std
        for name, module in self.named_modules():
            with module_rng(seed, name, self.embed_tokens.weight.device):
                self._init_module(name, module, std)
        if self.config.meta_tokens:  # standard normal, as Hymba's code draws them (torch.randn)
            with module_rng(seed, "meta_tokens", self.meta_tokens.device):
                nn.init.normal_(self.meta_tokens)

    def _init_module(self, name: str, module: nn.Module, std: float) -> None:
        """``module``'s own parameters and buffers (not its children's, which have their turn)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scaled = name.endswith(("o_proj", "down_proj", "out_proj"))
            nn.init.normal_(module.weight, std=std / math.sqrt(2 * self.config.n_layers) if scaled else std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "init_normal"):  # stacked weights (MoE experts): the same two scales
            module.init_normal(std, std / math.sqrt(2 * self.config.n_layers))
        elif module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()  # norms, and mixers' own special parameters (before their children)
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    # -- forward --------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        positions: torch.Tensor | None = None,
        *,
        doc_ids: torch.Tensor | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with ``last_only``); with ``labels``, the loss.

        With a cache, the tokens continue what the cache has seen (prefill
        when it is empty, decoding after) and the cache advances in place.
        ``doc_ids`` [B, T] marks packed documents: tokens attend within their
        own document and positions restart at each (training, no cache);
        ``cu_seqlens`` says the same in flash-attn's varlen form (the
        cumulative document lengths over the flattened batch), instead.
        ``labels`` [B, T] (next-token targets, -100 ignored): the mean
        cross-entropy instead of the logits, through the fused head + loss
        kernel, so the full logits never exist at once. Kernels are the
        config's ``kernels`` mode (``KVLAB_KERNELS`` overrides it).
        ``context`` [B, C] (a model with ``config.context``): token ids the
        model's context encoder encodes and its cross layers attend to; with a
        cache, give it with the first tokens of an empty cache, which keeps
        its encoded states for every later step.
        ``attention_mask`` [B, T] or [B, seen + T] (``transformers``' form, with
        the cached tokens), 1 for a token and 0 for a pad: left-padded rows,
        each one's pads before its tokens. Every row then gets the outputs it
        has alone, unpadded; the cache remembers the pads, so later steps need
        no mask. Outputs at pad positions are meaningless.
        """
        if cu_seqlens is not None:
            if doc_ids is not None:
                raise ValueError("give doc_ids or cu_seqlens (the same documents in flash-attn's form), not both")
            doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, tuple(input_ids.shape))
        if labels is not None and (
            not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape or labels.is_floating_point()
        ):
            got = f"a {labels.dtype} tensor of shape {list(labels.shape)}" if isinstance(labels, torch.Tensor) else (
                type(labels).__name__)  # fmt: skip
            raise ValueError(f"labels: expected integer next-token targets of input_ids' shape "
                             f"{list(input_ids.shape)} (-100 where ignored), got {got}")  # fmt: skip
        with use_kernels(self.config.kernels):
            states = self._context_states(context, input_ids, cache, doc_ids)
            pads = self._pads(attention_mask, input_ids, cache, positions, doc_ids)
            if labels is None:
                return self._forward(input_ids, cache, positions, doc_ids, last_only, states=states, pads=pads)
            hidden = self._forward(input_ids, cache, positions, doc_ids, last_only, head=False, states=states,
                                   pads=pads)  # fmt: skip
            return linear_cross_entropy(
                self._head_input(hidden), self.lm_head.weight, labels, softcap=self.config.logit_softcap
            )

    def _pads(self, mask, input_ids, cache, positions, doc_ids) -> torch.Tensor | None:
        """Each row's left pads [B] from ``attention_mask`` (checked), or those the cache holds; None: none."""
        held = cache.pads if isinstance(cache, Cache) else None
        if mask is None:
            return held
        seen = cache.seen if cache is not None else 0
        B, T = input_ids.shape
        if (
            not isinstance(mask, torch.Tensor)
            or mask.dim() != 2
            or mask.shape[0] != B
            or mask.shape[1] not in (T, seen + T)
        ):
            shape = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask: expected a [batch, tokens] tensor of shape [{B}, {T}]"
                             f"{f' or [{B}, {seen + T}]' if seen else ''}, got {shape}")  # fmt: skip
        mask = mask.to(input_ids.device).bool()
        pads = (~mask).sum(dim=1)
        if not bool((mask == (torch.arange(mask.shape[1], device=mask.device) >= pads[:, None])).all()):
            raise ValueError("attention_mask: rows must be left-padded (each row's 0s before its 1s); "
                             "pad on the left, as transformers' tokenizers do with padding_side='left'")  # fmt: skip
        if mask.shape[1] == T and seen:  # this step's tokens alone: after the pads, so none of them is one
            if bool(pads.any()):
                raise ValueError(f"attention_mask: the cache has seen {seen} tokens; pads go before a row's "
                                 "first token, so later steps hold none")  # fmt: skip
            return held
        if not bool(mask[:, -1].all()):
            raise ValueError("attention_mask: a row holds only pads; give every row at least one token")
        if not bool(pads.any()):
            pads = None
        if seen and not _same_pads(pads, held):
            raise ValueError("attention_mask: its pads differ from those of the tokens the cache has seen")
        if pads is None:
            return held
        if positions is not None or doc_ids is not None:
            raise ValueError("attention_mask with pads cannot be combined with positions or doc_ids")
        if not self.takes_padded_rows:
            raise ValueError(f"attention_mask: {type(self).__name__} takes no padded rows; pass rows one at a time")
        refusing = sorted({layer.mixer.cfg.kind for layer in self.layers if not layer.mixer.cfg.takes_pads})
        if refusing:
            raise ValueError(f"attention_mask: mixer kind {', '.join(map(repr, refusing))} takes no padded rows "
                             "(its segments or chunks count from a row's first token); "
                             "pass rows one at a time")  # fmt: skip
        why = cache.pads_refused_because() if isinstance(cache, Cache) else None
        if why:
            raise ValueError(f"attention_mask: cache policy {cache.policy.describe()} takes no padded rows ({why}); "
                             "pass rows one at a time (kvlab's generate does)")  # fmt: skip
        if cache is not None:
            cache.pads = pads
        return pads

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary losses of the last training forward (MoE layers' load balancing, weighted by their
        ``aux_loss_coef``), summed over layers; None for a model without any. The training step adds it to
        the language-model loss."""
        losses = [m.aux_loss for m in self.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
        return torch.stack(losses).sum() if losses else None

    @torch.no_grad()
    def after_training_batch(self, reduce=None) -> None:
        """What a training step does to the model outside its gradient, after each batch's backward (each
        micro-batch's under gradient accumulation), from the batch's forward: MoE score biases
        (``update_routing``) and MixCon's online learning of its Conba layers' control gains. ``reduce`` sums a
        tensor over ranks."""
        self.update_routing(reduce)
        for m in self.modules():
            if hasattr(m, "apply_gain_update"):
                m.apply_gain_update(reduce)

    @torch.no_grad()
    def update_routing(self, reduce=None) -> None:
        """After a training batch's backward: MoE layers with ``bias_update`` move their score biases toward balance
        (DeepSeek-V3), from the last training forward's tokens per expert, summed over ranks by ``reduce``
        (a function of a tensor, e.g. the strategy's all-reduce; None: this process's counts)."""
        for m in self.modules():
            if getattr(m, "score_bias", None) is not None and m.cfg.bias_update and m.tokens_per_expert is not None:
                m.update_score_bias(reduce(m.tokens_per_expert) if reduce is not None else None)

    def _context_states(self, context, input_ids, cache, doc_ids) -> torch.Tensor | None:
        """``context`` checked and encoded (with a cache: written into it, and None returned: the cache serves
        it to every step)."""
        if context is None:
            return None
        if self.config.context is None:
            raise ValueError("context: this model has no context encoder (its config has no context: section)")
        self.check_token_ids(context, "context")
        if context.shape[0] != input_ids.shape[0]:
            raise ValueError(f"context has {context.shape[0]} rows but input_ids has {input_ids.shape[0]}")
        c, C = self.config.context, context.shape[1]
        if C > c.max_len:
            raise ValueError(f"context of {C} tokens exceeds context.max_len={c.max_len}")
        if c.encoder == "decoder" and c.chunk is None and C > self.config.max_seq_len:
            raise ValueError(f"context of {C} tokens: the decoder encodes it at once, beyond its max_seq_len="
                             f"{self.config.max_seq_len}; set context.chunk to encode it in chunks")  # fmt: skip
        if doc_ids is not None:
            raise ValueError("context cannot be combined with doc_ids: a row with a context is one sequence")
        if cache is None:
            return self.encode_context(context)
        if cache.seen or cache.context_len:
            raise ValueError(
                f"context: the cache has seen {cache.seen} tokens and holds {cache.context_len} context tokens; "
                f"give the context with the first tokens of an empty cache (it is encoded once, before them)"
            )
        cache.write_context(self.encode_context(context))
        return None

    def _forward(self, input_ids, cache, positions, doc_ids, last_only, head: bool = True, states=None, pads=None):
        """Logits, or with ``head=False`` the final normalised hidden states. ``pads`` [B]: each row's left pads."""
        B, T = input_ids.shape
        meta = self.config.meta_tokens
        if meta and (doc_ids is not None or positions is not None):
            raise ValueError(f"meta_tokens={meta} go before a sequence's first token, at positions 0..{meta - 1}: "
                             "doc_ids (packed documents) and positions cannot be given")  # fmt: skip
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (packed documents) cannot be combined with a cache")
            if positions is None:
                positions = positions_in_documents(doc_ids)
        if cache is not None:
            if not isinstance(cache, Cache):
                raise ValueError(f"cache: expected a kvlab Cache from model.new_cache(...), got {type(cache).__name__}")
            if cache.config is not self.config and cache.config != self.config:
                raise ValueError("cache: it was made by another model (model.new_cache of a different config)")
            if B != cache.batch_size:
                raise ValueError(f"input batch size {B} does not match the cache's batch_size={cache.batch_size}")
            if cache.seen + T > cache.max_len:
                raise ValueError(f"cache holds {cache.seen} tokens; {T} more exceed its max_len={cache.max_len}")
        elif T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        passes = self.config.layer_passes
        if self._cycle is not None and cache is not None and T > 1 and passes.prefill == "sequential":
            steps = [
                self._forward(input_ids[:, t : t + 1], cache, None, None, False, head, pads=pads) for t in range(T)
            ]
            out = torch.cat(steps, dim=1)
            return out[:, -1:] if last_only else out
        state = StepState(cache.start if cache is not None else 0, positions, doc_ids, context=states)
        if pads is not None:
            state.pads, state.pad_from = pads, self.config.meta_tokens
        out = self._run(input_ids, state, cache, last_only, head, meta=bool(meta) and (cache is None or not cache.seen))
        if cache is not None:
            cache.seen += T
        return out

    def decode_step(self, token: torch.Tensor, cache: Cache, start: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of one token per sequence [B, 1] at position ``start`` (``cache.start``), a 0-d
        integer tensor.

        The static-shape step that ``generate`` compiles (``kvlab.archs.decode``): every slot is read whole
        and masked, nothing depends on the position's value, so one graph serves every step. It neither
        checks its arguments nor advances ``cache.seen``: its caller does both, outside the graph. It
        continues a sequence: with meta tokens, the eager prefill is the first step (it writes them).
        """
        state = StepState(start, pads=cache.pads, pad_from=cache.prefix)
        return self._run(token, state, cache, last_only=False, head=True)[:, -1]

    def _run(self, input_ids, state: StepState, cache, last_only: bool, head: bool, meta: bool = False):
        """With ``meta``, the step is a sequence's first: the meta tokens go before its tokens, and their
        outputs are dropped."""
        if cache is not None and cache.context_len:  # held in the cache's dtype, computed with in the model's
            state.context = cache.context_states().to(self.embed_tokens.weight.dtype)
        x = self.embed_tokens(input_ids)
        if meta:
            x = torch.cat([self.meta_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if state.pads is not None:  # positions count real tokens; which of the step's tokens are real
            state.positions = state.real_positions(x.shape[1])
            if not isinstance(state.start, torch.Tensor):  # (the compiled decode step continues a sequence)
                state.real = state.real_tokens(x.shape[1])
        x = self._stack(x, state, cache, last_only)
        if meta and not last_only:
            x = x[:, self.config.meta_tokens :]
        return self._output(x, head)

    def _stack(self, x: torch.Tensor, state: StepState, cache, last_only: bool) -> torch.Tensor:
        """The layers on the embedded inputs ``x`` [B, T, D]: the last hidden states, before the final norm."""
        T = x.shape[1]
        passes = self.config.layer_passes
        top = 0
        if self._cycle is not None:
            low, high = self._cycle
            x = self._layers(self._layers(x, state, cache, 0, low), state, cache, low, high + 1, passes=passes)
            top = high + 1
        stateless_from = len(self.layers)
        if cache is not None and last_only and T > 1:
            # Top layers that keep no state (they read K/V that lower layers cached, as YOCO's
            # cross-decoder or CLA's last reader) need only the last position of a prefill.
            while stateless_from > top and cache.layer_is_stateless(stateless_from - 1):
                stateless_from -= 1
        # (a training forward keeps every row through its MLPs: an MoE's balance is over all of them; the
        # last position's attention alone has no mask for packed documents)
        trim = last_only and state.doc_ids is None and not (self.training and torch.is_grad_enabled())
        x = self._layers(x, state, cache, top, stateless_from, last_only=trim)
        if last_only:
            x = x[:, -1:]
        if stateless_from < len(self.layers):
            x = self._layers(x, state.tail(T), cache, stateless_from, len(self.layers))
        return x

    def _output(self, x: torch.Tensor, head: bool) -> torch.Tensor:
        h = self.norm(x)
        if not head:
            return h
        logits = self.lm_head(self._head_input(h))
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _head_input(self, h: torch.Tensor) -> torch.Tensor:
        """The final states as the head takes them: times ``logit_scale`` (Granite's logits over logits_scaling,
        the same product on the way in, so the fused head + loss takes it too)."""
        return h if self.config.logit_scale is None else h * self.config.logit_scale

    def _block(self, layer, x, state: StepState, slots=None, last_only: bool = False):
        """One block on ``x`` with its cache ``slots`` (the mixer's and the MLP's; None: no cache); in a training
        forward (no cache, gradients on) compiled (``compile_blocks``) and checkpointed
        (``activation_checkpointing``) as the trainer asks."""
        if slots is None and self.training and torch.is_grad_enabled():
            if self.compile_blocks is not None:
                layer = compiled_block(layer, self.compile_blocks)
            if self.activation_checkpointing:
                return _checkpointed(layer, x, state)
        slot, mlp_slot = slots or (None, None)
        return layer(x, state, cache=slot, mlp_cache=mlp_slot, last_only=last_only)

    def _layers(
        self, x, state: StepState, cache, start: int, stop: int, passes: PassesConfig | None = None,
        last_only: bool = False,
    ):  # fmt: skip
        """Layers start..stop-1 on ``x``; with ``last_only``, the last of them returns its last position alone
        (``Block``: its MLP runs on that position). With ``passes`` (the span whose layers read later layers), the
        span runs once per pass from the same input, each pass reading what the later layers published in
        the pass before (with a cache: what they hold, rewritten by each pass); one pass when decoding."""
        if passes is None:
            for i in range(start, stop):
                slots = (cache.slots[i], cache.mlp_slots[i]) if cache is not None else None
                x = self._block(self.layers[i], x, state, slots, last_only and i == stop - 1)
            return x
        T = x.shape[1]
        n = 1 if cache is not None and T == 1 else passes.total  # a decoded token's readers see only the past
        grad = torch.is_grad_enabled()
        # The first pass sees, of the later layers, what the cache holds before this step (nothing without one;
        # an empty view before the first token).
        held = {("kv", j): cache.slots[j].view(state.start) for j in self._later_sources} if cache is not None else {}
        state.earlier_pass = held
        for p in range(n):
            if p > 0:  # what the pass before published
                state.earlier_pass = {("kv", j): state.published[("kv", j)] for j in self._later_sources}
            with torch.set_grad_enabled(grad and p >= n - passes.grad):
                y = self._layers(x, state, cache, start, stop)
        return y

    # -- cache and footprint --------------------------------------------------

    def new_cache(
        self,
        batch_size: int = 1,
        max_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        context_len: int | None = None,
        policy=None,
    ) -> Cache:
        """Preallocate the cache for ``batch_size`` sequences of up to ``max_len`` tokens (after the meta tokens,
        for a model with them; and, for a model with a context encoder, the states of up to ``context_len``
        context tokens; None: ``context.max_len``). ``policy``: how the attention layers' keys and values are
        held (``kvlab.layers.cache_policy``: ``"int8"``, ``"int4"``, ``"fp8"``, ``"kivi"``, ``"sinks"``, ``"h2o"``,
        ``"snapkv"``, ``"minicache"``, or a mapping of ``kind`` and its settings); None: as computed, in ``dtype``."""
        batch_size, max_len, dtype, device = self._cache_settings(batch_size, max_len, dtype, device)
        cache = self._layer_cache(self.layers, batch_size, max_len, dtype, device, prefix=self.config.meta_tokens,
                                  policy=CachePolicy.from_spec(policy))  # fmt: skip
        c = self.config.context
        if c is None:
            if context_len:
                raise ValueError(f"context_len={context_len}: this model has no context encoder (config.context)")
            return cache
        context_len = c.max_len if context_len is None else context_len
        check_int(context_len, "context_len", minimum=0)
        if context_len > c.max_len:
            raise ValueError(f"context_len={context_len} exceeds context.max_len={c.max_len}, the longest context")
        if context_len:
            cache.context = torch.zeros(batch_size, context_len, self.config.context_width, dtype=dtype,
                                        device=device)  # fmt: skip
        return cache

    def _cache_settings(self, batch_size, max_len, dtype, device) -> tuple:
        """``new_cache``'s arguments checked, with their defaults filled."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        check_int(max_len, "max_len", minimum=1)
        check_int(batch_size, "batch_size", minimum=1)
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len={max_len} must be between 1 and max_seq_len={self.config.max_seq_len}")
        weight = self.embed_tokens.weight
        dtype = weight.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype}: a cache holds floating-point states (e.g. torch.bfloat16, torch.float32)")
        return batch_size, max_len, dtype, weight.device if device is None else device

    def _layer_cache(self, layers, batch_size: int, length: int, dtype, device, prefix: int = 0,
                     policy: CachePolicy | None = None) -> Cache:  # fmt: skip
        """A cache of ``length`` tokens after ``prefix`` positions (meta tokens) for ``layers``, each slot made
        by its own mixer (and stateful MLP), its K/V held through ``policy`` (None: as computed)."""
        if policy is None:
            slots = [layer.mixer.new_cache_slot(batch_size, prefix + length, dtype, device) for layer in layers]
        else:
            check_model(policy, [layer.mixer for layer in layers], self.config.layer_kv_source,
                        self.config.max_seq_len)  # fmt: skip
            slots = policy_cache_slots([layer.mixer for layer in layers], batch_size, prefix + length, dtype, device,
                                       policy)  # fmt: skip
        mlp_slots = [layer.mlp.new_cache_slot(batch_size, dtype, device) if layer.mlp_stateful else None
                     for layer in layers]  # fmt: skip
        return Cache(slots, batch_size, length, mlp_slots, config=self.config, dtype=dtype, prefix=prefix,
                     policy=policy)  # fmt: skip

    def kv_footprint(self, dtype: torch.dtype = torch.bfloat16, policy=None) -> Footprint:
        """What the cache holds per layer in ``dtype``, its K/V held through ``policy`` (as ``new_cache``)."""
        policy = CachePolicy.from_spec(policy)
        rows, held_as_policy = [], [None] * len(self.layers)  # each layer's PolicyFootprint (None: as it is)
        if policy is not None:
            mixers = [layer.mixer for layer in self.layers]
            check_model(policy, mixers, self.config.layer_kv_source, self.config.max_seq_len)
            length = self.config.max_seq_len + self.config.meta_tokens
            held_as_policy = policy_footprints(mixers, length, dtype, policy)
        for i, layer in enumerate(self.layers):
            fp, held = layer.mixer.kv_footprint(dtype), None
            if policy is not None:
                held_as = held_as_policy[i]
                if held_as is not None:
                    fp = dataclasses.replace(fp, bytes_per_token=held_as.bytes_per_token,
                                             max_tokens=held_as.max_tokens or fp.max_tokens)  # fmt: skip
                    held = held_as.held
            mlp_bytes = layer.mlp.state_bytes(dtype) if layer.mlp_stateful else 0  # RWKV's channel-mix shift
            rows.append(
                FootprintRow(
                    layer=i,
                    kind=layer.mixer.cfg.kind,
                    bytes_per_token=fp.bytes_per_token,
                    fixed_bytes=fp.fixed_bytes + mlp_bytes,
                    kv_source=self.config.layer_kv_source[i],
                    max_tokens=fp.max_tokens,
                    entries_before=self.config.meta_tokens if fp.bytes_per_token else 0,  # held before the tokens
                    held=held,
                )
            )
        c = self.config.context
        context = 0 if c is None else self.config.context_width * dtype.itemsize
        return Footprint(tuple(rows), dtype, context_bytes_per_token=context,
                         policy=None if policy is None else policy.describe())  # fmt: skip

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- generation -----------------------------------------------------------

    @torch.inference_mode()
    def check_token_ids(self, ids, name: str) -> None:
        """Raise ValueError unless ``ids`` is a non-empty [B, T] integer tensor of this model's token ids."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex:
            what = f"a {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name}: expected an integer tensor of token ids [batch, tokens], got {what}")
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty [batch, tokens] tensor, got shape {list(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})")

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        compile: bool | None = None,
        context: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_policy=None,
        prefill_chunk: int | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """The prompt followed by up to ``max_new_tokens`` new tokens, [B, T + new].

        Prompts of different lengths: ``input_ids`` left-padded with
        ``attention_mask`` (0 at pads, as ``forward``), or a list of 1-D
        prompts, which are left-padded here (with ``eos_token_id``, else 0).
        Each greedy row gets the tokens it gets alone. Sampled rows draw from
        ``generator`` in turn, so a row's draws depend on the batch (as in
        ``transformers``); a sequence of generators, one per row, gives each
        row its own draws: row i samples what it samples alone from a
        generator in the state of ``generator[i]``. A model that takes no padded
        rows (``takes_padded_rows``, or a mixer's ``takes_pads``), or a
        cache that does not (``Cache.pads_refused_because``: StreamingLLM's
        sinks, KIVI, MiniCache), generates row by row.

        ``temperature=0`` is greedy; above it, a token is drawn from the
        softmax of the logits over ``temperature``, kept to the ``top_k`` most
        likely tokens and then to the fewest whose probability reaches
        ``top_p`` (nucleus sampling), in ``transformers``' order. Sequences
        that emit ``eos_token_id`` are padded with it until every sequence
        has; then generation stops. The
        prompt is prefilled eagerly; each new token goes through the decode
        step, compiled unless ``compile=False`` (None: ``KVLAB_COMPILE``, default
        on; see ``kvlab.archs.decode``): the first generation of a batch size
        and length bucket pays the compilation. ``context`` [B, C]: token ids
        for the context encoder (a model with ``config.context``), encoded
        once; the cache keeps only its encoded states. ``cache_policy``: how
        the cache holds keys and values (``new_cache``'s ``policy``).

        The prompt is prefilled by ``prefill``, in pieces of ``prefill_chunk``
        tokens when it is longer (None: ``PREFILL_CHUNK`` on a CPU; 0: in one
        call).
        """
        check_int(max_new_tokens, "max_new_tokens", minimum=0)
        check_int(prefill_chunk, "prefill_chunk", minimum=0, optional=True)
        check_float(temperature, "temperature")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy)")
        check_int(top_k, "top_k", minimum=1, optional=True)
        if top_p is not None:
            check_float(top_p, "top_p")
            if not 0 < top_p <= 1:
                raise ValueError(f"top_p={top_p} must be in (0, 1] (1: no nucleus)")
        check_int(eos_token_id, "eos_token_id", minimum=0, optional=True)
        if isinstance(input_ids, (list, tuple)):
            input_ids, attention_mask = self.left_padded(input_ids, 0 if eos_token_id is None else eos_token_id)
        self.check_token_ids(input_ids, "input_ids")
        if eos_token_id is not None and eos_token_id >= self.config.vocab_size:
            raise ValueError(
                f"eos_token_id={eos_token_id} is outside the vocabulary (vocab_size={self.config.vocab_size})"
            )
        B, T = input_ids.shape
        if isinstance(generator, Sequence):
            if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"generator: {len(generator)} items for a batch of {B} rows; give one "
                                 "torch.Generator, or one per row")  # fmt: skip
            generator = list(generator)
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if max_new_tokens == 0:
            return input_ids
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_token_id=eos_token_id, generator=generator, compile=compile,
                       cache_policy=cache_policy, prefill_chunk=prefill_chunk)  # fmt: skip
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if padded and not self.takes_pads():
            return self._generate_rows(input_ids, attention_mask, context, options)
        policy = CachePolicy.from_spec(cache_policy)
        if policy is not None and not policy.static_steps:  # H2O's, SnapKV's positions differ by head and step
            compile = False
        decode = decode_step_for(self, compile)
        needed = T + max_new_tokens
        room = {} if self.config.context is None else {"context_len": 0 if context is None else context.shape[-1]}
        length = cache_length(needed, self.config.max_seq_len) if decode.compiled else needed
        cache = self.new_cache(B, length, policy=policy, **room)
        if padded and cache.pads_refused_because():  # a policy that counts from the cache's first position
            return self._generate_rows(input_ids, attention_mask, context, options)
        logits = self.prefill(input_ids, cache, context=context, attention_mask=attention_mask, chunk=prefill_chunk)
        switch = self.longrope_switch()
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        token = sample(logits)
        for step in range(max_new_tokens):
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                break
            if switch is not None and T + step == switch:  # this token is the first past LongRoPE's context
                token = sample(self._prefill_again(torch.cat(out, dim=1), cache, context, attention_mask))
                continue
            if temperature == 0:  # greedy: the choice made by the step itself (in its compiled graph)
                token = decode.next_tokens(token[:, None], cache)
            else:
                token = sample(decode(token[:, None], cache))
        return torch.cat(out, dim=1)

    def longrope_switch(self) -> int | None:
        """The first position that LongRoPE turns at its long factors (its original context), or None: no layer
        has it."""
        return self._longrope_switch

    def _prefill_again(self, sequence, cache, context, attention_mask) -> torch.Tensor:
        """Phi-3's generation at the first token past LongRoPE's original context, as its code and `transformers`'
        Phi-3 generate: the cache, whose keys turned at the short factors, is filled again from the whole
        sequence in one call, every key now at the long ones; the next token's logits."""
        cache.reset()
        if attention_mask is not None:  # (the new tokens are no pads)
            ones = attention_mask.new_ones(sequence.shape[0], sequence.shape[1] - attention_mask.shape[1])
            attention_mask = torch.cat([attention_mask, ones], dim=1)
        return self.prefill(sequence, cache, context=context, attention_mask=attention_mask, chunk=0)

    @torch.no_grad()
    def prefill(self, input_ids, cache, *, context=None, attention_mask=None, chunk: int | None = None) -> torch.Tensor:
        """The logits of the prompt's last position, [B, vocab], with ``input_ids`` [B, T] written into ``cache``.

        A prompt longer than ``chunk`` tokens (0: never; None: ``PREFILL_CHUNK``
        on a CPU, never elsewhere) goes in pieces of that many, each on the
        cache the ones before filled: the same logits (to float rounding),
        activations bounded by the piece rather than the prompt, and a faster
        prefill for recurrent and sliding-window layers. In one call with a
        cache policy (a piece would see the earlier ones as the policy keeps
        them, one call sees them as computed), a ``context``, padded rows, LCKV's
        parallel prefill passes (which would iterate piece by piece), or a
        model that prefills whole (``prefills_in_pieces``), or with LongRoPE (its
        frequencies chosen per call, as `transformers` chooses them). Not by default on
        an accelerator: there a piece's attention over the cache takes a [T, S]
        mask (the fused kernels take fewer causal queries than keys on a CPU
        only, ``kvlab.kernels.attention``), where one call is causal and fused.
        """
        check_int(chunk, "chunk", minimum=0, optional=True)
        if chunk is None:
            chunk = PREFILL_CHUNK if input_ids.device.type == "cpu" else 0
        T = input_ids.shape[1]
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        whole = not self.prefills_in_pieces or getattr(cache, "policy", None) is not None or context is not None
        # LCKV's prompt in parallel passes: a piece would iterate over its own tokens against the earlier pieces'
        # final keys, not over the whole prompt (sequential passes are token by token either way)
        iterated = self._cycle is not None and self.config.layer_passes.prefill != "sequential"
        # LongRoPE's frequencies are chosen per call by its last position: a piece within the original context
        # would turn its keys at the short ones where the whole prompt, past it, turns them at the long ones
        if whole or iterated or padded or self.longrope_switch() is not None or not 0 < chunk < T:
            return self(input_ids, cache=cache, last_only=True, context=context, attention_mask=attention_mask)[:, -1]
        for at in range(0, T, chunk):
            logits = self(input_ids[:, at : at + chunk], cache=cache, last_only=True)
        return logits[:, -1]

    def takes_pads(self) -> bool:
        """Whether forward takes left-padded rows: the model (``takes_padded_rows``) and every mixer do, and every
        window keeps exactly the meta tokens as sinks, if any (``pads_refused_by_window``)."""
        meta = self.config.meta_tokens
        return (
            self.takes_padded_rows
            and all(layer.mixer.cfg.takes_pads for layer in self.layers)
            and not any(pads_refused_by_window(getattr(c, "window", None), getattr(c, "sinks", 0), meta)
                        for c in self.config.layer_mixers_and_branches)
        )  # fmt: skip

    def left_padded(self, prompts, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D prompts of any lengths -> (ids [B, longest] left-padded with ``pad_id``, attention_mask)."""
        if not prompts:
            raise ValueError("input_ids: an empty list of prompts")
        rows = [torch.as_tensor(p, device=self.embed_tokens.weight.device) for p in prompts]
        for i, r in enumerate(rows):
            if r.dim() != 1 or r.numel() == 0 or r.dtype.is_floating_point:
                raise ValueError(f"input_ids[{i}]: expected a non-empty 1-D sequence of token ids, got shape "
                                 f"{list(r.shape)} ({r.dtype})")  # fmt: skip
        longest = max(r.numel() for r in rows)
        ids = torch.full((len(rows), longest), pad_id, dtype=torch.long, device=rows[0].device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, longest - r.numel() :] = r
            mask[i, longest - r.numel() :] = 1
        return ids, mask

    def _generate_rows(self, input_ids, attention_mask, context, options: dict) -> torch.Tensor:
        """``generate`` one row at a time (a model that takes no padded rows): each row's prompt without its pads;
        the rows' outputs left-padded as given, and the shorter generations (stopped at EOS) continued with it."""
        rows = []
        for i in range(input_ids.shape[0]):
            pads = int((attention_mask[i] == 0).sum())
            own = context[i : i + 1] if context is not None else None
            row = dict(options)
            if isinstance(options["generator"], list):  # one per row: the row's own
                row["generator"] = options["generator"][i : i + 1]
            out = self.generate(input_ids[i : i + 1, pads:], context=own, **row)
            rows.append(torch.cat([input_ids[i : i + 1, :pads], out], dim=1))
        width = max(r.shape[1] for r in rows)
        fill = 0 if options["eos_token_id"] is None else options["eos_token_id"]
        return torch.cat([nn.functional.pad(r, (0, width - r.shape[1]), value=fill) for r in rows])


def _same_pads(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool((a == b.to(a.device)).all())


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """[B, vocab] logits as sampling sees them: over ``temperature``, -inf outside the ``top_k`` largest, then
    outside the nucleus (the fewest largest whose probability reaches ``top_p``): ``transformers``' warpers, in
    its order."""
    logits = upcast(logits) / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ascending, order = logits.sort(dim=-1)
        below = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # the mass of these and all smaller
        below[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(below.scatter(-1, order, below), float("-inf"))
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator):
    if temperature == 0:  # argmax's index (the first maximum) from max's kernel: 3.5x faster at batch 8 on CPU
        return logits.max(dim=-1).indices
    probs = sampling_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    if isinstance(generator, list):  # one per row: each row's draw as alone, [1, vocab] from its own generator
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator, strict=True)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@contextlib.contextmanager
def module_rng(seed: int | None, name: str, device: torch.device) -> Iterator[None]:
    """Within: torch's CPU generator, and the current accelerator's when ``device`` is one, seeded from
    ``seed`` and ``name``; after: both as they were. With ``seed`` None, the global generators as they are."""
    if seed is None:
        yield
        return
    accelerator = device.type not in ("cpu", "meta")
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    derived = int.from_bytes(digest[:8], "little") >> 1  # 63 bits: generators take an int64
    with torch.random.fork_rng(
        devices=[device] if accelerator else [], device_type=device.type if accelerator else "cuda"
    ):
        torch.random.default_generator.manual_seed(derived)
        if accelerator:
            torch.get_device_module(device.type).manual_seed(derived)
        yield


def build_model(config: ModelConfig | Mapping[str, Any]) -> CausalLM:
    """Build the decoder described by ``config`` (a ModelConfig or its dict form); with ``blocks``, the Block
    Transformer made of it."""
    config = ModelConfig.from_dict(config)
    if config.blocks is not None:
        from kvlab.archs.block_transformer import BlockTransformer  # it builds on this module

        return BlockTransformer(config)
    return CausalLM(config)
