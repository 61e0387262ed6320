"""The shared fusion head: predicts the label from the embeddings of whichever modalities are present.

Three fusion levels, selectable by name:

- ``attention`` (default, intermediate fusion): each present modality becomes a token (a
  per-modality projection whose bias acts as a learned modality-type embedding); masked
  attention pooling over the present tokens; an MLP classifier.
- ``concat`` (intermediate fusion): masked concatenation of the embeddings followed by an MLP.
  The first layer is written as a sum of per-modality linear maps, which is the same function
  as one linear map over the zero-filled concatenation, split into per-modality blocks.
- ``late`` (decision-level fusion): one classifier per modality; the logits of the present
  modalities are averaged.

Parameters live in two kinds of block so that the server can average each block over the
clients that trained it: ``core.*`` (every client) and ``blocks.<modality>.*`` (only clients that
hold that modality). A client builds the head with its own modalities; the server with all.
Absent modalities never influence the output: their tokens are replaced by zeros and given zero
attention weight, whatever the encoder produced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FUSIONS = ("attention", "concat", "late")


def _masked(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the embeddings of absent modalities. emb: (B, M, D), mask: (B, M) bool."""
    return torch.where(mask.unsqueeze(-1), emb, torch.zeros((), dtype=emb.dtype))


class FusionHead(nn.Module):
    """Base class: ``forward(emb (B, M, D), mask (B, M) bool) -> logits (B, K)``."""

    def __init__(self, modalities: Sequence[str]):
        super().__init__()
        if not modalities:
            raise ValueError("a fusion head needs at least one modality")
        self.modalities = tuple(modalities)


class AttentionFusion(FusionHead):
    """Modality tokens + masked attention pooling + MLP classifier."""

    def __init__(self, modalities: Sequence[str], embed_dim: int, num_classes: int, hidden_dim: int):
        super().__init__(modalities)
        self.blocks = nn.ModuleDict({m: nn.ModuleDict({"token": nn.Linear(embed_dim, embed_dim)}) for m in modalities})
        self.core = nn.ModuleDict(
            {
                "norm": nn.LayerNorm(embed_dim),
                "score_hidden": nn.Linear(embed_dim, hidden_dim),
                "score": nn.Linear(hidden_dim, 1),
                "classifier_hidden": nn.Linear(embed_dim, hidden_dim),
                "classifier": nn.Linear(hidden_dim, num_classes),
            }
        )
        self.act = nn.GELU()

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens, weights = self._attend(emb, mask)
        pooled = (weights.unsqueeze(-1) * tokens).sum(dim=1)  # (B, D)
        return self.core["classifier"](self.act(self.core["classifier_hidden"](pooled)))  # (B, K)

    def attention(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooling weight of each modality (B, M): zero where absent, summing to 1 over the present ones."""
        return self._attend(emb, mask)[1]

    def _attend(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.core
        tokens = torch.stack([self.blocks[m]["token"](emb[:, i]) for i, m in enumerate(self.modalities)], dim=1)
        tokens = _masked(c["norm"](tokens), mask)  # (B, M, D)
        scores = c["score"](torch.tanh(c["score_hidden"](tokens))).squeeze(-1)  # (B, M)
        scores = scores.masked_fill(~mask, float("-inf"))
        return tokens, torch.softmax(scores, dim=1)  # (B, M, D), (B, M) zero on absent modalities


class ConcatFusion(FusionHead):
    """Masked concatenation + MLP, as a sum of per-modality first-layer blocks."""

    def __init__(self, modalities: Sequence[str], embed_dim: int, num_classes: int, hidden_dim: int):
        super().__init__(modalities)
        self.blocks = nn.ModuleDict({m: nn.ModuleDict({"fc": nn.Linear(embed_dim, hidden_dim)}) for m in modalities})
        self.core = nn.ModuleDict({"norm": nn.LayerNorm(hidden_dim), "classifier": nn.Linear(hidden_dim, num_classes)})
        self.act = nn.GELU()

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([self.blocks[m]["fc"](emb[:, i]) for i, m in enumerate(self.modalities)], dim=1)
        h = _masked(parts, mask).sum(dim=1)  # (B, H): W [m_1 e_1; ...; m_M e_M] + present biases
        return self.core["classifier"](self.act(self.core["norm"](h)))  # (B, K)


class LateFusion(FusionHead):
    """One classifier per modality; the mean of the present modalities' logits."""

    def __init__(self, modalities: Sequence[str], embed_dim: int, num_classes: int, hidden_dim: int):
        super().__init__(modalities)
        self.blocks = nn.ModuleDict(
            {
                m: nn.ModuleDict({"hidden": nn.Linear(embed_dim, hidden_dim), "classifier": nn.Linear(hidden_dim, num_classes)})
                for m in modalities
            }
        )
        self.core = nn.ModuleDict()  # nothing shared by all clients beyond the per-modality blocks
        self.act = nn.GELU()

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = torch.stack(
            [self.blocks[m]["classifier"](self.act(self.blocks[m]["hidden"](emb[:, i]))) for i, m in enumerate(self.modalities)],
            dim=1,
        )  # (B, M, K)
        logits = _masked(logits, mask)
        present = mask.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)  # (B, 1)
        return logits.sum(dim=1) / present  # (B, K)


_HEADS = {"attention": AttentionFusion, "concat": ConcatFusion, "late": LateFusion}


def build_head(fusion: str, modalities: Sequence[str], *, embed_dim: int, num_classes: int, hidden_dim: int) -> FusionHead:
    """A fusion head of type ``fusion`` over ``modalities`` (in that order)."""
    if fusion not in _HEADS:
        raise ValueError(f"unknown fusion '{fusion}'; choose one of {list(FUSIONS)}")
    return _HEADS[fusion](modalities, embed_dim, num_classes, hidden_dim)


def block_of(key: str) -> str | None:
    """The modality a head parameter belongs to (``blocks.<m>.*``), or None for ``core.*``."""
    parts = key.split(".")
    return parts[1] if parts[0] == "blocks" else None
