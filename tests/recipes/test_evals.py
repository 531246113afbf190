"""Passkey retrieval's prompt and scoring, and decoding speed."""

import pytest
import torch

from kvlab import build_model
from kvlab.recipes.config import EvalConfig
from kvlab.recipes.data import train_tokenizer
from kvlab.recipes.evals import (
    FILLER,
    NEEDLE,
    QUESTION,
    decode_speed,
    evaluate,
    passkey_accuracy,
    passkey_grid,
    passkey_prompt,
)
from tests.conftest import tiny


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([FILLER * 3, NEEDLE.format(key="12345") * 3, QUESTION * 3, "0123456789 " * 20], 300)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_needle_sits_at_its_depth(tokenizer, depth):
    ids = passkey_prompt(tokenizer, 200, depth, "54321")
    needle = tokenizer.encode(NEEDLE.format(key="54321")).ids
    question = tokenizer.encode(QUESTION).ids
    assert len(ids) == 200 and ids[-len(question) :] == question
    start = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
    room = 200 - len(needle) - len(question)
    assert start == round(depth * room)


class Oracle(torch.nn.Module):
    """Answers with the key the prompt holds, as a model that retrieves perfectly would."""

    def __init__(self, tokenizer, config):
        super().__init__()
        self.tokenizer, self.config = tokenizer, config
        self.embed_tokens = torch.nn.Embedding(1, 1)

    def generate(self, ids, max_new_tokens, compile=None):
        text = self.tokenizer.decode(ids[0].tolist())
        key = text.split("The pass key is ")[1][:5]
        answer = torch.tensor([self.tokenizer.encode(" " + key).ids[:max_new_tokens]])
        return torch.cat([ids, answer], dim=1)


def test_passkey_scores_a_retrieving_model_one_and_a_random_one_zero(tokenizer):
    model = build_model(tiny(vocab_size=300, max_seq_len=256)).eval()
    assert passkey_accuracy(Oracle(tokenizer, model.config), tokenizer, 200, 0.5, trials=3) == 1.0
    assert passkey_accuracy(model, tokenizer, 200, 0.5, trials=3) == 0.0


def test_decode_speed_is_positive_and_leaves_the_mode():
    model = build_model(tiny()).train()
    assert decode_speed(model, 2, prompt_len=8, new_tokens=4) > 0
    assert model.training


def test_grid_keeps_the_lengths_that_hold_the_prompt(tokenizer):
    model = build_model(tiny(vocab_size=300, max_seq_len=128)).eval()
    shortest = len(tokenizer.encode(FILLER + NEEDLE.format(key="00000") + QUESTION).ids)
    grid = passkey_grid(model, tokenizer, fractions=(0.05, 0.5, 1.0), depths=(0.0, 1.0), trials=1)
    assert list(grid) == [str(n) for n in sorted({int(f * 120) for f in (0.05, 0.5, 1.0)}) if n >= shortest]
    assert all(set(by_depth) == {"0.0", "1.0"} for by_depth in grid.values())


def test_evaluate_runs_what_eval_picks_with_passkey_lengths_capped(tokenizer):
    model = build_model(tiny(vocab_size=300, max_seq_len=512)).eval()
    capped = evaluate(model, tokenizer, EvalConfig(decode_speed=False, passkey_max_len=128, passkey_trials=1))
    # all of 128 - 8 tokens, not of 512 - 8; a quarter and a half are too short for the needle and the question
    assert set(capped) == {"passkey"} and list(capped["passkey"]) == ["120"]
    assert all(set(by_depth) == {"0.0", "0.5", "1.0"} for by_depth in capped["passkey"].values())
    assert evaluate(model, None, EvalConfig(passkey_trials=1)).keys() == {"decode_tokens_per_s"}  # no text
    assert evaluate(model, tokenizer, EvalConfig(decode_speed=False, passkey=False)) == {}
