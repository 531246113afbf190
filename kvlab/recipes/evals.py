"""Evaluations beyond validation loss: passkey retrieval and decoding speed.

- ``passkey_accuracy`` (Mohtashami & Jaggi 2023): a pass key of random digits
  is hidden at a relative ``depth`` of ``length`` tokens of repetitive
  filler; after the filler the model is asked for it and decodes greedily.
  The score is the fraction of trials whose continuation starts with the key.
  Small models trained on little text mostly score 0: the harness is for
  real runs.
- ``decode_speed``: greedy decoding throughput from a random prompt, through
  ``generate``'s compiled decode step (its compilation is the warm-up call;
  ``KVLAB_COMPILE=0`` measures the eager step).

``evaluate`` runs those ``eval.*`` picks (stage ``eval``), each with a
progress bar in a terminal and its results in the log.
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm.auto import tqdm

log = logging.getLogger("kvlab")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of about ``length`` tokens: filler, the needle at ``depth`` (0: start, 1: end), the question."""
    filler = tokenizer.encode(FILLER).ids
    needle = tokenizer.encode(NEEDLE.format(key=key)).ids
    question = tokenizer.encode(QUESTION).ids
    room = length - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"passkey length={length} is too short for the needle and the question")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = round(depth * room)
    return hay[:cut] + needle + hay[cut:] + question


@torch.inference_mode()
def passkey_accuracy(model, tokenizer, length: int, depth: float, trials: int = 5, seed: int = 0) -> float:
    """Fraction of ``trials`` random 5-digit keys the model decodes right after the question."""
    g = torch.Generator().manual_seed(seed)
    device = model.embed_tokens.weight.device
    right = 0
    for _ in range(trials):
        key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)], device=device)
        answer = tokenizer.encode(" " + key).ids
        # a few tokens per prompt of its own length: compiling the step would cost more than it saves
        out = model.generate(ids, max_new_tokens=len(answer), compile=False)[0, ids.shape[1] :].tolist()
        right += tokenizer.decode(out).strip().startswith(key)
    return right / trials


def passkey_grid(model, tokenizer, fractions=(0.25, 0.5, 1.0), depths=(0.0, 0.5, 1.0), trials: int = 5,
                 max_len: int | None = None) -> dict:  # fmt: skip
    """{length: {depth: accuracy}} at the given fractions of the context (the model's max_seq_len, or
    ``max_len`` when shorter; room left for the answer), leaving out lengths too short to hold the needle and
    the question with some filler."""
    context = min(model.config.max_seq_len, max_len or model.config.max_seq_len)
    shortest = len(tokenizer.encode(FILLER + NEEDLE.format(key="00000") + QUESTION).ids)
    lengths = sorted({n for f in fractions if (n := int(f * (context - 8))) >= shortest})
    grid = {}
    with tqdm(total=len(lengths) * len(depths), desc="passkey", unit="prompt set", disable=None) as bar:
        for n in lengths:
            grid[str(n)] = {}
            for d in depths:
                grid[str(n)][str(d)] = passkey_accuracy(model, tokenizer, n, d, trials)
                bar.update()
            log.info("passkey: %d tokens, accuracy by depth %s", n, grid[str(n)])
    return grid


def decode_speed(model, batch_size: int, prompt_len: int = 32, new_tokens: int = 32) -> float:
    """Greedy decoding throughput (new tokens per second over the batch) from a random prompt,
    best of two after a warm-up; prompt and new tokens kept within the model's max_seq_len."""
    prompt_len = min(prompt_len, model.config.max_seq_len // 2)
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt_len)
    was_training = model.training
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=model.embed_tokens.weight.device)
    best = float("inf")
    for _ in range(3):  # the first is the warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens)
        best = min(best, time.perf_counter() - t0)
    model.train(was_training)
    return batch_size * new_tokens / best


def evaluate(model, tokenizer, cfg) -> dict:
    """Stage ``eval``'s measurements beyond the validation loss, as ``cfg`` (the run's ``eval`` section,
    kvlab.recipes.config.EvalConfig) picks them; the pass key only for text data (a ``tokenizer``)."""
    metrics = {}
    if cfg.decode_speed:
        speeds = {}
        for b in tqdm((1, 8), desc="decode speed", unit="batch size", disable=None):
            speeds[f"batch_{b}"] = decode_speed(model, b)
        log.info("decode speed: %s new tokens/s", {k: round(v, 1) for k, v in speeds.items()})
        metrics["decode_tokens_per_s"] = speeds
    if cfg.passkey and tokenizer is not None:
        metrics["passkey"] = passkey_grid(model, tokenizer, trials=cfg.passkey_trials, max_len=cfg.passkey_max_len)
    return metrics
