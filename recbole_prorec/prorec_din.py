"""PRORec Stage I: DIN-style next-item model with modality adaptation and cross-modality alignment.

Loss = L_NIP + lambda * L_CKA (paper eq. 5). L_NIP is a softmax over the target and ``neg_samples``
uniformly drawn items shared by the batch (``neg_samples: 0`` for a softmax over all items).
L_CKA is InfoNCE between each batch item's collaborative (ID) embedding and its adapted
semantic embedding MAL(e^s), with the other items of the batch as negatives (eq. 3).
After training, the ID embeddings, which absorbed the semantic knowledge through CKA, are the
"integrated embeddings" that Stage I quantizes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_prorec.semantic import item_semantic_embeddings


class ModalityAdaptation(nn.Module):
    """MAL (eq. 2): ê^s = LN(W e^s + b) * (1 + gamma(e^s)) + beta(e^s).

    LN has no affine parameters of its own; gamma and beta are regressed from the input semantic
    embedding (AdaLN as in DiT) and start at zero, so the layer starts as a plain normalised
    projection and learns per-item scale and shift.
    """

    def __init__(self, semantic_size: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(semantic_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.modulation = nn.Linear(semantic_size, 2 * hidden_size)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, semantic: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.modulation(semantic).chunk(2, dim=-1)
        return self.norm(self.proj(semantic)) * (1 + gamma) + beta


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean InfoNCE of row i of ``anchor`` against row i of ``positive``, other rows as negatives."""
    logits = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T / tau
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


class DINActivationUnit(nn.Module):
    """DIN's activation unit: MLP([h, t, h - t, h * t]) -> weight of history item h for target t.

    The first layer is applied in its factored form W1 h + W2 t + W3 (h - t) + W4 (h * t), with the
    product term computed as t @ (h[..., None] * W4): the same function as the concatenation, but
    without materialising [users, candidates, history, 4d] inputs, which is what makes scoring
    many candidates per user affordable.
    """

    def __init__(self, hidden_size: int, layers: list[int]):
        super().__init__()
        first, *rest = layers
        self.hist = nn.Linear(hidden_size, first)
        self.target = nn.Linear(hidden_size, first, bias=False)
        self.product = nn.Parameter(torch.empty(hidden_size, first))
        nn.init.xavier_uniform_(self.product)
        dims = [first, *rest]
        self.mlp = nn.Sequential(
            nn.PReLU(),
            *[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.PReLU())],
            nn.Linear(dims[-1], 1),
        )

    def forward(self, history: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """history [B, L, d], mask [B, L], candidates [B, C, d] or [C, d] -> user vectors [B, C, d]."""
        B, L, _ = history.shape
        if candidates.dim() == 2:
            cross = torch.einsum("cd,bldh->bclh", candidates, history.unsqueeze(-1) * self.product)
            cand_term = self.target(candidates)[None, :, None, :]
        else:
            cross = torch.einsum("bcd,bldh->bclh", candidates, history.unsqueeze(-1) * self.product)
            cand_term = self.target(candidates)[:, :, None, :]
        hidden = cross + self.hist(history)[:, None] + cand_term
        weights = self.mlp(hidden).squeeze(-1)  # [B, C, L]
        weights = weights.masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)
        return torch.einsum("bcl,bld->bcd", weights, history)


class PRORecDIN(SequentialRecommender):
    """Stage I of PRORec: DIN + modality adaptation layer + cross-modality knowledge alignment."""

    input_type = InputType.POINTWISE
    loss_names = ("nip", "cka")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.hidden_size = config["din_embedding_size"]
        self.neg_samples = config["din_neg_samples"]
        self.cka_weight = config["cka_weight"]
        self.cka_tau = config["cka_tau"]
        self.full_sort_chunk = config["din_full_sort_chunk"]
        if self.cka_tau is None or self.cka_tau <= 0:
            raise ValueError(f"cka_tau must be > 0, got {self.cka_tau}")
        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        # the attention output is a convex mix of history items, blind to how often an item is
        # bought at all; a per-item bias carries that popularity signal
        self.item_bias = nn.Embedding(self.n_items, 1, padding_idx=0)
        self.attention = DINActivationUnit(self.hidden_size, list(config["din_attention_layers"]))
        self.dropout = nn.Dropout(config["din_dropout"])
        semantic = torch.as_tensor(load_semantic(config, dataset), dtype=torch.float32)
        self.register_buffer("semantic", semantic, persistent=False)
        self.mal = ModalityAdaptation(semantic.shape[1], self.hidden_size)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.zeros_(self.item_bias.weight)

    def user_vectors(self, interaction, candidates: torch.Tensor) -> torch.Tensor:
        history = self.dropout(self.item_embedding(interaction[self.ITEM_SEQ]))
        mask = interaction[self.ITEM_SEQ] != 0
        return self.attention(history, mask, candidates)

    def forward(self, interaction, candidate_ids: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of candidate items ([B, C] per user, or [C] shared by the batch)."""
        candidates = self.item_embedding(candidate_ids)
        users = self.user_vectors(interaction, candidates)
        if candidates.dim() == 2:
            candidates = candidates.unsqueeze(0)
        return (users * candidates).sum(-1) + self.item_bias(candidate_ids).squeeze(-1)

    def calculate_loss(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        target = interaction[self.POS_ITEM_ID]
        return self.next_item_loss(interaction, target), self.cka_weight * self.cka_loss(target)

    def next_item_loss(self, interaction, target: torch.Tensor) -> torch.Tensor:
        if not self.neg_samples:
            logits = self.forward(interaction, torch.arange(self.n_items, device=target.device))
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, target)
        negatives = torch.randint(1, self.n_items, (self.neg_samples,), device=target.device)
        candidates = torch.cat([target[:, None], negatives.expand(len(target), -1)], dim=1)
        logits = self.forward(interaction, candidates)
        # a sampled negative equal to the target is not a negative
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives[None] == target[:, None], float("-inf"))
        return F.cross_entropy(logits, torch.zeros_like(target))

    def cka_loss(self, items: torch.Tensor) -> torch.Tensor:
        if not self.cka_weight:
            return torch.zeros((), device=items.device)
        items = items.unique()  # a repeated item would be its own negative
        return info_nce(self.item_embedding(items), self.mal(self.semantic[items]), self.cka_tau)

    def predict(self, interaction) -> torch.Tensor:
        return self.forward(interaction, interaction[self.ITEM_ID][:, None]).squeeze(1)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        """Exact DIN scores for every item, in chunks of items to bound memory."""
        items = torch.arange(self.n_items, device=interaction[self.ITEM_SEQ].device)
        return torch.cat([self.forward(interaction, chunk) for chunk in items.split(self.full_sort_chunk)], dim=1)

    def integrated_embeddings(self) -> np.ndarray:
        """Collaborative embeddings of the real items (row i = item id i + 1), after alignment."""
        return self.item_embedding.weight[1:].detach().cpu().numpy().astype(np.float32)


def load_semantic(config, dataset) -> np.ndarray:
    """Semantic embedding per internal item id; row 0 (padding) is zeros."""
    tokens = list(dataset.field2id_token[config["ITEM_ID_FIELD"]])
    emb = semantic_embeddings(config, Path(config["data_path"]) / f"{config['dataset']}.item", tokens[1:])
    return np.vstack([np.zeros((1, emb.shape[1]), dtype=np.float32), emb])


def semantic_embeddings(config, item_file: Path, tokens: list[str]) -> np.ndarray:
    """Embeddings [len(tokens), d] of the items' texts, as the config's semantic keys ask for them."""
    return item_semantic_embeddings(
        item_file,
        tokens,
        columns=list(config["text_columns"]),
        template=config["text_template"],
        encoder=config["semantic_encoder"],
        embedding_file=config["semantic_embedding_file"],
        pooling=config["semantic_pooling"],
        batch_size=config["semantic_batch_size"],
        max_length=config["semantic_max_length"],
        device=config["semantic_device"] or str(config["device"]),
        dtype=config["semantic_dtype"],
        cache_dir=Path(config["semantic_cache_dir"]) if config["semantic_cache_dir"] else None,
        id_field=config["ITEM_ID_FIELD"],
        show_progress=config["show_progress"],
    )
