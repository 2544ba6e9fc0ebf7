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

from typing import Iterable

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import CachedLossMixin
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from sentence_transformers.util import all_gather, all_gather_with_grad, is_dist_initialized
from torch import Tensor, nn


class LogQRankingLoss(MultipleNegativesRankingLoss):
    """MultipleNegativesRankingLoss (anchor, positive, negative_1..k) whose labels are each row's
    log q(positive); a label of 0 for every row gives plain InfoNCE."""

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        queries, docs = embeddings[0], embeddings[1:]
        logq = labels.to(device=queries.device, dtype=torch.float32).reshape(-1)
        batch_size, offset = queries.size(0), 0
        if self.gather_across_devices and is_dist_initialized():
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(d) for d in docs]
            logq = all_gather(logq)
            offset = torch.distributed.get_rank() * batch_size
        local = torch.arange(offset, offset + batch_size, device=queries.device)
        scores = self.similarity_fct(queries[local], torch.cat(docs, dim=0)).float() * self.scale
        in_batch = docs[0].size(0)
        scores[:, :in_batch] = scores[:, :in_batch] - logq[None, :]
        return F.cross_entropy(scores, local)


class CachedLogQRankingLoss(CachedLossMixin, nn.Module):
    """``loss`` with gradient caching: its own computation, on embeddings made ``mini_batch_size``
    texts at a time, so memory follows the mini-batch and not the batch (as sentence-transformers'
    CachedMultipleNegativesRankingLoss wraps MultipleNegativesRankingLoss)."""

    def __init__(self, loss: LogQRankingLoss, mini_batch_size: int = 32) -> None:
        super().__init__()
        self.model = loss.model
        self.loss = loss
        self.mini_batch_size = mini_batch_size

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        loss = self.loss.compute_loss_from_embeddings([torch.cat(mini_batches) for mini_batches in reps], labels)
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
