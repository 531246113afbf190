"""lm-evaluation-harness on a kvlab model, without exporting it: stage ``lm_eval`` (``recipe=lm_eval``).

``KvlabLM`` is lm-eval's ``TemplateLM`` over a kvlab ``CausalLM`` and its
tokenizer (the ``tokenizers`` one a run saves beside its checkpoints):

- ``loglikelihood`` (multiple choice, cloze): context + continuation, cut to
  the model's ``max_seq_len`` from the left, in batches of similar lengths,
  right-padded (a causal model's real positions never see what follows them,
  so no mask is needed and every architecture takes them); the
  continuation's summed log-probabilities and whether greedy decoding would
  give it;
- ``loglikelihood_rolling`` (perplexity tasks): lm-eval's rolling windows of
  ``max_seq_len`` tokens, each scored as above;
- ``generate_until``: prompts of different lengths in one left-padded batch
  through ``CausalLM.generate`` (kvlab's own caches; models that take no
  padded rows go row by row), cut at the first stop sequence. A task that
  samples (``do_sample``, with ``temperature``, ``top_k``, ``top_p``) gives
  each request its own generator, seeded from ``lm_eval.seed``, the request
  and its repeat's number, so its answer depends on neither the batch size
  nor the other requests (lm-eval's ``repeats`` each draw anew).

``run_lm_eval`` runs ``lm_eval.simple_evaluate`` on the tasks of ``lm_eval.*``
(hub tasks where the hub is reachable, and task YAMLs of your own from
``lm_eval.include_path``) and returns the metrics per task; stage ``lm_eval``
writes lm-eval's whole results to ``lm_eval.json`` in the run directory.
lm-eval is an optional dependency (``pip install 'kvlab[lm-eval]'``).
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from tqdm.auto import tqdm

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window
except ImportError:
    raise ImportError("stage lm_eval needs lm-evaluation-harness: pip install 'kvlab[lm-eval]'") from None

from kvlab.kernels.precision import upcast
from kvlab.recipes.config import LmEvalConfig
from kvlab.tokenizer import eos_id

log = logging.getLogger("kvlab")


class KvlabLM(TemplateLM):
    """A kvlab ``CausalLM`` (in eval mode) and its ``tokenizers.Tokenizer`` as an lm-eval model."""

    def __init__(self, model, tokenizer, batch_size: int = 4, max_gen_toks: int = 256, compile: bool = False,
                 seed: int = 1234):  # fmt: skip
        super().__init__()
        self.seed = seed  # of the sampled generate_until requests' generators
        self._unused_settings: set[str] = set()  # generate_until's settings kvlab does not take, said once
        self.model, self.tok = model.eval(), tokenizer
        self.eot = eos_id(tokenizer)
        self.max_length = model.config.max_seq_len
        self.batch_size, self.max_gen_toks, self.compile = batch_size, max_gen_toks, compile
        self._device = model.embed_tokens.weight.device  # (LM.device reads it)

    @property
    def eot_token_id(self) -> int:
        return self.eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string).ids  # kvlab's tokenizers add no special tokens

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tok.decode(tokens)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # longest first, so that a batch's rows are of similar lengths; answers go back in request order
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        answers: list = [None] * len(requests)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="log-likelihoods", disable=disable_tqdm):
            wholes = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :] for i in batch]
            width = max(len(w) - 1 for w in wholes)
            ids = torch.full((len(batch), width), self.eot, dtype=torch.long)
            for row, whole in enumerate(wholes):  # right-padded: causal positions never see what follows
                ids[row, : len(whole) - 1] = torch.tensor(whole[:-1])
            logits = self.model(ids.to(self._device))
            for row, (i, whole) in enumerate(zip(batch, wholes, strict=True)):
                n = min(len(requests[i][2]), len(whole) - 1)  # continuation tokens, as many as fit
                end = len(whole) - 1
                logprobs = upcast(logits[row, end - n : end]).log_softmax(dim=-1)
                target = torch.tensor(whole[-n:], device=logprobs.device)
                score = float(logprobs.gather(-1, target[:, None]).sum())
                answers[i] = (score, bool((logprobs.argmax(dim=-1) == target).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answers[i])
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for k, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, target in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, context, target))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[k] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    @torch.inference_mode()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers: list = [None] * len(requests)
        eos_text = self.tok_decode([self.eot])
        seeds, seen = [], {}  # a request's: lm_eval.seed, its text and settings, which repeat of them it is
        for request in requests:
            key = json.dumps(request.args[:2], sort_keys=True)
            seen[key] = seen.get(key, -1) + 1
            digest = hashlib.sha256(f"{self.seed}/{seen[key]}/{key}".encode()).digest()
            seeds.append(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits: generators take an int64
        # a batch shares its generation settings; longest prompts first
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True), []).append(i)
        batches = []
        for group in groups.values():
            group.sort(key=lambda i: -len(requests[i].args[0]))
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        for batch in tqdm(batches, desc="generate_until", disable=disable_tqdm):
            settings = normalize_gen_kwargs(requests[batch[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(settings.get("until"), eos_text)
            new = min(settings["max_gen_toks"], self.max_length - 1)
            unused = set(settings) - {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}
            if unused - self._unused_settings:
                self._unused_settings |= unused
                log.warning("lm_eval generate_until: kvlab's generate takes no %s; generating without", sorted(unused))
            sampling = {}  # greedy
            if settings.get("do_sample") and float(settings.get("temperature", 0.0)) > 0:
                top_k, top_p = settings.get("top_k"), settings.get("top_p")  # (0 and 1 mean none, as in transformers)
                sampling = {
                    "temperature": float(settings["temperature"]),
                    "top_k": int(top_k) if top_k else None,
                    "top_p": float(top_p) if top_p is not None and top_p < 1 else None,
                    "generator": [torch.Generator().manual_seed(seeds[i]) for i in batch],
                }
            prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - new) :] or [self.eot]
                       for i in batch]  # fmt: skip
            out = self.model.generate(
                prompts, max_new_tokens=new, eos_token_id=self.eot, compile=self.compile, **sampling
            )
            width = max(map(len, prompts))
            for row, i in enumerate(batch):
                tokens = out[row, width:].tolist()
                tokens = tokens[: tokens.index(self.eot)] if self.eot in tokens else tokens
                text = self.tok_decode(tokens)
                cut = min((text.find(s) for s in until if s and s in text), default=len(text))
                answers[i] = text[:cut]
                self.cache_hook.add_partial("generate_until", requests[i].args, answers[i])
        return answers


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig) -> tuple[dict, dict]:
    """lm-eval's ``simple_evaluate`` of ``model`` on ``cfg.tasks``: (metrics per task, lm-eval's whole results)."""
    if tokenizer is None:
        raise ValueError("stage lm_eval reads text: this run has no tokenizer (data=mqar generates token ids)")
    tasks = TaskManager(include_path=cfg.include_path, include_defaults=cfg.builtin_tasks)
    missing = [t for t in cfg.tasks if not tasks.match_tasks([t])]
    if missing:
        where = [*(["lm-eval's own"] if cfg.builtin_tasks else []), *([cfg.include_path] if cfg.include_path else [])]
        where = " or ".join(where) or "any directory (lm_eval.builtin_tasks=false and no lm_eval.include_path)"
        raise ValueError(f"lm_eval.tasks: {', '.join(map(repr, missing))} is not a task of {where}")
    lm = KvlabLM(model, tokenizer, cfg.batch_size, cfg.max_gen_toks, cfg.compile, cfg.seed)
    limit = int(cfg.limit) if cfg.limit is not None and cfg.limit >= 1 else cfg.limit
    results = simple_evaluate(
        model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit, task_manager=tasks,
        bootstrap_iters=cfg.bootstrap_iters, log_samples=False, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
    )  # fmt: skip
    metrics = {
        task: {
            name.removesuffix(",none"): value
            for name, value in values.items()
            if name != "alias" and isinstance(value, (int, float))
        }  # fmt: skip
        for task, values in results["results"].items()
    }
    for task, values in metrics.items():
        log.info("lm_eval %s: %s", task, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    return metrics, results


def results_json(results: dict) -> str:
    """lm-eval's results as JSON text (its task configs hold values JSON has no form for: written as text)."""
    return json.dumps(results, indent=2, sort_keys=True, default=handle_non_serializable) + "\n"
