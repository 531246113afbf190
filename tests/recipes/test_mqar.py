"""MQAR examples: what is asked, what answers it, and that it trains through train.py."""

import json

import pytest
import torch

from kvlab.recipes.mqar import FILLER, mqar_examples
from tests.recipes.test_train import run_dirs, train


def test_every_query_asks_for_the_value_paired_with_its_key():
    ids, labels = mqar_examples(20, seq_len=63, vocab_size=64, pairs=6, seed=3)
    assert ids.shape == labels.shape == (20, 63)
    for row_ids, row_labels in zip(ids, labels, strict=True):
        keys, values = row_ids[:12:2], row_ids[1:12:2]
        assert len(set(keys.tolist())) == 6 and (keys < 32).all() and (values >= 32).all()
        pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
        asked = (row_labels != -100).nonzero().flatten()
        assert len(asked) == 6 and (asked >= 12).all()  # one query per key, after the pairs
        for t in asked.tolist():
            assert row_labels[t].item() == pairs[row_ids[t].item()]
        rest = torch.ones(63, dtype=torch.bool)
        rest[:12] = False
        rest[asked] = False
        rest[(asked + 1)[asked + 1 < 63]] = False  # the value after the last query may be the label only
        assert (row_ids[rest] == FILLER).all()


def test_seeds_give_different_examples_and_the_same_seed_the_same():
    a, _ = mqar_examples(4, 31, 64, 4, seed=0)
    b, _ = mqar_examples(4, 31, 64, 4, seed=0)
    c, _ = mqar_examples(4, 31, 64, 4, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"pairs": 40}, r"mqar_pairs=40 needs 1 <= pairs <= vocab_size/2 - 1 = 31"),
     ({"pairs": 10, "seq_len": 30}, r"seq_len=30 is too short for 10 pairs")],
)  # fmt: skip
def test_impossible_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar_examples(2, **({"seq_len": 63, "vocab_size": 64} | kwargs), seed=0)


def test_train_py_trains_on_mqar_and_reports_recall_accuracy(tmp_path, data_cache):
    train(tmp_path, data_cache, "data=mqar", "model.vocab_size=64", "data.seq_len=31", "data.mqar_pairs=4",
          "data.mqar_examples=256", "data.mqar_val_examples=64", "trainer.max_steps=8")  # fmt: skip
    (run,) = run_dirs(tmp_path, "train")
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    assert not (run / "checkpoints" / "tokenizer.json").exists()  # generated tokens: no tokenizer to keep
