"""Drop-in replacements for pytorch-metric-learning's NTXentLoss and SupConLoss: called as
loss_fn(embeddings, labels), cosine similarity, PML's default temperatures and reductions."""
from __future__ import annotations

import torch
from torch import nn

from ..contrastive import nt_xent, supcon_loss


class NTXentLoss(nn.Module):
    """PML NTXentLoss(temperature=0.07): one term per ordered positive pair, mean over pairs."""

    def __init__(self, temperature: float = 0.07, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nt_xent(embeddings, labels=labels, temperature=self.temperature, backend=self.backend)


class SupConLoss(nn.Module):
    """PML SupConLoss(temperature=0.1): anchors without positives are left out of the mean."""

    def __init__(self, temperature: float = 0.1, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supcon_loss(embeddings, labels, temperature=self.temperature, backend=self.backend)
