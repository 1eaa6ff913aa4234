"""Token embedding and the LM head that may share its matrix. Caller: language models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from engine.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, H]
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """hidden -> logits over the vocabulary. With tied embeddings it holds the embedding's own
    Parameter, so `named_parameters()` lists the matrix once (under the embedding's name)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_embedding: VocabEmbedding | None = None):
        super().__init__()
        if tied_embedding is not None:
            self.weight = tied_embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    batch_invariant = False   # see engine.layers.linear.set_batch_invariant

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, vocab]
        if self.batch_invariant:
            return kernels.batch_invariant_linear(hidden, self.weight)
        return F.linear(hidden, self.weight)
