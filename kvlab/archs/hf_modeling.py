"""The `transformers` face of a kvlab model, for exports with no native class.

``kvlab.archs.hf.save_hf`` copies this module into an export as
``modeling_kvlab.py``, together with every kvlab module it imports
(flattened, imports made relative), and points ``auto_map`` at the classes
below. ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)``
then runs the very code that trained the model, needing only `torch` and
`transformers`.

- ``KvlabConfig``: a ``PretrainedConfig`` whose ``kvlab`` field is the
  ModelConfig dict.
- ``KvlabCache``: a `transformers` ``Cache`` holding a kvlab ``Cache``, so
  ``generate()`` keeps each mixer's own state (a shared layer's nothing, a
  window's ring buffer, a recurrent state).
- ``KvlabForCausalLM``: the ``PreTrainedModel`` around ``CausalLM``
  (parameters under ``model.``), with loss, ``generate()`` and beam search.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache as HFCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvlab.archs.config import ModelConfig
from kvlab.archs.model import Block, build_model


class KvlabConfig(PretrainedConfig):
    model_type = "kvlab"

    def __init__(self, kvlab: dict | None = None, use_cache: bool = True, **kwargs):
        self.kvlab = kvlab
        self.use_cache = use_cache
        if kvlab is not None:  # the fields transformers' generic code reads
            cfg = ModelConfig.from_dict(kvlab)
            kwargs.update(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model,
                num_hidden_layers=cfg.n_layers,
                max_position_embeddings=cfg.max_seq_len,
                tie_word_embeddings=cfg.tie_embeddings,
            )
        super().__init__(**kwargs)


class KvlabCache(HFCache):
    """A kvlab ``Cache`` behind `transformers`' Cache interface."""

    is_compileable = False

    def __init__(self, cache):
        super().__init__(layers=[])
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.seen

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.cache.max_len

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.cache.reorder(beam_idx)

    def reset(self) -> None:
        self.cache.reset()

    def __len__(self) -> int:
        return len(self.cache.slots)

    def __repr__(self) -> str:
        return f"KvlabCache({self.cache!r})"


class KvlabForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = KvlabConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]
    # transformers' gradient (activation) checkpointing is kvlab's activation_checkpointing: each block recomputed
    # in the backward, reading what its forward read (the checkpoint function transformers passes is not used)
    supports_gradient_checkpointing = True

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        self.model.activation_checkpointing = enable

    @property
    def gradient_checkpointing(self) -> bool:  # what transformers' is_gradient_checkpointing looks for
        return self.model.activation_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:  # code that sets the flag itself
        self.model.activation_checkpointing = bool(enable)

    def __init__(self, config: KvlabConfig):
        super().__init__(config)
        self.model = build_model(ModelConfig.from_dict(config.kvlab))
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.embed_tokens.weight"}
        self.post_init()

    def _init_weights(self, module) -> None:
        # Weights come from the checkpoint; buffers that are not saved (RoPE
        # tables) are computed again after loading from the meta device.
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_input_embeddings(self, value) -> None:
        self.model.embed_tokens = value

    def set_output_embeddings(self, value) -> None:
        self.model.lm_head = value

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' resize (new tokens for fine-tuning), with kvlab's own config kept in step, so the model
        checks ids against the new vocabulary and a saved model loads again at its new size."""
        others = [name for name, m in self.model.named_modules()
                  if isinstance(m, torch.nn.Embedding) and m is not self.model.embed_tokens]  # fmt: skip
        if others:
            raise NotImplementedError(
                f"resize_token_embeddings: this model has other embeddings of the vocabulary too ({', '.join(others)}"
                "); resize them in kvlab and export it again"
            )
        out = super().resize_token_embeddings(*args, **kwargs)
        n = self.model.embed_tokens.num_embeddings
        self.model.config.vocab_size = n
        self.config.kvlab = {**self.config.kvlab, "vocab_size": n}
        return out

    def generate(self, *args, **kwargs):
        """transformers' generate on kvlab's cache; assisted generation is refused by name (transformers' own error
        said only that it needs a cache): it cuts the cache back to the accepted tokens, which rings, recurrent
        states and kvlab's cache policies cannot do."""
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            raise ValueError("assisted generation (assistant_model, prompt_lookup_num_tokens) is not supported by "
                             "kvlab's remote code: it cuts the cache back to the accepted tokens, which kvlab's "
                             "caches do not; generate without it")  # fmt: skip
        return super().generate(*args, **kwargs)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is a KvlabCache, made by forward on the first step

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        # transformers 5 names the cache `cache`, earlier versions `past_key_values`
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        started = isinstance(cache, KvlabCache) and cache.get_seq_length() > 0
        switch = self.model.longrope_switch()
        if started and switch is not None and cache.get_seq_length() <= switch < input_ids.shape[1]:
            cache.reset()  # LongRoPE's first token past its context: every key again at the long factors, as
            started = False  # kvlab's generate and Phi-3's do (kvlab.archs.model.CausalLM._prefill_again)
        if isinstance(cache, KvlabCache):  # feed only the tokens the cache has not seen
            input_ids = input_ids[:, cache.get_seq_length() :]
        inputs = {
            "input_ids": input_ids,
            "cache": cache,
            "attention_mask": attention_mask,
            "use_cache": kwargs.get("use_cache", True),
            # a context encoder's context: encoded with the first step, then held by the cache
            "context_input_ids": None if started else kwargs.get("context_input_ids"),
            "cache_policy": kwargs.get("cache_policy"),  # how the cache the first step makes holds its K/V
        }
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KvlabCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        context_input_ids: torch.LongTensor | None = None,
        cache: KvlabCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_policy: str | dict | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``context_input_ids`` [B, C]: a context for the context encoder (models with one: CEPE, XC-Cache).
        ``cache`` is ``past_key_values`` under transformers 5's name. ``logits_to_keep``: the last n positions'
        logits (0: all; generate asks for 1), or those at the given indices. ``attention_mask``: left-padded rows
        (0 at pads), as kvlab's forward takes them; the cache keeps the pads for later steps. ``cache_policy``: how
        the cache this call makes holds its keys and values (kvlab's cache policies: ``"int8"``, ``{"kind": "kivi",
        "bits": 2}``, ...; ``generate(..., cache_policy=...)`` passes it on)."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("give cache or past_key_values (its name before transformers 5), not both")
        past_key_values = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is not None and not isinstance(past_key_values, KvlabCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError(f"past_key_values must be a KvlabCache, got {type(past_key_values).__name__}")
            past_key_values = None  # an empty cache of another kind: start ours instead
        if past_key_values is None and use_cache:
            room = {"context_len": context_input_ids.shape[1]} if context_input_ids is not None else {}
            past_key_values = KvlabCache(self.model.new_cache(input_ids.shape[0], policy=cache_policy, **room))
        state = past_key_values.cache if past_key_values is not None else None
        last_only = labels is None and isinstance(logits_to_keep, int) and logits_to_keep == 1
        logits = self.model(
            input_ids, cache=state, context=context_input_ids, last_only=last_only, attention_mask=attention_mask
        )
        loss = None
        if labels is not None:  # labels as transformers gives them: shifted here
            # num_items_in_batch (transformers' Trainer, which sees **kwargs and then neither divides by the
            # accumulation steps nor averages processes): the loss is over the tokens of the whole step
            items = kwargs.get("num_items_in_batch")
            wide = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).to(wide), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100, reduction="mean" if items is None else "sum")  # fmt: skip
            if items is not None:
                loss = loss / (items.to(loss.device) if isinstance(items, torch.Tensor) else items)
        if not last_only and isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        # the output's cache field under the name this transformers version declares
        name = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{name: past_key_values if use_cache else None})
