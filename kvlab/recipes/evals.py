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
- ``cached_val_loss``: the validation loss with every row decoded through a
  cache policy (``kvlab.layers.cache_policy``), so each token reads what came
  before it back from the cache's codes, as it would in generation; the
  forward pass's loss is blind to a policy.

With a cache policy (the run's ``cache``) the pass key and the decoding speed
run through it too.

``evaluate`` runs those ``eval.*`` picks (stage ``eval``), each with a
progress bar in a terminal and its results in the log.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvlab.kernels.precision import upcast

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
def passkey_accuracy(model, tokenizer, length: int, depth: float, trials: int = 5, seed: int = 0,
                     policy=None) -> float:  # fmt: skip
    """Fraction of ``trials`` random 5-digit keys the model decodes right after the question (through a cache
    held by ``policy``)."""
    g = torch.Generator().manual_seed(seed)
    device = model.embed_tokens.weight.device
    right = 0
    for _ in range(trials):
        key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
        ids = torch.tensor([passkey_prompt(tokenizer, length, depth, key)], device=device)
        answer = tokenizer.encode(" " + key).ids
        # a few tokens per prompt of its own length: compiling the step would cost more than it saves
        out = model.generate(ids, max_new_tokens=len(answer), compile=False, **_through(policy))
        out = out[0, ids.shape[1] :].tolist()
        right += tokenizer.decode(out).strip().startswith(key)
    return right / trials


def passkey_grid(model, tokenizer, fractions=(0.25, 0.5, 1.0), depths=(0.0, 0.5, 1.0), trials: int = 5,
                 max_len: int | None = None, policy=None) -> dict:  # fmt: skip
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
                grid[str(n)][str(d)] = passkey_accuracy(model, tokenizer, n, d, trials, policy=policy)
                bar.update()
            log.info("passkey: %d tokens, accuracy by depth %s", n, grid[str(n)])
    return grid


def decode_speed(model, batch_size: int, prompt_len: int = 32, new_tokens: int = 32, policy=None) -> float:
    """Greedy decoding throughput (new tokens per second over the batch) from a random prompt,
    best of two after a warm-up; prompt and new tokens kept within the model's max_seq_len; the cache held
    by ``policy``."""
    prompt_len = min(prompt_len, model.config.max_seq_len // 2)
    new_tokens = min(new_tokens, model.config.max_seq_len - prompt_len)
    was_training = model.training
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), device=model.embed_tokens.weight.device)
    best = float("inf")
    for _ in range(3):  # the first is the warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, **_through(policy))
        best = min(best, time.perf_counter() - t0)
    model.train(was_training)
    return batch_size * new_tokens / best


def _through(policy) -> dict:
    """``generate``'s arguments for a cache held by ``policy`` (none without one: any ``generate`` will do)."""
    return {} if policy is None else {"cache_policy": policy}


@torch.inference_mode()
def cached_val_loss(model, batches, policy, chunk: int = 1, prompt: int = 0) -> float:
    """The mean cross-entropy over the labelled tokens of ``batches`` (dicts of ``input_ids``, ``labels`` and
    optionally ``context``, as the validation loader gives them) with each row decoded through a cache held by
    ``policy``: its first ``prompt`` tokens in one step (as a prompt), then ``chunk`` tokens a step; a step's
    tokens attend to each other as computed and to the earlier steps' keys and values through the cache.
    Through a full-precision cache it is the forward's loss."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in tqdm(batches, desc=f"val loss through a {policy.describe()} cache", unit="batch", disable=None):
        _, labels, logits = decoded_logits(model, batch, policy, chunk, prompt)
        total += float(F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.inference_mode()
def decoded_logits(model, batch: dict, policy, chunk: int = 1, prompt: int = 0) -> tuple:
    """``(input_ids, labels, logits)`` of one validation ``batch`` decoded through a cache held by ``policy``
    (None: full precision), as ``cached_val_loss`` decodes it."""
    from kvlab.recipes.module import LMModule  # the rows as training reads them (a context in the prompt)

    if batch.get("doc_ids") is not None:
        raise ValueError("the validation rows pack documents (data.doc_mask=true), which a cache cannot "
                         "restart at; decode them through the cache with data.doc_mask=false")  # fmt: skip
    device = model.embed_tokens.weight.device
    ids, labels, context = (None if t is None else t.to(device) for t in LMModule._inputs(model, batch))
    room = {} if model.config.context is None else {"context_len": 0 if context is None else context.shape[1]}
    cache = model.new_cache(ids.shape[0], ids.shape[1], policy=policy, **room)
    logits = []
    starts = [0, *range(prompt or chunk, ids.shape[1], chunk)]  # the prompt's step, then chunk by chunk
    for s, e in zip(starts, [*starts[1:], ids.shape[1]], strict=True):
        extra = {"context": context} if s == 0 and context is not None else {}
        logits.append(model(ids[:, s:e], cache=cache, **extra))
    return ids, labels, torch.cat(logits, dim=1)


def evaluate(model, tokenizer, cfg, policy=None, val_batches=None) -> dict:
    """Stage ``eval``'s measurements beyond the validation loss, as ``cfg`` (the run's ``eval`` section,
    kvlab.recipes.config.EvalConfig) picks them; the pass key only for text data (a ``tokenizer``). With a
    cache ``policy`` (a CachePolicy), everything decodes through it, and ``val_batches`` give its
    ``cache_val_loss``."""
    metrics = {}
    if policy is not None:
        metrics["cache_policy"] = policy.describe()
        if val_batches is not None:
            loss = cached_val_loss(model, val_batches, policy, cfg.cache_chunk, cfg.cache_prompt)
            metrics.update(cache_val_loss=loss, cache_val_ppl=math.exp(min(loss, 50.0)))
            log.info("validation loss decoded through the %s cache: %.4f", policy.describe(), loss)
    if cfg.decode_speed:
        speeds = {}
        for b in tqdm((1, 8), desc="decode speed", unit="batch size", disable=None):
            speeds[f"batch_{b}"] = decode_speed(model, b, policy=policy)
        log.info("decode speed: %s new tokens/s", {k: round(v, 1) for k, v in speeds.items()})
        metrics["decode_tokens_per_s"] = speeds
    if cfg.passkey and tokenizer is not None:
        metrics["passkey"] = passkey_grid(model, tokenizer, trials=cfg.passkey_trials, max_len=cfg.passkey_max_len,
                                          policy=policy)  # fmt: skip
    return metrics
