"""Parents with classes of their own, decoded and trained by kvlab and by `transformers`' class, one process.

    python benchmarks/native_parents.py [--parents gemma2,mixtral,deepseek_v2,qwen2_moe,phi3,mamba,mamba2,gpt_oss,
                                                   granite_4_h,nemotron_h,qwen3_next,kimi_linear,griffin,lfm2,
                                                   minimax,falcon_h1,olmo_hybrid,exaone4]
                                        [--batches 1,8]
                                        [--prompt 128]
                                        [--new 128] [--repeats 3] [--steps 10]

Each parent is built in kvlab at the presets' shapes (d_model 256, 6 layers, 8 query heads of 32, vocab 4,096,
fp32) with its own parts: Gemma 2's windows on every other layer, soft-capped scores and logits and sandwich
norms (`transformers` runs its scores eagerly: SDPA takes no cap); Mixtral's 8 experts, top 2, in every layer;
DeepSeek-V2-Lite's MLA with 8 experts, top 2, and a shared one after a dense layer; Qwen2-MoE's q/k/v biases and
8 experts, top 2, beside a shared expert twice as wide, gated per token; Phi-4-mini's RoPE on three quarters of
each head with LongRoPE, its original context 192 positions (so decoding switches to the long factors halfway);
Mamba and Mamba-2 alone, no MLPs, 12 layers (a Mamba block has about half a Llama block's weights); gpt-oss's
attention with biases and learned sinks, 128-token windows on every other layer, YaRN untruncated, and 8 experts
with biases and the clamped SwiGLU, top 2 (`transformers` runs its scores eagerly: SDPA takes no sinks); Granite
4.0-H's Mamba-2 layers with one attention layer without RoPE (layer 2 of 6), Granite's multipliers, and 8 experts
of 128, top 2, beside a shared SwiGLU of 256 in every layer; Nemotron-H as the ``nemotron_h`` preset builds it
(Mamba-2 in 2 groups, one attention layer without positions at block 3, squared-ReLU MLPs of 1,344 after every mixer
but the one before the attention, each its own layer there); Qwen3-Next as the ``qwen3_next`` preset builds it (8
layers: three gated DeltaNet layers, 4 value heads of 64 over 2 query/key heads, to one gated attention layer with
zero-centred query/key norms and RoPE on a quarter of each head; 8 experts of 128, top 2, beside a gated shared
expert; `transformers` runs its gated delta rule and convolution on their torch paths, fla's and causal-conv1d's
kernels being CUDA's); Kimi Linear as the ``kimi_linear`` preset builds it (8 layers: three KDA layers, 4 heads of 64
with a decay per key channel, to one MLA layer without RoPE; a SwiGLU, then 8 experts of 128, top 2, by DeepSeek-V3's
routing beside a shared expert; its KDA and convolution on their torch paths); Griffin as the ``griffin`` preset builds
it (RecurrentGemma's parts: two RG-LRU blocks of 256 channels, then local MQA over 128-token windows, twice; a biased
GeGLU of 768; `transformers` scans its RG-LRU token by token); LFM2 as the ``lfm2`` preset builds it (two gated short
convolutions, then GQA with query/key norms, twice; `transformers` runs its convolution on the torch path,
causal-conv1d's kernels being CUDA's); MiniMax-01 as the ``minimax_01`` preset builds it but with RoPE on every
channel of its attention heads, as `transformers`' class rotates them (8 layers: seven lightning layers, 8 heads of
32, then GQA over one K/V head; 8 experts of 256, top 2, in every layer; the normalised residual times 2;
`transformers` runs lightning attention in 256-token blocks in a prompt, then token by token); Falcon-H1 at
Falcon-H1-0.5B's proportions (in every layer GQA, 8 heads of 32 over 2 K/V heads, beside Mamba-2 1.5 d_model wide in
6 heads of 64 with a 64-wide state, their outputs added; a SwiGLU of 2 d_model; its multipliers 1, as kvlab's
weights hold them; `transformers` runs its Mamba-2 on the torch path); OLMo Hybrid at Olmo-Hybrid-7B's proportions
(8 layers: three gated DeltaNet layers, 4 heads with keys of 0.75 d_model / 4 and values twice that, negative
eigenvalues, in Llama's block, to one MHA layer with query and key norms over the projections in OLMo 2's block; a
SwiGLU of 688; `transformers` runs its gated delta rule and convolution on their torch paths); EXAONE 4.0 at its
32B's layout (8 layers, three with 128-token windows and RoPE to one full layer without positions, GQA with per-head
query/key norms, OLMo 2's block).
kvlab's native export of it is loaded back into `transformers`' class (Gemma2ForCausalLM, MixtralForCausalLM,
DeepseekV2ForCausalLM, Qwen2MoeForCausalLM, Phi3ForCausalLM, MambaForCausalLM, Mamba2ForCausalLM, the Mambas
running their torch paths here, mamba-ssm's kernels being CUDA's; GptOssForCausalLM; GraniteMoeHybridForCausalLM,
its Mamba-2 on the same torch path; NemotronHForCausalLM, the same; Qwen3NextForCausalLM; KimiLinearForCausalLM;
RecurrentGemmaForCausalLM; Lfm2ForCausalLM; MiniMaxForCausalLM; FalconH1ForCausalLM; OlmoHybridForCausalLM;
Exaone4ForCausalLM), so
both hold the same weights, and their greedy tokens are checked equal. Decoding: ``generate`` of ``--new`` tokens
after a ``--prompt``-token prompt under ``torch.inference_mode`` (kvlab compiled, its compilation the warm-up, and
eager; `transformers` eager, its dynamic cache). Training: one step (forward with the loss, backward, fused AdamW) on
8 x 256 tokens, best of ``--steps``. Every time is the best of its rounds, the runners interleaved
(benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
from common import best_interleaved  # benchmarks/common.py, beside this script

from kvlab import build_model
from kvlab.archs.config import ModelConfig
from kvlab.archs.hf import save_hf

SHAPES = {"vocab_size": 4096, "d_model": 256, "n_layers": 6, "max_seq_len": 2048}
GQA = {"kind": "attention", "n_heads": 8, "n_kv_heads": 2, "head_dim": 32}
GPT_OSS = {**GQA, "qkv_bias": True, "o_bias": True, "learned_sinks": True, "rope_theta": 150000.0, "rope_scaling": {
    "kind": "yarn", "factor": 32.0, "original_max_seq_len": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
    "attention_factor": 1.3466, "truncate": False}}  # fmt: skip
PARENTS = {
    "gemma2": {
        **SHAPES, "norm": {"kind": "rmsnorm", "eps": 1e-6, "unit_offset": True}, "post_norms": True,
        "embed_scale": 16.0, "mlp": {"kind": "geglu", "hidden": 688}, "tie_embeddings": True, "logit_softcap": 30.0,
        "pattern": "LG", "mixers": {"L": {**GQA, "window": 64, "softcap": 50.0}, "G": {**GQA, "softcap": 50.0}},
    },
    "mixtral": {**SHAPES, "mixer": GQA, "mlp": {"kind": "moe", "hidden": 256, "n_experts": 8, "top_k": 2,
                                                "norm_topk": True}},
    "deepseek_v2": {
        **SHAPES, "mixer": {"kind": "mla", "n_heads": 8, "head_dim": 32, "rope_head_dim": 16, "kv_lora_rank": 128},
        "mlp_pattern": "DEEEEE", "mlps": {"D": {"kind": "swiglu", "hidden": 688},
                                          "E": {"kind": "moe", "hidden": 128, "n_experts": 8, "top_k": 2,
                                                "n_shared": 1}},
    },
    "qwen2_moe": {**SHAPES, "mixer": {**GQA, "qkv_bias": True}, "mlp": {
        "kind": "moe", "hidden": 128, "n_experts": 8, "top_k": 2, "n_shared": 2, "shared_gate": True}},
    "phi3": {**SHAPES, "mixer": {**GQA, "rope_dims": 24, "rope_scaling": {
        "kind": "longrope", "short_factor": [1.0 + i / 12 for i in range(12)],
        "long_factor": [1.0 + i for i in range(12)], "original_max_seq_len": 192, "attention_factor": 1.19}}},
    "mamba": {**SHAPES, "n_layers": 12, "mixer": {"kind": "mamba", "state_dim": 16}, "mlp": {"kind": "none"}},
    "mamba2": {**SHAPES, "n_layers": 12, "mixer": {"kind": "mamba2", "head_dim": 32, "state_dim": 64, "n_groups": 1},
               "mlp": {"kind": "none"}},
    "gpt_oss": {**SHAPES, "pattern": "LG", "mixers": {"L": {**GPT_OSS, "window": 128}, "G": GPT_OSS},
                "mlp": {"kind": "moe", "hidden": 256, "n_experts": 8, "top_k": 2, "norm_topk": True, "bias": True,
                        "swiglu_limit": 7.0}},
    "granite_4_h": {**SHAPES, "pattern": "MMAMMM", "embed_scale": 12.0, "residual_scale": 0.22, "logit_scale": 1 / 6,
                    "mixers": {"M": {"kind": "mamba2", "head_dim": 32, "state_dim": 64, "n_groups": 1},
                               "A": {**GQA, "rope_dims": 0, "softmax_scale": 1 / 32}},
                    "mlp": {"kind": "moe", "hidden": 128, "n_experts": 8, "top_k": 2, "norm_topk": True,
                            "n_shared": 2}},
    # (run from the repository)
    **{name: ModelConfig.from_yaml(f"configs/model/{name}.yaml").to_dict()
       for name in ("nemotron_h", "qwen3_next", "kimi_linear", "griffin", "lfm2")},
    "falcon_h1": {**SHAPES, "mlp": {"kind": "swiglu", "hidden": 512}, "mixer": {
        "kind": "parallel", "combine": "sum", "mixers": [
            GQA, {"kind": "mamba2", "head_dim": 64, "state_dim": 64, "inner": 384, "n_groups": 1}]}},
    "olmo_hybrid": {**SHAPES, "n_layers": 8, "pattern": "DDDA", "norm_pattern": "PPPO", "mixers": {
        "D": {"kind": "gated_deltanet", "n_heads": 4, "head_dim": 48, "value_head_dim": 96,
              "negative_eigenvalues": True},
        "A": {"kind": "attention", "n_heads": 8, "head_dim": 32, "qk_norm": True, "qk_norm_over": "projection"}}},
    "exaone4": {**SHAPES, "n_layers": 8, "pattern": "LLLG", "pre_norms": False, "post_norms": True, "mixers": {
        "L": {**GQA, "qk_norm": True, "window": 128}, "G": {**GQA, "qk_norm": True, "rope_dims": 0}}},
    "minimax": (lambda d: {**d, "mixers": {**d["mixers"], "A": {**d["mixers"]["A"], "rope_dims": 32}}})(
        ModelConfig.from_yaml("configs/model/minimax_01.yaml").to_dict()),
}  # fmt: skip


def twin(model):
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/twin", remote_code=False)
        return transformers.AutoModelForCausalLM.from_pretrained(
            f"{tmp}/twin", dtype=torch.float32, experts_implementation="eager"
        ).eval()


def decoders(model, hf, ids, new: int):
    def ours(compile: bool):
        def run():
            with torch.inference_mode():
                return model.generate(ids, max_new_tokens=new, compile=compile)

        return run

    def theirs():
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))  # fmt: skip

    return {"kvlab compiled": ours(True), "kvlab eager": ours(False), "transformers": theirs}


def trainers(model, hf, ids):
    def step(module, loss_of):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)

        def run():
            loss_of(module).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    return {
        "kvlab": step(model.train(), lambda m: m(ids, labels=ids)),
        "transformers": step(hf.train(), lambda m: m(ids, labels=ids).loss),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parents", default=",".join(PARENTS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)  # training steps timed (0: no training)
    args = p.parse_args()
    torch.manual_seed(0)
    print("| parent | class | batch | kvlab compiled tok/s | kvlab eager tok/s | transformers tok/s | compiled / "
          "transformers | same tokens |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    training = []
    for name in args.parents.split(","):
        model = build_model(PARENTS[name]).eval()
        hf = twin(model)
        for batch in map(int, args.batches.split(",")):
            ids = torch.randint(0, SHAPES["vocab_size"], (batch, args.prompt))
            runs = decoders(model.eval(), hf.eval(), ids, args.new)
            outs = {k: run() for k, run in runs.items()}  # the warm-up (kvlab's compilation)
            same = torch.equal(outs["kvlab compiled"], outs["transformers"]) and torch.equal(
                outs["kvlab eager"], outs["transformers"]
            )
            best, _ = best_interleaved(list(runs.items()), args.repeats)
            rate = {k: batch * args.new / t for k, t in best.items()}
            print(f"| {name} | {type(hf).__name__} | {batch} | {rate['kvlab compiled']:,.0f} | "
                  f"{rate['kvlab eager']:,.0f} | {rate['transformers']:,.0f} | "
                  f"x{rate['kvlab compiled'] / rate['transformers']:.2f} | {same} |")  # fmt: skip
        if not args.steps:  # (0: decoding alone; transformers' Mamba trains through its slow torch scan here)
            continue
        ids = torch.randint(0, SHAPES["vocab_size"], (8, 256))
        steps = trainers(model, hf, ids)
        for run in steps.values():
            run()  # warm-up
        best, _ = best_interleaved(list(steps.items()), args.steps)
        training.append((name, {k: ids.numel() / t for k, t in best.items()}))
    if not training:
        return
    print("\n| parent | kvlab training tok/s | transformers training tok/s | kvlab / transformers |")
    print("| --- | --- | --- | --- |")
    for name, rate in training:
        print(f"| {name} | {rate['kvlab']:,.0f} | {rate['transformers']:,.0f} | "
              f"x{rate['kvlab'] / rate['transformers']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
