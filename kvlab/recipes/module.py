"""The LightningModule that trains any kvlab model as a causal LM."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import lightning as L
import torch
import torch.nn.functional as F

from kvlab.archs import CausalLM, ModelConfig, build_model
from kvlab.kernels.precision import upcast

log = logging.getLogger("kvlab")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at max_steps
    warmup_steps: int | None = None  # null: a tenth of the run's steps (trainer.max_steps)
    weight_decay: float = 0.1  # decoupled (AdamW), on matrices only: not on norms, biases
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # only the parameters whose names contain one of these train (e.g. [k_rotation, v_rotation, v_mean]: the
    # MatryoshkaKV projections); null: all of them
    trainable: list[str] | None = None

    def validate(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be between 0 and 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps} must be >= 0, or null for a tenth of the run")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps} must be > 0")
        if self.trainable is not None and (
            not isinstance(self.trainable, (list, tuple)) or not all(isinstance(n, str) and n for n in self.trainable)
        ):
            raise ValueError(f"optim.trainable={self.trainable!r} must be a list of parameter-name fragments, or null")


def associative_recall_hits(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t's bigram (input t, next token) already occurred earlier in its row
    (Zoology's "AR hits": the next token can be recalled from the context)."""
    pair = input_ids * (int(labels.max().clamp(min=0)) + 1) + labels.clamp(min=0)
    same = pair[:, :, None] == pair[:, None, :]  # [B, T, T]
    return (same & torch.ones_like(same[0]).tril(-1)).any(dim=-1)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the labelled positions (``labels != -100``) of KL(teacher || model) between the next-token
    distributions, both at temperature 1."""
    kl = F.kl_div(F.log_softmax(upcast(logits), -1), F.log_softmax(upcast(teacher_logits), -1), log_target=True,
                  reduction="none").sum(-1)  # fmt: skip
    asked = labels != -100
    return (kl * asked).sum() / asked.sum().clamp(min=1)


def training_flops(config: ModelConfig, batch_size: int, seq_len: int) -> int | None:
    """FLOPs of one training step's forward and backward on a [batch_size, seq_len] batch, counted by torch's FLOP
    counter over the model built on the meta device: from the shapes alone, nothing allocated or computed (the
    loss head counted as a plain head). None for a model whose forward depends on values (MoE routing counts,
    MatryoshkaKV's rank schedule, RWKV's chunk sizes), which the meta device cannot run."""
    from lightning.fabric.utilities.throughput import measure_flops

    try:
        with torch.device("meta"):
            model = build_model(config)
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        model.train()
        return int(measure_flops(model, lambda: model(ids), torch.Tensor.sum))
    except (RuntimeError, NotImplementedError) as e:
        log.debug("training FLOPs: not countable on the meta device (%s)", str(e).splitlines()[0])
        return None


class TrainingDiverged(RuntimeError):
    """A training loss, or gradients, that are not finite, on any rank: raised before the update would apply
    them (the loss before its backward, the gradients before the optimiser's step), so that the weights and
    every checkpoint saved so far stay finite."""

    def __init__(self, step: int, what: str, loss: float):
        super().__init__(f"at step {step} {what}")
        self.step, self.what, self.loss = step, what, loss


class LMModule(L.LightningModule):
    # FLOPs of a training batch (training_flops), which Lightning's ThroughputMonitor turns into FLOP/s and MFU
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: dict,
        optim: dict | None = None,
        max_steps: int = 1000,
        activation_checkpointing: bool = False,
        compile: bool = False,
        init_seed: int | None = None,
    ):
        """``init_seed``: initialise each module from its own seed (``CausalLM.init_weights``), so runs of
        different architectures at one seed start from the same weights wherever their modules coincide; None:
        torch's global generator, as it stands."""
        super().__init__()
        self.save_hyperparameters()
        config = ModelConfig.from_dict(model)
        if init_seed is None:
            self.model: CausalLM = build_model(config)
        else:  # built without weights, then drawn once from the modules' own seeds
            with torch.device("meta"):
                self.model = build_model(config)
            self.model.to_empty(device="cpu")
            self.model.init_weights(init_seed)
        self.optim = OptimConfig(**(optim or {}))
        self.optim.validate()
        self.max_steps = max_steps
        if self.optim.warmup_steps is None:
            self.optim.warmup_steps = max_steps // 10
        self.model.activation_checkpointing = activation_checkpointing
        self.model.compile_blocks = "inductor" if compile else None
        self._t_last: float | None = None
        self._last_loss = math.nan  # the last training step's loss, for a report of its gradients
        self.initial_val_loss: float | None = None  # the run's first validation, before any step
        self._teacher: CausalLM | None = None  # set_teacher: distillation instead of the labels
        if self.optim.trainable is not None:
            self._freeze_all_but(list(self.optim.trainable))

    def _freeze_all_but(self, fragments: list[str]) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        for name, p in self.model.named_parameters():
            p.requires_grad_(any(f in name for f in fragments))
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"optim.trainable={fragments} matches no parameter of the model (its names are like "
                             f"{', '.join(names[:3])}, ...)")  # fmt: skip

    def set_teacher(self, teacher: CausalLM) -> None:
        """Train on the KL divergence from ``teacher``'s next-token distributions (knowledge distillation) rather
        than on the labels. The teacher is frozen and held outside the module: not saved in checkpoints, not
        optimised; a resumed run sets it again."""
        teacher.eval().requires_grad_(False)
        self.__dict__["_teacher"] = teacher  # not a submodule

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy, which sets ``device_mesh``): FSDP2, each
        decoder block sharded over the data-parallel processes, then the rest (embeddings, head) at the root.
        Other strategies leave the model as it is."""
        mesh = self.device_mesh
        if mesh is None or getattr(self.model, "_kvlab_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for block in self.model.layers:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])
        self.model._kvlab_sharded = True

    def on_fit_start(self) -> None:
        if self._teacher is not None:
            self._teacher.to(self.device)

    def forward(self, input_ids, doc_ids=None, context=None):
        return self.model(input_ids, doc_ids=doc_ids, context=context)

    def _loss(self, labels, logits) -> torch.Tensor:
        """Cross-entropy over the labelled positions (-100: none, as MQAR's unasked ones)."""
        return F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten())

    @staticmethod
    def _inputs(model: CausalLM, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input_ids, labels, context) for ``model``. A row's context (``data.context``) goes to a model's
        context encoder; a model without one reads it in its prompt, scored on the continuation only, so both
        are scored on the same tokens."""
        ids, labels, context = batch["input_ids"], batch["labels"], batch.get("context")
        if context is not None and model.config.context is None:
            ids = torch.cat([context, ids], dim=1)
            labels = torch.cat([labels.new_full(context.shape, -100), labels], dim=1)
            context = None
        return ids, labels, context

    def training_step(self, batch, batch_idx):
        ids, labels, context = self._inputs(self.model, batch)
        if self._teacher is not None:
            logits = self.model(ids, doc_ids=batch.get("doc_ids"), context=context)
            with torch.no_grad():
                t_ids, _, t_context = self._inputs(self._teacher, batch)
                target = self._teacher(t_ids, doc_ids=batch.get("doc_ids"), context=t_context)
            # the continuation's positions (the last ones, whether or not a context stands in front)
            n = min(logits.shape[1], target.shape[1])
            loss = distillation_loss(logits[:, -n:], target[:, -n:], labels[:, -n:])
            self.log("train_lm_loss", self._loss(labels, logits.detach()))
        else:  # the model computes the loss itself: the fused head + cross-entropy never holds all the logits
            loss = self.model(ids, doc_ids=batch.get("doc_ids"), labels=labels, context=context)
        aux = self.model.aux_loss()
        if aux is not None:  # MoE load balancing, weighted by its coefficient: trained with, logged apart
            if self._teacher is None:
                self.log("train_lm_loss", loss.detach())
            self.log("train_aux_loss", aux.detach())
            loss = loss + aux
        # Every rank decides alike (one of them seeing nan is enough): a nan update would spread to every
        # weight, and the run would go on to its last step and save its checkpoints over the good ones.
        self._last_loss = float(loss.detach())
        if not self.trainer.strategy.reduce_boolean_decision(math.isfinite(self._last_loss), all=True):
            step = self.trainer.global_step + 1
            raise TrainingDiverged(step, f"the training loss was {self._last_loss}", self._last_loss)
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        self.log("train_loss", loss, prog_bar=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        now = time.perf_counter()
        if self._t_last is not None:
            # tokens/s since the previous batch (all ranks), shown in the progress bar
            self.log("tokens_per_s", tokens / max(now - self._t_last, 1e-9), prog_bar=True)
        self._t_last = now
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what a run resumed from it reports of the training before (a run resumed at its last step trains none)
        checkpoint["kvlab_run"] = {"initial_val_loss": self.initial_val_loss, "train_loss": self._last_loss}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("kvlab_run", {})  # none in checkpoints from before it was kept
        self.initial_val_loss = saved.get("initial_val_loss")
        self._last_loss = saved.get("train_loss", math.nan)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give gradients that are not (an overflow in the backward): stop before the
        step applies them. fp16's gradient scaler skips such a step itself, and is left to it; gradients a
        strategy keeps outside the parameters (DeepSpeed's) are not seen here, the loss's check still is."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        finite = bool(torch.stack(torch._foreach_norm(grads)).isfinite().all()) if grads else True
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            step, loss = self.trainer.global_step + 1, self._last_loss
            raise TrainingDiverged(step, f"the gradients were not finite (the loss {loss:.4g})", loss)

    def on_after_backward(self) -> None:
        # DeepSeek-V3's balancing biases follow the batch's load on every rank alike (under gradient
        # accumulation, each micro-batch's; README "Mixture of experts"), and MixCon's gains their online update.
        # Here rather than at the batch's end: Lightning runs the callbacks' on_train_batch_end (the checkpoint's
        # save among them) before the module's, and a checkpoint without its last batch's update would not resume
        # where the run stopped.
        self.model.after_training_batch(reduce=lambda t: self.trainer.strategy.reduce(upcast(t), reduce_op="sum"))

    def on_validation_epoch_end(self) -> None:
        self._t_last = None  # validation time is not training throughput

    def validation_step(self, batch, batch_idx):
        ids, labels, context = self._inputs(self.model, batch)
        logits = self(ids, batch.get("doc_ids"), context)
        self.log("val_loss", self._loss(labels, logits), prog_bar=True, sync_dist=True)
        if batch.get("context") is not None:  # the same continuations without their context: is it used?
            alone = self._loss(batch["labels"], self(batch["input_ids"]))
            self.log("val_loss_without_context", alone, sync_dist=True)
        # next-token accuracy over the labelled positions (for MQAR: recall accuracy)
        asked = labels != -100
        correct = (logits.argmax(-1) == labels) & asked
        self.log("val_accuracy", correct.sum() / asked.sum().clamp(min=1), sync_dist=True)
        # Zoology's slices: tokens that complete a bigram seen earlier in the row (recall can predict
        # them) and the rest; averaged per token over the whole validation set
        ce = F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), reduction="none").view_as(labels)
        hits = associative_recall_hits(ids, labels) & asked
        for name, mask in (("val_loss_ar_hit", hits), ("val_loss_ar_other", asked & ~hits)):
            n = int(mask.sum())
            if n:
                self.log(name, (ce * mask).sum() / n, batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:  # by the parameter's own shape: ZeRO-3 has flattened its partitions (ds_shape);
                # biases never, stacked per expert too (gpt-oss's experts' biases are [experts, width])
                matrix = len(getattr(p, "ds_shape", p.shape)) >= 2 and not name.endswith("bias")
                (decay if matrix else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # Fused AdamW, one kernel over every tensor (transformers' Trainer default since torch 2.8): the gqa
        # preset's optimizer step took 2.4 ms against 14.3 for the per-tensor loop on a 2-core CPU. Not under a
        # gradient scaler (16-mixed): a fused step unscales the gradients itself, after clipping would have seen
        # them scaled, so there the per-tensor form lets the scaler unscale first.
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        fused = (scaler is None and all(p.device.type in ("cpu", "cuda") for p in decay + no_decay)) or None
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps,
                                fused=fused)  # fmt: skip
        if fused:
            # The flag says "my step unscales what a GradScaler scaled"; only a GradScaler reads it, and Lightning,
            # which then refuses to clip gradients (bf16-mixed with trainer.gradient_clip_val failed at its first
            # step). With no scaler nothing is scaled: clipping before the fused step is exact.
            opt._step_supports_amp_scaling = False
        sched = WarmupCosine(opt, self.optim.lr, self.optim.warmup_steps, self.max_steps, self.optim.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """``lr * lr_factor(step)`` for every parameter group.

    Not ``LambdaLR``: that keeps one base lr per group it saw at construction,
    and DeepSpeed ZeRO-3 regroups the parameters it partitions (a rank whose
    shard holds no bias or norm weight has one group fewer); all groups share
    one lr here, so the number of groups may change.
    """

    def __init__(self, optimizer, lr: float, warmup: int, total: int, min_ratio: float):
        self.lr, self.warmup, self.total, self.min_ratio = lr, warmup, total, min_ratio
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        value = self.lr * lr_factor(self.last_epoch, self.warmup, self.total, self.min_ratio)
        return [value] * len(self.optimizer.param_groups)
