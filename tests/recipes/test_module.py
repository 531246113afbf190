"""The LightningModule's optimiser pieces, the parameters it trains and its distillation loss."""

from __future__ import annotations

import math

import pytest
import torch

from kvlab import build_model
from kvlab.recipes.module import LMModule, WarmupCosine, distillation_loss
from tests.conftest import tiny


def _lrs(sched, steps):
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_then_cosine_to_min_ratio():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lrs = _lrs(WarmupCosine(opt, lr=2.0, warmup=4, total=14, min_ratio=0.1), 16)
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # linear warmup, 2 * (s + 1) / 4
    # cosine from 2.0 at step 4 to 0.2 at step 14, halfway at step 9; flat after the end
    assert lrs[9] == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.2) and lrs[15] == pytest.approx(0.2)


def test_schedule_follows_regrouped_parameters():
    # DeepSpeed ZeRO-3 may hand a rank fewer parameter groups than the module built.
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    sched = WarmupCosine(opt, lr=1.0, warmup=2, total=10, min_ratio=0.0)
    opt.param_groups.pop()
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [1.0]


def test_weight_decay_only_on_matrices():
    module = LMModule(model=tiny(), optim={"weight_decay": 0.3})
    opt = module.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.3 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))
    experts = LMModule(model=tiny(mlp={"kind": "moe", "hidden": 32, "n_experts": 4, "bias": True}))
    decay, no_decay = experts.configure_optimizers()["optimizer"].param_groups
    stacked = [experts.model.layers[0].mlp.gate_up_bias, experts.model.layers[0].mlp.down_bias]  # [experts, width]
    assert all(any(p is b for b in no_decay["params"]) for p in stacked) and not any(
        p.dim() < 2 for p in decay["params"]
    )


def test_the_optimizer_is_fused_adamw_and_steps_as_the_per_tensor_loop():
    module = LMModule(model=tiny(), optim={"weight_decay": 0.3, "lr": 1e-2, "warmup_steps": 0})
    opt = module.configure_optimizers()["optimizer"]  # its schedule has set the first step's rate
    assert opt.defaults["fused"]
    twin = [p.detach().clone().requires_grad_() for p in module.model.parameters()]
    loop = torch.optim.AdamW([{"params": [t for t in twin if t.dim() >= 2], "weight_decay": 0.3},
                              {"params": [t for t in twin if t.dim() < 2], "weight_decay": 0.0}],
                             lr=opt.param_groups[0]["lr"], betas=opt.defaults["betas"], eps=opt.defaults["eps"],
                             foreach=False)  # fmt: skip
    for _ in range(3):
        for p, t in zip(module.model.parameters(), twin, strict=True):
            p.grad = torch.randn_like(p)
            t.grad = p.grad.clone()
        opt.step()
        loop.step()
    for p, t in zip(module.model.parameters(), twin, strict=True):
        torch.testing.assert_close(p, t, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning's own
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_gradients_are_clipped_before_the_fused_step(precision, tmp_path):
    """Under bf16-mixed as under 32-true (no gradient scaler) the fused step sees the clipped gradients. (The fused
    step's flag had made Lightning refuse to clip under bf16-mixed: trainer=gpu failed at its first step.)"""
    import lightning as L

    module = LMModule(model=tiny(), optim={"lr": 1e-3, "warmup_steps": 0})
    clip, before, after = 0.05, [], []

    def norm():
        return float(torch.stack([p.grad.float().norm() for p in module.parameters()]).norm())

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before clipping
            before.append(norm())

        def on_train_batch_end(self, *_):  # after the step, which leaves the gradients as it found them
            after.append(norm())

    ids = torch.randint(0, 97, (3, 2, 17))
    trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=clip, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[Watch()])  # fmt: skip
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in ids]
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(after) == 3 and all(b > 10 * clip for b in before)
    assert after == pytest.approx([clip] * 3, rel=1e-3)


def test_a_gradient_scaler_gets_the_per_tensor_step():
    """16-mixed's GradScaler unscales the gradients before clipping them; a fused step would unscale them itself,
    after clipping had seen them scaled."""
    from types import SimpleNamespace

    module = LMModule(model=tiny())
    module._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")))
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]


def test_associative_recall_hits_mark_bigrams_seen_before():
    from kvlab.recipes.module import associative_recall_hits

    ids = torch.tensor([[5, 6, 7, 5, 6, 9, 5, 6]])
    labels = torch.tensor([[6, 7, 5, 6, 9, 5, 6, 7]])  # bigrams: 56 67 75 56 69 95 56 67
    assert associative_recall_hits(ids, labels).tolist() == [[False, False, False, True, False, False, True, True]]


def test_only_the_named_parameters_train():
    module = LMModule(model=tiny(), optim={"trainable": ["k_proj", "v_proj"]})
    trained = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trained == {f"layers.{i}.mixer.{p}.weight" for i in range(4) for p in ("k_proj", "v_proj")}
    opt = module.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in opt.param_groups) == 8
    with pytest.raises(ValueError, match=r"optim.trainable=\['rotation'\] matches no parameter .* embed_tokens"):
        LMModule(model=tiny(), optim={"trainable": ["rotation"]})
    with pytest.raises(ValueError, match="optim.trainable='k_proj' must be a list"):
        LMModule(model=tiny(), optim={"trainable": "k_proj"})


def test_distillation_loss_is_the_mean_kl_from_the_teacher_over_labelled_positions():
    logits, teacher = torch.randn(2, 5, 11, dtype=torch.float64), torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = labels[1, 4] = -100
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                continue
            p, q = torch.softmax(teacher[b, t], -1), torch.softmax(logits[b, t], -1)
            total += (p * (p.log() - q.log())).sum().item()
            count += 1
    assert distillation_loss(logits, teacher, labels).item() == pytest.approx(total / count, rel=1e-6)
    assert distillation_loss(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_is_held_outside_the_module():
    module = LMModule(model=tiny())
    teacher = build_model(tiny())
    module.set_teacher(teacher)
    assert module._teacher is teacher and not any(p.requires_grad for p in teacher.parameters())
    assert all(k.startswith("model.") for k in module.state_dict())
    assert len(list(module.parameters())) == len(list(module.model.parameters()))


def test_a_rows_context_goes_to_the_encoder_or_into_the_prompt():
    """data.context rows: a model with a context encoder gets the context beside the input; one without reads
    it in front of the input, scored on the continuation only: the same tokens scored either way."""
    context, cont = torch.randint(0, 97, (2, 5)), torch.randint(0, 97, (2, 8))
    batch = {"context": context, "input_ids": cont[:, :-1], "labels": cont[:, 1:]}
    plain = LMModule(tiny())
    ids, labels, ctx = plain._inputs(plain.model, batch)
    assert ctx is None and torch.equal(ids, torch.cat([context, cont[:, :-1]], 1))
    assert (labels[:, :5] == -100).all() and torch.equal(labels[:, 5:], cont[:, 1:])
    with torch.no_grad():
        scored = plain._loss(labels, plain.model(ids))
        by_hand = torch.nn.functional.cross_entropy(plain.model(ids)[:, 5:].flatten(0, 1), cont[:, 1:].flatten())
    assert scored == pytest.approx(float(by_hand), rel=1e-6)
    encoder = LMModule(tiny(context={"encoder": "decoder", "cross_layers": [3], "cross": "block"}))
    ids, labels, ctx = encoder._inputs(encoder.model, batch)
    assert ctx is context and ids is batch["input_ids"] and labels is batch["labels"]


def test_training_flops_are_counted_from_the_shapes():
    """Forward and backward of a [2, 32] batch through the tiny GQA model: three times the forward, whose FLOPs
    are the projections, the MLP and the head per token, and the attention's T x T scores and outputs."""
    from kvlab.archs import ModelConfig
    from kvlab.recipes.module import training_flops
    from tests.conftest import tiny

    B, T, d, hidden, vocab, layers, heads, head_dim, kv_heads = 2, 32, 64, 96, 97, 4, 4, 16, 2
    per_token = layers * 2 * (d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
                              + 3 * d * hidden) + 2 * d * vocab  # fmt: skip
    attention = layers * 2 * (2 * T * T * heads * head_dim)  # q k^T and the weighted values, per sequence
    assert training_flops(ModelConfig.from_dict(tiny()), B, T) == 3 * (B * T * per_token + B * attention)
    moe = tiny(mlp={"kind": "moe", "hidden": 16, "n_experts": 4, "top_k": 2})  # routing counts tokens by value
    assert training_flops(ModelConfig.from_dict(moe), B, T) is None


def test_training_flops_of_mla_and_retnet_are_counted_from_the_shapes():
    """The same count for MLA (the training path decompresses K/V: q, the latent's down projection, its up
    projection, the output; attention over no-RoPE + RoPE channels, the values padded to that width for SDPA)
    and RetNet's chunked retention (within each chunk q k^T and its product with v; across chunks each chunk's
    k^T v and the queries' read of the state, whose first read, of the zero state, has no gradient to give)."""
    from kvlab.archs import ModelConfig
    from kvlab.recipes.module import training_flops
    from tests.conftest import tiny

    B, T, d, hidden, vocab, layers, H = 2, 32, 64, 96, 97, 4, 4
    mlp_and_head = layers * 2 * 3 * d * hidden, 2 * d * vocab
    D, R, Dv, rank = 16, 8, 16, 64  # MLA's defaults at d_model 64, 4 heads
    per_token = layers * 2 * (d * H * (D + R) + d * (rank + R) + rank * H * (D + Dv) + H * Dv * d) + sum(mlp_and_head)
    attention = layers * 2 * (T * T * H * (D + R) + T * T * H * max(D + R, Dv))
    mla = tiny(mixer={"kind": "mla", "n_heads": H})
    assert training_flops(ModelConfig.from_dict(mla), B, T) == 3 * (B * T * per_token + B * attention)
    Dk, chunk = 16, 16
    per_token = layers * 2 * (d * H * Dk * 2 + d * H * Dv * 2 + H * Dv * d) + sum(mlp_and_head)  # q k v g, o
    chunks = T // chunk
    retention = layers * H * chunks * (2 * chunk * chunk * (Dk + Dv) + 2 * 2 * chunk * Dk * Dv)
    first_read = layers * H * 2 * chunk * Dk * Dv
    retnet = tiny(mixer={"kind": "retention", "n_heads": H, "chunk_size": chunk})
    assert (
        training_flops(ModelConfig.from_dict(retnet), B, T) == 3 * (B * T * per_token + B * retention) - B * first_read
    )


def test_weight_decay_groups_follow_each_parameters_own_shape_under_zero3():
    """ZeRO-3 flattens each rank's partition of a parameter (its shape stays in ``ds_shape``): grouped by the
    flattened shape, matrices would lose their weight decay and a resumed run would find other groups than
    it saved (DeepSpeed: "loaded state dict has a different number of parameter groups")."""
    from kvlab.recipes.module import LMModule
    from tests.conftest import tiny

    module = LMModule(tiny())
    matrices = sum(p.dim() >= 2 for p in module.model.parameters())
    for p in module.model.parameters():  # as ZeRO-3 leaves them: 1-D partitions, the shape kept aside
        p.ds_shape = p.shape
        p.data = p.data.flatten()
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert [len(g["params"]) for g in groups] == [matrices, sum(1 for _ in module.model.parameters()) - matrices]
    assert groups[0]["weight_decay"] > 0 and groups[1]["weight_decay"] == 0


def test_the_training_step_applies_mixcons_online_gain_updates_once_per_batch(tmp_path):
    """The Conba layers' online learning (K -= eta * the rows' mean of sum_t e_t e_t^T) happens once per training
    batch, from that batch's forward, apart from the optimiser's step on the trained gain, and before the batch
    ends, where a checkpoint is saved (callbacks' on_train_batch_end run before the module's): a run resumed from
    it continues with every update."""
    import lightning as L

    module = LMModule(model=tiny(mixer={"kind": "conba", "state_dim": 4, "expand": 1, "online_lr": 0.1},
                                 init_std=0.05), optim={"lr": 1e-3, "warmup_steps": 0})  # fmt: skip
    conba = module.model.layers[0].mixer
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, *_):
            seen.append(conba.online_gain.clone())

        def on_after_backward(self, *_):  # the batch's update, not yet applied (callbacks' hooks come first)
            seen.append(conba.gain_update[0] / conba.gain_update[1])

        def on_train_batch_end(self, *_):  # where ModelCheckpoint saves
            seen.append(conba.online_gain.clone())

    ids = torch.randint(0, 97, (2, 2, 17))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Watch()])  # fmt: skip
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in ids]
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    gain0, update0, saved0, gain1, update1, saved1 = seen
    assert not gain0.any() and update0.abs().max() > 0
    torch.testing.assert_close(saved0, gain0 - 0.1 * update0)
    torch.testing.assert_close(gain1, saved0)
    torch.testing.assert_close(saved1, gain1 - 0.1 * update1)
    assert torch.equal(conba.online_gain, saved1)


@pytest.mark.parametrize("poison", ["loss", "gradients"])
def test_a_loss_or_gradients_that_are_not_finite_stop_training_before_the_update(tmp_path, poison):
    """A nan update would reach every weight, and the run would go on saving checkpoints over the good ones: the
    step stops first, for a loss that is not finite (before its backward) and for gradients that are not (before
    the optimiser's step), and the weights stay those of the step before."""
    import lightning as L

    from kvlab.recipes.module import TrainingDiverged

    module = LMModule(model=tiny(), optim={"lr": 1e-3, "warmup_steps": 0})
    before = {}

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # the third step
                before.update({k: v.clone() for k, v in pl_module.state_dict().items()})
                if poison == "loss":  # (an MoE's balance term is added to the loss)
                    pl_module.model.aux_loss = lambda: torch.tensor(float("nan"))
                else:
                    pl_module.model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))

    ids = torch.randint(0, 97, (4, 2, 17))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Poison()])  # fmt: skip
    batches = [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in ids]
    said = "the training loss was nan" if poison == "loss" else "the gradients were not finite"
    with pytest.raises(TrainingDiverged, match=f"at step 3 {said}"):
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == 2
    after = module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
