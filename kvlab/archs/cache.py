"""The inference cache of a model: one slot per layer that owns state.

Slots are allocated by the mixers themselves (``new_cache_slot``), so each
mixer family decides what it keeps (static K/V, a ring buffer for a window,
a latent, a recurrent state). Layers that read another layer's K/V hold
``None``. The few MLPs that keep state (RWKV's channel mix: the previous
token) have slots of their own in ``mlp_slots``. ``seen`` counts the tokens
the model has consumed so far: the one position counter (slots store, they
do not count; the model hands ``seen`` to the mixers as the step's start).
A model with a context encoder (CEPE, XC-Cache) keeps the encoder's states
of the context in ``context`` [B, max context, d], ``context_len`` of them:
all it caches of the context. A model with meta tokens (Hymba) holds them
before the first token: ``prefix`` positions, written by the first step.
Left-padded rows (``attention_mask``) keep their pads in ``pads`` [B] (None:
none), set by the first step, so that later steps hide them.
"""

from __future__ import annotations

from kvlab.layers.kv_cache import SlotGroup


class Cache:
    def __init__(
        self,
        slots: list,
        batch_size: int,
        max_len: int,
        mlp_slots: list | None = None,
        config=None,
        dtype=None,
        prefix: int = 0,
        policy=None,
    ):
        self.config = config  # the ModelConfig of the model that made it: no other model may use it
        self.dtype = dtype  # of the states it holds
        self.policy = policy  # how its K/V slots hold keys and values (a CachePolicy; None: as computed)
        self.slots = slots
        self.mlp_slots = [None] * len(slots) if mlp_slots is None else mlp_slots
        self.batch_size = batch_size
        self.max_len = max_len  # tokens, not counting the meta tokens' positions
        self.prefix = prefix  # the meta tokens' positions, held once the first step has run
        self.seen = 0
        self.context = None  # [B, max context tokens, d]: the context encoder's states (None: no room for them)
        self.context_len = 0
        self.pads = None  # [B]: each row's pad tokens, held after the meta tokens (None: no row has any)

    @property
    def start(self) -> int:
        """The absolute position of the next token: after the tokens seen and, once there are any, the meta
        tokens before them (the first step writes those too, from position 0)."""
        return self.seen + self.prefix if self.seen else 0

    def _held(self) -> list:
        return [s for s in self.slots + self.mlp_slots if s is not None]

    def write_context(self, states) -> None:
        """Keep the context encoder's ``states`` [B, C, d], the context of every later step."""
        if self.context is None:
            raise ValueError("context: this cache was made without room for a context (new_cache(context_len=0))")
        C, room = states.shape[1], self.context.shape[1]
        if C > room:
            raise ValueError(
                f"context of {C} tokens exceeds the cache's context_len={room} (new_cache(context_len=...))"
            )
        self.context[:, :C] = states
        self.context_len = C

    def context_states(self):
        """The context's encoded states held, [B, context_len, d]."""
        return self.context[:, : self.context_len]

    def _context_bytes(self, tokens: int) -> int:
        return 0 if self.context is None else tokens * self.batch_size * self.context.shape[2] * self.context.itemsize

    def nbytes(self, tokens: int | None = None) -> int:
        """Bytes of state held for the tokens seen so far (or once ``tokens`` are) and the context's states."""
        start = self.start if tokens is None else tokens + self.prefix if tokens else 0
        return sum(s.nbytes(start) for s in self._held()) + self._context_bytes(self.context_len)

    def allocated_bytes(self) -> int:
        """Bytes of the buffers allocated (whatever has been used)."""
        held = 0 if self.context is None else self._context_bytes(self.context.shape[1])
        return sum(s.allocated_bytes() for s in self._held()) + held

    def reorder(self, batch_idx) -> None:
        """Keep, in each row, the state of row ``batch_idx[row]`` (beam search)."""
        for s in self._held():
            s.reorder(batch_idx)
        if self.context is not None:
            self.context.copy_(self.context.index_select(0, batch_idx.to(self.context.device)))
        if self.pads is not None:
            self.pads = self.pads.index_select(0, batch_idx.to(self.pads.device))

    def reset(self) -> None:
        """Forget every token (and the context), keeping the buffers, to reuse the cache for new sequences."""
        for s in self._held():
            s.reset()
        self.seen = 0
        self.context_len = 0
        self.pads = None

    def pads_refused_because(self) -> str | None:
        """Why a left-padded row would not get from this cache what it gets alone (None: it would): a slot held
        by a cache policy that counts from the cache's first position (StreamingLLM's sinks, KIVI's groups,
        MiniCache's retention), which in a padded row is a pad. Codes per token and H2O's and SnapKV's choices
        per row take pads."""
        for slot in self._held():
            for held in slot.slots if isinstance(slot, SlotGroup) else [slot]:
                why = getattr(held, "pads_refused_because", None)
                if why:
                    return why
        return None

    def layer_is_stateless(self, i: int) -> bool:
        """Whether layer ``i`` keeps nothing of its own (it reads K/V that another layer cached)."""
        return self.slots[i] is None and self.mlp_slots[i] is None

    def __repr__(self) -> str:
        owners = sum(s is not None for s in self.slots)
        return (
            f"Cache(batch_size={self.batch_size}, max_len={self.max_len}, seen={self.seen}, "
            f"slots={owners}/{len(self.slots)}, allocated_bytes={self.allocated_bytes():,}"
            + (f", policy={self.policy.describe()})" if self.policy is not None else ")")
        )
