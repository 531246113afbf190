"""Tokenizer helpers that training and export share: kvlab's byte-level BPE, loading one, its end-of-text id.

Below ``archs`` and ``recipes`` both (the export writes the tokenizer a run trained), so neither reaches
into the other for them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("kvlab")

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE over ``texts`` (a sequence, or an iterable read once: a corpus streamed from disk) with
    ``EOS`` as token 0. Progress: the trainer's own bars in a terminal, a line before and after in a log."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    length = len(texts) if hasattr(texts, "__len__") else None
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += 1
            yield text

    log.info("tokenizer: training a byte-level BPE of %d tokens on %s documents", vocab_size,
             length if length is not None else "a stream of")  # fmt: skip
    started = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # (bars redrawn in place: a log file would get every frame)
    )
    tok.train_from_iterator(counted(), trainer=trainer, length=length)
    log.info("tokenizer: %d tokens from %d documents in %.1f s", tok.get_vocab_size(), seen,
             time.perf_counter() - started)  # fmt: skip
    return tok


def load_tokenizer(path: str):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json or a directory holding one."""
    from tokenizers import Tokenizer

    p = Path(os.path.expanduser(path))
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        slow = [n for n in ("tokenizer.model", "spiece.model", "vocab.json") if (p.parent / n).is_file()]
        hint = (f" ({p.parent} holds a slow tokenizer's {', '.join(slow)}: transformers writes its tokenizer.json, "
                "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))") if slow else ""  # fmt: skip
        raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {p}{hint}")
    return Tokenizer.from_file(str(p))


def eos_id(tokenizer) -> int:
    for candidate in (EOS, "</s>", "<|end_of_text|>", "<eos>"):
        idx = tokenizer.token_to_id(candidate)
        if idx is not None:
            return idx
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {EOS!r}, '</s>', '<eos>')")
