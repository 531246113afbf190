"""litgpt (Lightning AI's GPT) as a second peer: its GPT built as a Llama at a kvlab preset's shapes, holding
the same weights, generating and training as litgpt's own scripts do. Used by benchmarks/decode.py and
benchmarks/train_speed.py when litgpt is importable; they print their other rows without it.

litgpt 0.5.x pins ``huggingface_hub<1.4`` where ``transformers`` 5 needs 2.4 or later, so it goes in without
its dependencies (its model, generation and loss need only torch and lightning, which kvlab has):

    .venv/bin/pip install --no-deps litgpt==0.5.13      # or: KVLAB_PEERS=1 bash scripts/setup.sh

What each path is, following litgpt's scripts (``litgpt/generate/base.py``, ``litgpt/pretrain.py``):

- generation at batch 1: ``generate`` (one prompt; its cache read up to the last position), at larger
  batches ``batched_generate_fn`` (the whole cache, masked); greedy (``temperature=0``) over a KV cache
  of the prompt plus the new tokens (``set_kv_cache``), as ``litgpt generate`` sets it up;
- compiled generation: ``litgpt generate --compile``'s recipe, ``torch.compile(next_token,
  mode="reduce-overhead")`` in place of the module's ``next_token`` (at batch 1; at larger batches the same
  for ``batched_next_token``, which its scripts do not compile);
- a training step: ``model(ids)`` then ``chunked_cross_entropy`` (128-row chunks, pretrain's default);
  compiled: the whole model under ``torch.compile``, as pretrain does. The optimizer is the other peers'
  (fused AdamW), not pretrain's (fused on CUDA only), so that the rows compare the models' paths.
"""

from __future__ import annotations

import importlib.metadata

import torch

try:
    import litgpt
    import litgpt.generate.base as litgpt_generate
    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    MISSING = None
except ImportError as exc:  # the benchmarks go on without this peer
    litgpt = None
    MISSING = f"litgpt not importable ({exc}); `pip install --no-deps litgpt==0.5.13` adds it"

from kvlab.archs.hf import kvlab_to_hf_name


def version() -> str:
    """The installed litgpt's version, or "absent"."""
    try:
        return importlib.metadata.version("litgpt")
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def litgpt_twin(model) -> GPT:
    """litgpt's GPT as a Llama at the shapes of ``model`` (an attention preset: gqa, mha, mqa) with its weights.
    The names go through kvlab's Hugging Face mapping, then litgpt's (its q, k and v are one matrix)."""
    c = model.config
    gpt = GPT(
        Config(
            name="kvlab-twin",
            block_size=c.max_seq_len,
            vocab_size=c.vocab_size,
            padded_vocab_size=c.vocab_size,
            n_layer=c.n_layers,
            n_head=c.mixer.n_heads,
            n_embd=c.d_model,
            head_size=c.mixer.head_dim,
            n_query_groups=c.mixer.n_kv_heads,
            rotary_percentage=1.0,
            rope_base=int(c.mixer.rope_theta),
            parallel_residual=False,
            bias=False,
            norm_class_name="RMSNorm",
            norm_eps=c.norm.eps,
            mlp_class_name="LLaMAMLP",
            intermediate_size=c.mlp.hidden,
        )
    )
    hf = {kvlab_to_hf_name(k): v for k, v in model.state_dict().items()}
    if c.tie_embeddings:
        hf.setdefault("lm_head.weight", hf["model.embed_tokens.weight"])
    state = {
        "transformer.wte.weight": hf.pop("model.embed_tokens.weight"),
        "transformer.ln_f.weight": hf.pop("model.norm.weight"),
        "lm_head.weight": hf.pop("lm_head.weight"),
    }
    for i in range(c.n_layers):
        hf_layer, lit = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = (hf.pop(f"{hf_layer}self_attn.{n}_proj.weight") for n in "qkv")
        state[lit + "attn.qkv.weight"] = torch.cat([q, k, v])  # litgpt 0.5: all queries, then keys, then values
        for ours, theirs in (
            ("self_attn.o_proj", "attn.proj"),
            ("input_layernorm", "norm_1"),
            ("post_attention_layernorm", "norm_2"),
            ("mlp.gate_proj", "mlp.fc_1"),
            ("mlp.up_proj", "mlp.fc_2"),
            ("mlp.down_proj", "mlp.proj"),
        ):
            state[f"{lit}{theirs}.weight"] = hf.pop(f"{hf_layer}{ours}.weight")
    if hf:
        raise ValueError(f"litgpt_twin: weights with no litgpt place (not a Llama-shaped preset?): {sorted(hf)[:4]}")
    gpt.load_state_dict(state, strict=True)
    return gpt


def generation_runner(gpt, ids: torch.Tensor, new: int, compiled: bool):
    """A call generating ``new`` greedy tokens after each row of ``ids`` through litgpt's generation, returning
    them [B, new]. ``compiled``: its ``--compile`` recipe, the compiled function swapped in for the call only.
    Each runner wants a model of its own (``gpt`` keeps the runner's cache)."""
    B, T = ids.shape
    name = "next_token" if B == 1 else "batched_next_token"
    plain = getattr(litgpt_generate, name)
    fn = torch.compile(plain, mode="reduce-overhead") if compiled else plain
    # as `litgpt generate` sets it up, once: a cache for the prompt and the new tokens, which each call reuses
    # (a model per runner: the cache lives on it)
    gpt.max_seq_length = T + new
    gpt.set_kv_cache(batch_size=B, device=ids.device, dtype=next(gpt.parameters()).dtype)

    def run() -> torch.Tensor:
        setattr(litgpt_generate, name, fn)
        try:
            with torch.inference_mode():
                if B == 1:
                    out = litgpt_generate.generate(gpt, ids[0], T + new, temperature=0.0, include_prompt=False)
                    return out.view(1, new)
                steps = litgpt_generate.batched_generate_fn(
                    gpt, ids, T + new, sample_args={"temperature": 0.0}, include_prompt=False, include_eos=False
                )
                return torch.stack([torch.cat(step) for step in steps], dim=1)
        finally:
            setattr(litgpt_generate, name, plain)

    return run


def train_forward(gpt, compiled: bool):
    """``ids [B, T + 1] -> loss`` as litgpt's pretrain computes it (the model compiled whole when ``compiled``)."""
    net = torch.compile(gpt) if compiled else gpt

    def loss(ids: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(net(ids[:, :-1]), ids[:, 1:])

    return loss
