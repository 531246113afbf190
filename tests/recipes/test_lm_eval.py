"""lm-evaluation-harness on kvlab models (stage lm_eval): batched scores equal one request at a time through
another route (the fused loss), generation equals generate row by row, and local tasks run offline through
lm-eval's own evaluator, in process and through ``kvlab lm-eval``."""

import json
import math
import re

import pytest
import torch
from lm_eval.api.instance import Instance

from kvlab import build_model
from kvlab.recipes.config import LmEvalConfig
from kvlab.recipes.data import train_tokenizer
from kvlab.recipes.lm_eval import KvlabLM, run_lm_eval
from kvlab.tokenizer import eos_id
from tests.conftest import tiny
from tests.recipes.test_train import run_dirs, train

TEXT = ["the cat sat on the mat. ", "a dog ran in the park. ", "one two three four five six. ", "def f(x): return x\n"]
DOCS = [
    "the cat sat on the mat and the dog ran in the park",
    "one two three four five six " * 9,  # longer than the model's 64 positions: several rolling windows
    "def f(x): return x",
]


@pytest.fixture(scope="module")
def lm():
    tokenizer = train_tokenizer(TEXT * 10, 300)
    model = build_model(tiny(vocab_size=300, max_seq_len=64, mixer={"kind": "mamba2", "head_dim": 16})).eval()
    return KvlabLM(model, tokenizer, batch_size=3, max_gen_toks=6)


def _fused_loss(model, whole: list[int], n: int) -> float:
    """The summed negative log-likelihood of ``whole``'s last ``n`` tokens after the rest, through the model's
    fused head + loss kernel (one row, no batching)."""
    ids = torch.tensor([whole[:-1]])
    labels = torch.full_like(ids, -100)
    labels[0, -n:] = torch.tensor(whole[-n:])
    with torch.no_grad():
        return float(model(ids, labels=labels)) * n


def test_loglikelihoods_in_batches_equal_each_alone(lm):
    """Rows of different lengths, right-padded in batches of 3 sorted by length, one longer than the model."""
    g = torch.Generator().manual_seed(0)
    requests = []
    for context_len, n in [(5, 2), (30, 4), (1, 1), (70, 3), (12, 12), (8, 1), (40, 2)]:
        whole = torch.randint(0, 300, (context_len + n,), generator=g).tolist()
        requests.append((("", ""), whole[:context_len], whole[context_len:]))
    scores = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (_, context, continuation), (score, greedy) in zip(requests, scores, strict=True):
        whole = (context + continuation)[-65:]
        assert score == pytest.approx(-_fused_loss(lm.model, whole, len(continuation)), rel=1e-4, abs=1e-4)
        with torch.no_grad():
            logits = lm.model(torch.tensor([whole[:-1]]))[0, -len(continuation) :]
        assert greedy == (logits.argmax(-1).tolist() == continuation)


def test_generate_until_in_a_padded_batch_equals_each_alone(lm):
    prompts = ["the cat", "one two three four", "a", "def f(x):"]
    settings = {"until": ["."], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, dict(settings)), i) for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests, disable_tqdm=True)
    eot = eos_id(lm.tok)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = torch.tensor([lm.tok.encode(prompt).ids])
        new = lm.model.generate(ids, max_new_tokens=6, eos_token_id=eot)[0, ids.shape[1] :].tolist()
        alone = lm.tok.decode(new[: new.index(eot)] if eot in new else new)
        assert text == alone.split(".")[0]


def test_sampled_generate_until_depends_on_neither_batch_nor_order(lm):
    """Each request samples from its own generator (lm_eval.seed, the request, its repeat): the same answers in
    batches of 3 or 1 and in another order; a repeated request draws anew; a nucleus of one token is greedy."""
    prompts = ["the cat", "one two three four", "a", "the cat"]  # the last: a repeat of the first
    settings = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.5, "top_k": 0}
    requests = [Instance("generate_until", {}, (p, dict(settings)), i) for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests, disable_tqdm=True)
    one_by_one = KvlabLM(lm.model, lm.tok, batch_size=1, max_gen_toks=6)
    order = [2, 0, 1, 3]  # the repeats in their order (identical requests: which is first is all that tells them apart)
    assert one_by_one.generate_until([requests[i] for i in order], disable_tqdm=True) == [texts[i] for i in order]
    assert texts[0] != texts[3]
    assert KvlabLM(lm.model, lm.tok, batch_size=3, max_gen_toks=6, seed=7).generate_until(requests) != texts
    greedy = [Instance("generate_until", {}, (p, {**settings, "do_sample": False}), 0) for p in prompts]
    nucleus_of_one = [Instance("generate_until", {}, (p, {**settings, "top_p": 1e-9}), 0) for p in prompts]
    assert lm.generate_until(nucleus_of_one, disable_tqdm=True) == lm.generate_until(greedy, disable_tqdm=True)


TASKS = {
    "kvlab_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    },
    "kvlab_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{text[:10]}}",
        "doc_to_choice": ["{{text[10:]}}", "zzz qqq"],
        "doc_to_target": 0,
        "metric_list": [{"metric": "acc"}],
    },
    "kvlab_gen": {
        "output_type": "generate_until",
        "doc_to_text": "{{text[:8]}}",
        "doc_to_target": "{{text[8:12]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


def write_tasks(directory):
    """The three local tasks, over a JSON-lines file of DOCS: what lm-eval's --include_path reads."""
    import yaml

    directory.mkdir(exist_ok=True)
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    for name, task in TASKS.items():
        spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **task}  # fmt: skip
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return directory


def test_local_tasks_run_offline_through_lm_evals_evaluator(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = LmEvalConfig(tasks=list(TASKS), include_path=str(write_tasks(tmp_path / "tasks")), builtin_tasks=False,
                       bootstrap_iters=0)  # fmt: skip
    metrics, results = run_lm_eval(lm.model, lm.tok, cfg)
    assert set(metrics) == set(TASKS) and set(results["results"]) == set(TASKS)
    assert 0 <= metrics["kvlab_choice"]["acc"] <= 1 and 0 <= metrics["kvlab_gen"]["exact_match"] <= 1
    # word perplexity: each document's tokens scored in windows of up to 64 predictions, each seeing the 64 tokens
    # before its last one (from end-of-text on); words as lm-eval counts them (split on whitespace runs)
    nll = 0.0
    for doc in DOCS:
        tokens = [eos_id(lm.tok), *lm.tok.encode(doc).ids]  # tokens[i + 1] is the document's i-th
        for s in range(0, len(tokens) - 1, 64):  # the window predicting document tokens s..e-1
            e = min(s + 64, len(tokens) - 1)
            nll += _fused_loss(lm.model, tokens[max(0, e + 1 - 65) : e + 1], e - s)
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    assert len(lm.tok.encode(DOCS[1]).ids) > 64  # (so that one document takes several windows)
    assert metrics["kvlab_ppl"]["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-3)


def test_bad_task_names_are_named(lm, tmp_path):
    cfg = LmEvalConfig(
        tasks=["kvlab_ppl", "no_such_task"], include_path=str(write_tasks(tmp_path)), builtin_tasks=False
    )
    with pytest.raises(ValueError, match=r"lm_eval.tasks: 'no_such_task' is not a task of .*tmp"):
        run_lm_eval(lm.model, lm.tok, cfg)
    with pytest.raises(ValueError, match=r"lm_eval.tasks=\[\]: name one or more lm-eval tasks"):
        LmEvalConfig().check()


def test_kvlab_lm_eval_on_a_checkpoint(tmp_path, data_cache):
    """A 3-step run's checkpoint, then ``kvlab lm-eval`` (recipe=lm_eval) on it: lm_eval.json and the metrics."""
    train(tmp_path, data_cache, "trainer.max_steps=3")
    (run,) = run_dirs(tmp_path, "train")
    tasks = write_tasks(tmp_path / "tasks")
    train(tmp_path, data_cache, f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "lm_eval.tasks=[kvlab_ppl,kvlab_gen]",
          f"lm_eval.include_path={tasks}", "lm_eval.builtin_tasks=false", "lm_eval.bootstrap_iters=0",
          tiny_model=False, entry=["-m", "kvlab", "lm-eval"])  # fmt: skip
    (evaluated,) = run_dirs(tmp_path, "lm_eval")
    metrics = json.loads((evaluated / "metrics.json").read_text())["lm_eval"]
    assert metrics["kvlab_ppl"]["word_perplexity"] > 1 and 0 <= metrics["kvlab_gen"]["exact_match"] <= 1
    results = json.loads((evaluated / "lm_eval.json").read_text())
    assert set(results["results"]) == {"kvlab_ppl", "kvlab_gen"}
