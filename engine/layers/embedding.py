"""Token embedding and the LM head that may share its matrix. Caller: language models.

Vocabulary parallelism (tp_size > 1): the vocabulary is padded to a multiple of tp_size and rank r
holds rows [r*V', (r+1)*V') of the matrix (V' = ceil(V / tp); padding rows are zeros). The
embedding looks up the ids in its range, zeroes the others and all-reduces; the head computes its
slice of the logits and all-gathers them, cutting the padding off, so every rank gets [T, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vlserve_kernels as kernels

from engine.distributed.parallel_context import SINGLE_RANK, ParallelContext
from engine.layers.linear import default_weight_loader


def _vocab_weight(vocab_size: int, hidden_size: int, parallel: ParallelContext) -> nn.Parameter:
    """This rank's [ceil(V / tp), H] rows; the loader cuts them from the checkpoint's [V, H]."""
    num_rows = -(-vocab_size // parallel.tp_size)
    first, last = parallel.tp_rank * num_rows, min((parallel.tp_rank + 1) * num_rows, vocab_size)
    weight = nn.Parameter(torch.empty(num_rows, hidden_size), requires_grad=False)
    if parallel.tp_size == 1:
        weight.weight_loader = default_weight_loader
        return weight

    def load_rows(param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if tuple(loaded_weight.shape) != (vocab_size, hidden_size):
            raise ValueError(f"shape mismatch: vocabulary matrix ({vocab_size}, {hidden_size}) vs "
                             f"checkpoint {tuple(loaded_weight.shape)}")
        param.data[:last - first].copy_(loaded_weight[first:last])
        param.data[last - first:].zero_()

    weight.weight_loader = load_rows
    return weight


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.parallel = parallel
        self.weight = _vocab_weight(vocab_size, hidden_size, parallel)
        self.first_id = parallel.tp_rank * self.weight.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.first_id                                   # [T]
        elsewhere = (local_ids < 0) | (local_ids >= self.weight.shape[0])      # [T] held by another rank
        embeds = F.embedding(local_ids.masked_fill(elsewhere, 0), self.weight)  # [T, H]
        return self.parallel.all_reduce(embeds.masked_fill(elsewhere[:, None], 0.0))


class LMHead(nn.Module):
    """hidden -> logits over the vocabulary. With tied embeddings it holds the embedding's own
    Parameter, so `named_parameters()` lists the matrix once (under the embedding's name)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_embedding: VocabEmbedding | None = None,
                 parallel: ParallelContext = SINGLE_RANK):
        super().__init__()
        self.vocab_size, self.parallel = vocab_size, parallel
        if tied_embedding is not None:
            self.weight = tied_embedding.weight
        else:
            self.weight = _vocab_weight(vocab_size, hidden_size, parallel)

    batch_invariant = False   # see engine.layers.linear.set_batch_invariant

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        if self.batch_invariant:
            logits = kernels.batch_invariant_linear(hidden, self.weight)
        else:
            logits = F.linear(hidden, self.weight)                  # [T, V / tp]
        if self.parallel.tp_size == 1:
            return logits
        return self.parallel.all_gather(logits, dim=-1)[:, :self.vocab_size]   # [T, V]
