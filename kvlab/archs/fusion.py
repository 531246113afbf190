"""DHA's adaptive heads fusion (Chen et al. 2024, "DHA: Learning Decoupled-Head Attention from Transformer
Checkpoints via Adaptive Heads Fusion"): the K (V) heads of a cluster of a parent's heads become one head, a
learned linear combination of them, so the parent's knowledge is kept rather than averaged away.

The paper's stages, as ``kvlab.archs.convert`` runs them for ``{to: dha, method: fusion}``:

1. search: per layer, key heads and value heads are clustered apart (average linkage on the similarity of
   their keys, or values, on calibration tokens); with ``adaptive: true`` the number of clusters of each layer
   is chosen under the total budget by what each count would lose at the start of fusion, the spread of the
   heads' outputs around their clusters' means (``fusion_cost``, ``grouping.allocate_heads``), so redundant
   layers give up more heads;
2. fusion (``fuse_heads``): head ``i`` of cluster ``c`` of projection ``p`` (key or value, weight rows and
   bias) is replaced by ``W~_i = sum_{j in c} w_ij W_j`` with the fusion operator ``w = I`` at the start (the
   parent exactly). The operators train on the language-model loss plus the fusion loss, the heads' spread
   within their clusters relative to the projection's size,

       L_f = mean over (layer, p) of  sum_c sum_{i in c} ||W~_i - mean_{j in c} W~_j||^2 / sum_i ||W_i||^2,

   under an augmented Lagrangian ``L = L_LM + l1 L_f + l2 L_f^2`` whose multipliers ``l1, l2`` (from 0) rise by
   gradient ascent (``l += lambda_lr * dL/dl``), so the heads of a cluster are driven together while the LM
   loss decides what they become;
3. merge (``HeadFusion.merged``): each cluster's head is the mean of its fused heads (each one of them exactly,
   once ``L_f = 0``); with ``w = I`` that is mean-pooling. Continued pretraining is the uptraining recipe's.

Only the operators train during fusion (the parent is frozen); see the README for where this follows the
paper's description rather than its text.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from kvlab.archs.grouping import Grouping

log = logging.getLogger(__name__)

Key = tuple[int, str]  # (layer, "k_proj" | "v_proj")


def head_rows(linear: nn.Linear, n_heads: int) -> torch.Tensor:
    """[H, head_dim * (d_in + 1 if bias)] a projection's rows per head, weight and bias, flattened."""
    rows = linear.weight.reshape(n_heads, -1, linear.weight.shape[-1])
    if linear.bias is not None:
        rows = torch.cat([rows, linear.bias.reshape(n_heads, -1, 1)], dim=-1)
    return rows.reshape(n_heads, -1)


def fusion_cost(features: torch.Tensor, clusters: Grouping) -> float:
    """How much fusing ``clusters`` into one head each loses at the start of fusion (mean-pooling): the heads'
    spread around their clusters' means, relative to their size, in ``features`` ([H, n], each head's
    outputs on calibration tokens, or its weights)."""
    features = features.detach().double()
    return float(_spread([features[c] for c in clusters]) / (features**2).sum())


def _spread(clusters: list[torch.Tensor]) -> torch.Tensor:
    """Summed squared distance of the rows of each ``[members, n]`` tensor from their mean."""
    return sum(((rows - rows.mean(dim=0)) ** 2).sum() for rows in clusters)


class HeadFusion(nn.Module):
    """The fusion operators of every clustered projection of ``model`` (whose weights it reads, never
    changes): one ``[|c|, |c|]`` matrix per cluster of two or more heads, the identity at the start."""

    def __init__(self, model: nn.Module, clusters: dict[Key, Grouping]):
        super().__init__()
        self.__dict__["model"] = model  # read, not owned: not a submodule (nor its parameters these ones)
        self.clusters = clusters
        self.operators = nn.ParameterDict()
        for (layer, proj), groups in clusters.items():
            for c, members in enumerate(groups):
                if len(members) > 1:
                    self.operators[f"{layer}_{proj}_{c}"] = nn.Parameter(torch.eye(len(members)))

    def _linear(self, layer: int, proj: str) -> tuple[nn.Linear, int]:
        mixer = self.model.layers[layer].mixer
        return getattr(mixer, proj), mixer.n_kv_heads

    def fused_rows(self) -> dict[Key, list[torch.Tensor]]:
        """Per projection, per cluster, the fused heads' rows ``[|c|, row]`` (``w @ W_c``)."""
        fused = {}
        for (layer, proj), groups in self.clusters.items():
            rows = head_rows(*self._linear(layer, proj))
            fused[layer, proj] = [
                self.operators[f"{layer}_{proj}_{c}"].to(rows.dtype) @ rows[members] if len(members) > 1
                else rows[members]
                for c, members in enumerate(groups)
            ]  # fmt: skip
        return fused

    def fusion_loss(self, fused: dict[Key, list[torch.Tensor]]) -> torch.Tensor:
        losses = []
        for (layer, proj), per_cluster in fused.items():
            size = (head_rows(*self._linear(layer, proj)) ** 2).sum()
            losses.append(_spread(per_cluster) / size)
        return torch.stack(losses).mean()

    def _as_state(self, rows_of: dict[Key, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-head rows ``[n, row]`` of each projection -> its ``weight`` (and ``bias``) tensors by name."""
        state = {}
        for (layer, proj), rows in rows_of.items():
            linear, _ = self._linear(layer, proj)
            d_in = linear.weight.shape[-1]
            heads = rows.reshape(rows.shape[0], -1, d_in + (linear.bias is not None))
            prefix = f"layers.{layer}.mixer.{proj}"
            state[f"{prefix}.weight"] = heads[..., :d_in].reshape(-1, d_in)
            if linear.bias is not None:
                state[f"{prefix}.bias"] = heads[..., d_in].reshape(-1)
        return state

    def fused_parameters(self, fused: dict[Key, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The parent's projections with every head replaced by its fused version (for ``functional_call``)."""
        rows_of = {}
        for key, per_cluster in fused.items():
            order = torch.tensor([h for members in self.clusters[key] for h in members])
            rows_of[key] = torch.cat(per_cluster)[torch.argsort(order)]
        return self._as_state(rows_of)

    @torch.no_grad()
    def merged(self) -> dict[str, torch.Tensor]:
        """The converted projections: one head per cluster, the mean of its fused heads."""
        fused = self.fused_rows()
        return self._as_state({key: torch.stack([f.mean(dim=0) for f in per]) for key, per in fused.items()})


def fuse_heads(
    model: nn.Module,
    clusters: dict[Key, Grouping],
    calibration: torch.Tensor,
    steps: int,
    lr: float,
    lambda_lr: float,
    batch: int,
) -> tuple[HeadFusion, list[dict[str, float]]]:
    """Stage 2: the fusion operators trained for ``steps`` steps (Adam, ``lr``) on batches of ``batch`` rows of
    ``calibration`` ([rows, T] token ids), in turn; returns them and each step's losses and multipliers (then
    the fusion loss after the last step)."""
    from tqdm.auto import tqdm

    parent = copy.deepcopy(model).train().requires_grad_(False)  # the caller's model is left as it was
    fusion = HeadFusion(parent, clusters)
    optimizer = torch.optim.Adam(fusion.operators.parameters(), lr=lr)
    ids = calibration.to(parent.embed_tokens.weight.device)
    lambdas = [0.0, 0.0]
    history = []
    for step in tqdm(range(steps), desc="DHA fusion", disable=None):
        rows = ids[(torch.arange(batch) + step * batch) % ids.shape[0]]
        fused = fusion.fused_rows()
        lm = torch.func.functional_call(parent, fusion.fused_parameters(fused), (rows[:, :-1],),
                                        {"labels": rows[:, 1:]})  # fmt: skip
        lf = fusion.fusion_loss(fused)
        loss = lm + lambdas[0] * lf + lambdas[1] * lf**2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"lm_loss": lm.item(), "fusion_loss": lf.item(), "lambda1": lambdas[0], "lambda2": lambdas[1]})
        lambdas = [lambdas[0] + lambda_lr * lf.item(), lambdas[1] + lambda_lr * lf.item() ** 2]  # ascent on L
    with torch.no_grad():
        final = fusion.fusion_loss(fusion.fused_rows()).item()
    history.append({"fusion_loss": final, "lambda1": lambdas[0], "lambda2": lambdas[1]})  # after the last step
    if steps:
        log.info("DHA fusion: LM loss %.4f -> %.4f, fusion loss %.4g -> %.4g over %d steps",
                 history[0]["lm_loss"], history[-2]["lm_loss"], history[0]["fusion_loss"],
                 final, steps)  # fmt: skip
    return fusion, history
