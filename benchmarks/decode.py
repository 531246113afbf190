"""Greedy decoding speed: kvlab vs `transformers` Llama at the same weights, one process.

    python benchmarks/decode.py [--batch 1] [--prompt 64] [--new 128] [--preset gqa]

Both models hold identical weights (the preset's Llama-compatible shapes),
generate the same greedy tokens (checked), and are timed over the same
number of repeats after a warm-up. Prints a markdown row per model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers
from common import timed  # benchmarks/common.py, beside this script

from kvlab import ModelConfig, build_model
from kvlab.archs.hf import kvlab_to_hf_name

REPO = Path(__file__).resolve().parents[1]


def llama_twin(model) -> transformers.LlamaForCausalLM:
    c = model.config
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.mlp.hidden,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.mixer.n_heads,
            num_key_value_heads=c.mixer.n_kv_heads,
            head_dim=c.mixer.head_dim,
            max_position_embeddings=c.max_seq_len,
            rope_theta=c.mixer.rope_theta,
            rms_norm_eps=c.norm.eps,
            tie_word_embeddings=c.tie_embeddings,
        )
    )
    hf.load_state_dict({kvlab_to_hf_name(k): v for k, v in model.state_dict().items()})
    return hf.eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="gqa")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    ours = build_model(ModelConfig.from_yaml(REPO / "configs" / "model" / f"{args.preset}.yaml")).eval()
    hf = llama_twin(ours)
    ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.prompt))
    a = ours.generate(ids, max_new_tokens=args.new)
    with torch.inference_mode():
        b = hf.generate(ids, max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new, pad_token_id=0)
    same = torch.equal(a, b)

    def run_hf():
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=args.new, do_sample=False, min_new_tokens=args.new, pad_token_id=0)

    t_ours = timed(lambda: ours.generate(ids, max_new_tokens=args.new), args.repeats)
    t_hf = timed(run_hf, args.repeats)
    tokens = args.batch * args.new
    print(f"preset={args.preset} batch={args.batch} prompt={args.prompt} new={args.new} "
          f"threads={torch.get_num_threads()} same_tokens={same}")  # fmt: skip
    print("| model | s | new tokens/s |")
    print("| --- | --- | --- |")
    print(f"| kvlab | {t_ours:.3f} | {tokens / t_ours:,.0f} |")
    print(f"| transformers {transformers.__version__} LlamaForCausalLM | {t_hf:.3f} | {tokens / t_hf:,.0f} |")


if __name__ == "__main__":
    main()
