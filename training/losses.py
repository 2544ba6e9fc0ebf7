"""The training losses: InfoNCE with the sampling-bias (logQ) correction, inside a Matryoshka sum.

In-batch negatives are other examples' positives, so an item turns up as a negative in proportion to
how often it is engaged; plain InfoNCE then learns to push popular items down. Yi et al. (RecSys
2019) subtract log q(item), the item's sampling probability, from every in-batch logit (the
positive's included), which turns the batch softmax back into an estimate of the full softmax.
Hard negatives are not sampled by popularity and keep their raw logits.

The loss comes in two forms with the same value and gradients: the plain one holds every text's
activations for the backward pass; the gradient-cached one (GradCache, Gao et al. 2021, through
sentence-transformers' ``CachedLossMixin``) embeds in mini-batches and holds one mini-batch's, so
the batch, and with it the number of in-batch negatives, is no longer bounded by memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer, util
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from sentence_transformers.util import all_gather, all_gather_with_grad, is_dist_initialized
from torch import Tensor, nn


def logq_infonce(queries: Tensor, docs: list[Tensor], logq: Tensor, *, scale: float,
                 similarity: Callable[[Tensor, Tensor], Tensor], gather: bool) -> Tensor:
    """Cross-entropy of each query over every positive in the batch (logQ-corrected) and every hard
    negative (raw); ``docs`` is [positives, negatives_1, ...] and ``logq`` each positive's log q."""
    logq = logq.to(device=queries.device, dtype=torch.float32).reshape(-1)
    batch_size, offset = queries.size(0), 0
    if gather and is_dist_initialized():
        queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(d) for d in docs]
        logq = all_gather(logq)
        offset = torch.distributed.get_rank() * batch_size
    local = torch.arange(offset, offset + batch_size, device=queries.device)
    scores = similarity(queries[local], torch.cat(docs, dim=0)).float() * scale
    in_batch = docs[0].size(0)
    scores[:, :in_batch] = scores[:, :in_batch] - logq[None, :]
    return F.cross_entropy(scores, local)


class LogQRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss (anchor, positive, negative_1..k) whose labels are each row's
    log q(positive); a label of 0 for every row gives plain InfoNCE."""

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        return logq_infonce(embeddings[0], embeddings[1:], labels, scale=self.scale,
                            similarity=self.similarity_fct, gather=self.gather_across_devices)


class CachedLogQRankingLoss(CachedLossMixin, nn.Module):
    """``LogQRankingLoss`` with gradient caching: the same loss, computed on embeddings made
    ``mini_batch_size`` texts at a time, so memory follows the mini-batch and not the batch."""

    def __init__(self, model: SentenceTransformer, scale: float = 20.0, mini_batch_size: int = 32,
                 gather_across_devices: bool = False) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.similarity_fct = util.cos_sim
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = gather_across_devices

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        columns = [torch.cat(mini_batches) for mini_batches in reps]
        loss = logq_infonce(columns[0], columns[1:], labels, scale=self.scale, similarity=self.similarity_fct,
                            gather=self.gather_across_devices)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.forward_cached(sentence_features, labels)


class SentenceOnlyMatryoshkaLoss(MatryoshkaLoss):
    """MatryoshkaLoss that drops the token states from the model output before truncating.

    sentence-transformers truncates the token states to each width too, which fails when a
    projection makes the tower wider than its hidden size (MiniLM: 384 -> 512); InfoNCE needs only
    the sentence embedding.
    """

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if self.uses_gradient_cache:
            return super().forward(sentence_features, labels)
        original = self.model.forward

        def sentence_only(features):
            out = original(features)
            out.pop("token_embeddings", None)
            return out

        self.model.forward = sentence_only
        try:
            return super().forward(sentence_features, labels)
        finally:
            self.model.forward = original
