"""Multi-query associative recall (MQAR; Arora et al. 2023, Zoology), generated, and a data module for it.

Each example is ``seq_len + 1`` tokens: ``pairs`` key-value pairs first
(``k_1 v_1 k_2 v_2 ...``, keys distinct), then the query region, in which
every key appears once more at a random place, followed by its value, among
filler tokens. The model must predict each value after its queried key; the
label of every other position is -100 (ignored by the loss and the
accuracy). Keys, values and fillers come from disjoint parts of the
vocabulary (1 .. vocab/2 - 1 keys, vocab/2 .. vocab - 1 values, 0 filler),
so the task is pure recall: an attention layer looks the key up, a model
with a fixed state must have kept every pair.

Examples are generated from a seed (train and validation from different
ones), deterministically, in memory: nothing to download or cache.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from kvlab.recipes.data import LMDataModule

FILLER = 0


def mqar_examples(n: int, seq_len: int, vocab_size: int, pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels``, both [n, seq_len] (next-token labels, -100 where nothing is asked)."""
    half = vocab_size // 2
    if pairs < 1 or half - 1 < pairs:
        raise ValueError(f"data.mqar_pairs={pairs} needs 1 <= pairs <= vocab_size/2 - 1 = {half - 1} distinct keys")
    if 4 * pairs > seq_len + 1:
        need = 4 * pairs - 1
        raise ValueError(f"data.seq_len={seq_len} is too short for {pairs} pairs and their queries (needs >= {need})")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((n, seq_len + 1), FILLER, dtype=torch.long)
    answer = torch.zeros(n, seq_len + 1, dtype=torch.bool)  # positions whose next token is asked
    query_len = seq_len + 1 - 2 * pairs
    for i in range(n):
        keys = torch.randperm(half - 1, generator=g)[:pairs] + 1
        values = torch.randint(half, vocab_size, (pairs,), generator=g)
        tokens[i, : 2 * pairs : 2], tokens[i, 1 : 2 * pairs : 2] = keys, values
        # query slots: pairs of positions (key, value) at distinct even offsets of the query region
        slots = torch.randperm(query_len // 2, generator=g)[:pairs] * 2 + 2 * pairs
        order = torch.randperm(pairs, generator=g)
        tokens[i, slots], tokens[i, slots + 1] = keys[order], values[order]
        answer[i, slots] = True
    labels = torch.where(answer[:, :-1], tokens[:, 1:], torch.full_like(tokens[:, 1:], -100))
    return tokens[:, :-1], labels


class MQARDataModule(LMDataModule):
    """Batches of MQAR examples through the LM data module's loaders (``input_ids``, ``labels``)."""

    def __init__(self, cfg, seed: int = 0):
        super().__init__(cfg, seed)
        self.splits: dict[str, TensorDataset] = {}  # tokenizer stays None: token ids are the task itself

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def prepare_data(self) -> None:
        c = self.cfg
        if not self.splits:
            for split, n, seed in (("train", c.mqar_examples, 0), ("val", c.mqar_val_examples, 1)):
                self.splits[split] = TensorDataset(*mqar_examples(n, c.seq_len, c.vocab_size, c.mqar_pairs, seed))

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()

    def train_rows(self) -> dict:
        c = self.cfg
        return {"kind": c.kind, "seq_len": c.seq_len, "vocab_size": c.vocab_size, "mqar_pairs": c.mqar_pairs,
                "mqar_examples": c.mqar_examples, "rows": len(self.splits["train"])}  # fmt: skip

    def _collate(self, rows):
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}
