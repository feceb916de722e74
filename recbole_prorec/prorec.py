"""PRORec Stage II: Transformer encoder-decoder that generates the next item's unicode.

Loss = L_GR + mu * L_IKD (paper eq. 8). L_GR is the cross-entropy of each code token of the target
(eq. 6, summed over code positions, padding excluded), reported per level (``gen_l1``, ...).
L_IKD (eq. 7) contrasts the decoder's final state at a learnable [IKD] token appended after the
code tokens with the target's Stage-I integrated embedding (positive) and ``ikd_negatives`` other
items' embeddings (negatives).
Inference is a beam search constrained to real codes, ranking by the code log-likelihood with the
item level's logits softened by ``item_temperature`` and each item's free embedding weighted by how
often training saw the item (``item_id_shrinkage``); ``full_sort_predict`` returns the beam scores
of the decoded items and -inf elsewhere, so RecBole's own metrics apply unchanged.

``last_code_token`` chooses what the last code position of an item is. ``shared``: a level token
(the item's rank in its k-means leaf cluster) shared by every item with that rank, scored by one
K-way head per level. ``item``: a token of the item's own, as in EAGER, tied between the encoder
input, the decoder input and the output scores, where each step is a softmax over the children of
the generated prefix only (the items of the chosen cluster), so item identity has parameters of
its own instead of being memorised in the shared decoder weights.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_prorec.artifact import UNICODE_FIELD, load_codes, load_integrated
from recbole_prorec.decoding import CodeTrie, constrained_beam_search, scores_to_full


class Packed:
    """The real (non-padding) tokens of a [B, N] batch as rows [M, ...], and the way back.

    Per-token work (projections, feed-forward, norms, dropout) runs on the M real tokens only:
    histories average about 7 of 20 items on Amazon, so most of a padded batch is padding.
    PRORecAttention itself runs on a padded [B, N', ...] view, N' = the most real tokens of any row.
    """

    def __init__(self, real: torch.Tensor):
        counts = real.sum(1)
        self.batch, self.length = real.shape[0], int(counts.max())
        rank = real.cumsum(1) - 1  # tokens keep their order, moved to the front of their row
        rows = torch.arange(self.batch, device=real.device)[:, None]
        self.index = (rows * self.length + rank)[real]
        self.mask = torch.arange(self.length, device=real.device) < counts[:, None]  # [B, N'] True = real

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, D] -> [B, N', D] with zeros at padding (written in place: the out-of-place form
        would copy the whole zero tensor once more)."""
        out = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy_(0, self.index, rows)
        return out.view(self.batch, self.length, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N', D] -> [M, D]."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)


class PRORecDropout(nn.Dropout):
    """Dropout whose mask is drawn from random bytes, eight per 64-bit draw, rather than with
    ``bernoulli_`` (one float draw per entry): the drop rate is ``p`` rounded to a multiple of
    1/256 (0.3 -> 77/256 = 0.3008; below 1/512 none; FlashAttention rounds it alike) and the kept entries are scaled
    by 1 / (1 - that rate), so the expectation is exact. On a CPU the random numbers were the cost
    of dropout (a [256, 4, 128] mask and product: 862 us with ``bernoulli_``, 304 us from
    ``rand_like``, 110 us from bytes; 16 such calls per training step, docs/RESULTS.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = round(self.p * 256)
        if not self.training or threshold == 0:
            return x
        if threshold >= 256:
            return x * 0
        words = torch.empty((x.numel() + 7) // 8, dtype=torch.int64, device=x.device)
        random_bytes = words.random_(-(2**63), 2**63 - 1).view(torch.uint8)[: x.numel()].view(x.shape)
        return x * ((random_bytes >= threshold).to(x.dtype) * (256 / (256 - threshold)))


class PRORecAttention(nn.Module):
    """Multi-head attention with one fused q/k/v projection whose k/v part can be applied alone.

    In beam search, cross-attention projects the encoder states to keys and values once
    (``key_value``) and reuses them for every decoding step; in training on long histories, where
    a user has far fewer decoder positions than history tokens, ``attend_states`` reads the states
    unprojected.
    ``attend`` returns the heads concatenated, before ``out``. Keys and
    values travel as separate tensors: splitting a fused [.., 2H] one would make its backward
    concatenate a padded [B, N', 2H] gradient in every decoder layer.
    """

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.hidden, self.heads = hidden, heads
        self.weight_dropout = PRORecDropout(dropout)  # on the attention weights
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight[: self.hidden], self.qkv.bias[: self.hidden])

    def key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(x, self.qkv.weight[self.hidden :], self.qkv.bias[self.hidden :]).chunk(2, dim=-1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [N, T, H] -> [N, heads, T, d]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [N, T, H], k and v [N, S, H], mask broadcastable to [N, heads, T, S] (True = attend).

        Written out rather than ``F.scaled_dot_product_attention``: at these lengths (T <= 4 decoder
        positions, S <= 40 history tokens) CPU flash attention's per-block overhead dominates, and
        the explicit products made a Beauty training step 12-17 % faster on our CPU (docs/RESULTS.md, session 11).
        A masked score takes the most negative finite value, so a row with no key to attend to
        averages its values instead of turning into NaN."""
        q, k, v = self._heads(q * (self.hidden // self.heads) ** -0.5), self._heads(k), self._heads(v)
        weights = self._weights(q @ k.transpose(-1, -2), mask)
        return (weights @ v).transpose(1, 2).flatten(2)

    def _weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention weights from scaled scores: masked, softmax, dropout (training only)."""
        return self.weight_dropout(scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1))

    def attend_states(self, q: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``attend(q, *key_value(states), mask)`` without projecting ``states`` [N, S, H] to keys and
        values: the key projection moves onto the queries (per head, q_h . W_k,h s = (W_k,h^T q_h) . s;
        the key bias adds a constant per query, which the softmax ignores) and the value projection
        onto the weighted sum of states (weights summing to w give W_v,h (sum a s) + w b_v,h). Cheaper
        when a user has far fewer queries than history tokens, as in training on long histories (4
        decoder positions against 20 items on ml-100k): the states are not projected in every layer.
        q [N, T, H] as from ``query``, mask [N, 1, S] (True = attend); returns [N, T, H] like ``attend``."""
        (N, T, H), heads = q.shape, self.heads
        w_k, w_v = (w.view(heads, H // heads, H) for w in self.qkv.weight[H:].chunk(2))
        q = q.reshape(N * T, heads, -1).transpose(0, 1) * (H // heads) ** -0.5  # [heads, N*T, d]
        q = torch.bmm(q, w_k).view(heads, N, T, H).transpose(0, 1).reshape(N, heads * T, H)
        weights = self._weights(torch.bmm(q, states.transpose(1, 2)), mask)  # [N, heads*T, S]
        mixed = torch.bmm(weights, states).view(N, heads, T, H).transpose(0, 1).reshape(heads, N * T, H)
        bias = self.qkv.bias[2 * H :].view(heads, 1, -1)
        total = weights.sum(-1).view(N, heads, T).transpose(0, 1).reshape(heads, N * T, 1)  # 1 without dropout
        out = torch.baddbmm(bias * total, mixed, w_v.transpose(1, 2))  # [heads, N*T, d]
        return out.transpose(0, 1).reshape(N, T, H)


class PRORecFeedForward(nn.Sequential):
    """Position-wise feed-forward; no dropout inside, where CPU dropout on wide activations is costly."""

    def __init__(self, hidden: int, inner: int):
        super().__init__(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))


class PRORecEncoderLayer(nn.Module):
    """Pre-norm self-attention layer over the packed real tokens of the users' histories."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.attn = PRORecAttention(hidden, heads, attn_dropout)
        self.ffn = PRORecFeedForward(hidden, inner)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(2))
        self.dropout = PRORecDropout(dropout)

    def forward(self, x: torch.Tensor, packed: Packed) -> torch.Tensor:
        q, k, v = (packed.pad(t) for t in self.attn.qkv(self.norms[0](x)).chunk(3, dim=-1))
        h = packed.unpad(self.attn.attend(q, k, v, packed.mask[:, None, None]))
        x = x + self.dropout(self.attn.out(h))
        return x + self.dropout(self.ffn(self.norms[1](x)))


class PRORecDecoderLayer(nn.Module):
    """Pre-norm causal self-attention within each beam, cross-attention to the encoder, feed-forward.

    Inputs are [users, beams, T, H]; for cross-attention all beams of a user form one query
    sequence (beams do not interact there) against that user's precomputed keys and values.
    """

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float, attn_dropout: float):
        super().__init__()
        self.self_attn = PRORecAttention(hidden, heads, attn_dropout)
        self.cross_attn = PRORecAttention(hidden, heads, attn_dropout)
        self.ffn = PRORecFeedForward(hidden, inner)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(3))
        self.dropout = PRORecDropout(dropout)

    def forward(self, x, self_mask, memory: torch.Tensor | tuple[torch.Tensor, torch.Tensor], memory_mask,
                rows: slice | torch.Tensor = slice(None), past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """New states and this layer's self-attention keys and values [B*W, T, H] of ``x``.
        ``memory``: this layer's cross-attention keys and values, or the encoder states [B, N', H]
        themselves (``PRORec.encode``). ``rows``: the positions whose output is wanted (all by
        default); the others still serve as self-attention keys and values, and skip attention,
        cross-attention and feed-forward.
        ``past``: keys and values [B*W, P, H] of P positions before ``x``, which it attends to first."""
        B, W, T, H = x.shape
        q, k, v = self.self_attn.qkv(self.norms[0](x)).view(B * W, T, 3 * H).chunk(3, dim=-1)
        keys = k, v
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        x, q, self_mask = x[:, :, rows], q[:, rows], self_mask[:, :, rows]
        T = x.shape[2]
        x = x + self.dropout(self.self_attn.out(self.self_attn.attend(q, k, v, self_mask))).view(B, W, T, H)
        q = self.cross_attn.query(self.norms[1](x)).view(B, W * T, H)
        if isinstance(memory, tuple):
            h = self.cross_attn.attend(q, *memory, memory_mask)
        else:
            h = self.cross_attn.attend_states(q, memory, memory_mask[:, 0])
        x = x + self.dropout(self.cross_attn.out(h)).view(B, W, T, H)
        return x + self.dropout(self.ffn(self.norms[2](x))), keys


def id_dropout_share(epoch: int, final: float, start: float | None, ramp: tuple[int, int] | None) -> float:
    """The share of items whose free embedding training leaves out of their token in ``epoch``:
    ``start`` up to epoch ``ramp[0]``, ``final`` from ``ramp[1]`` on, linear between; ``final``
    throughout without a ``start``. A low share early lets item tokens learn fast while the
    model is far from fitting them; a higher one later keeps them from being memorised."""
    return final if start is None else float(np.interp(epoch, ramp, (start, final)))


class PRORec(SequentialRecommender):
    """Generative recommender over Stage-I unicodes with intra-modality knowledge distillation."""

    input_type = InputType.POINTWISE
    item_columns = (UNICODE_FIELD,)  # what it reads of Stage I's artifact
    needs_stage1 = True
    LAST_CODE_TOKENS = ("item", "shared")
    HISTORY_TOKENS = ("codes", "item")
    # settings that change how a trained model ranks, not what it trains on or what its weights are:
    # a checkpoint can be ranked again with other values on the same loaded data (frequency.py --rerank)
    RANKING_KEYS = ("beam_size", "item_temperature", "item_id_shrinkage")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.K = config["codebook_size"]
        self.hidden = config["hidden_size"]
        self.beam_size = config["beam_size"]
        self.ikd_weight = config["ikd_weight"]
        self.ikd_tau = config["ikd_tau"]
        self.ikd_negatives = config["ikd_negatives"]
        self.label_smoothing = config["label_smoothing"]
        self.history_per_item = config["history_tokens"] == "item"
        self.check_config(config)
        data_file = str(Path(config["data_path"]) / f"{dataset.dataset_name}.item")
        codes = load_codes(dataset, data_file)
        if codes.max() >= self.K:
            raise ValueError(f"{data_file}: code {int(codes.max())} >= codebook_size {self.K}")
        self.register_buffer("codes", codes, persistent=False)
        self.code_len = codes.shape[1]
        self.loss_names = (*(f"gen_l{level + 1}" for level in range(self.code_len)), "ikd")
        self.trie = CodeTrie(codes, self.K)  # validates uniqueness and prefix-freeness
        self.bos, self.ikd_token = 1 + self.code_len * self.K, 2 + self.code_len * self.K
        self.item_level = config["last_code_token"] == "item"
        self.item_offset = self.ikd_token + 1  # item i's own token is item_offset + i (item mode)
        vocab = self.item_offset + (self.n_items if self.item_level else 0)
        self.token_embedding = nn.Embedding(vocab, self.hidden, padding_idx=0)
        self.register_buffer("item_tokens", self._item_tokens(codes), persistent=False)
        # the decoder positions training reads with IKD: [BOS], the code positions and [IKD]
        self.register_buffer("ikd_rows", torch.tensor([*range(self.code_len), self.code_len + 1]), persistent=False)
        # the trie node each code position of each item chooses among the children of
        self.register_buffer("item_nodes", self.trie.node_path(codes)[:, :-1], persistent=False)
        child_items = [self.trie.child_items(level) for level in range(self.code_len)]
        # levels where some child completes an item
        self.leaf_levels = {level for level, items in enumerate(child_items) if bool((items >= 0).any())}
        # ranking's factor on each level's logits: 1 / item_temperature where children complete
        # items; None at 1, where ranking is the model's own likelihood
        temperature = config["item_temperature"]
        scale = [1 / temperature if level in self.leaf_levels else 1.0 for level in range(self.code_len)]
        self.register_buffer("ranking_scale", torch.tensor(scale)[:, None] if temperature != 1 else None,
                             persistent=False)
        if self.item_level:  # buffers, so they follow the model across devices
            for level in range(self.code_len):
                self.register_buffer(f"child_items_{level}", child_items[level], persistent=False)
                if level in self.leaf_levels:
                    leaf_codes, leaf_items = self.trie.leaf_children(level)
                    self.register_buffer(f"leaf_codes_{level}", leaf_codes, persistent=False)
                    self.register_buffer(f"leaf_items_{level}", leaf_items, persistent=False)
        self.item_bias = nn.Parameter(torch.zeros(self.n_items)) if self.item_level else None
        self.integrated_item_tokens = self.item_level and config["integrated_item_tokens"]
        if self.ikd_weight or self.integrated_item_tokens:
            integrated = load_integrated(dataset, Path(config["data_path"]))
            self.register_buffer("integrated", integrated, persistent=False)
        if self.integrated_item_tokens:
            self.integrated_proj = nn.Linear(self.integrated.shape[1], self.hidden, bias=False)
        self.id_dropout_schedule = (config["item_id_dropout"], config["item_id_dropout_start"],
                                    config["item_id_dropout_ramp"])
        self.item_id_dropout = id_dropout_share(0, *self.id_dropout_schedule)
        self.register_buffer("free_trust", self._free_trust(dataset, config["item_id_shrinkage"])
                             if self.integrated_item_tokens else None, persistent=False)
        self.item_position = nn.Embedding(self.max_seq_length, self.hidden)
        self.decoder_position = nn.Embedding(self.code_len + 2, self.hidden)
        sizes = (self.hidden, config["n_heads"], config["inner_size"], config["dropout_prob"], config["attn_dropout_prob"])
        self.encoder = nn.ModuleList(PRORecEncoderLayer(*sizes) for _ in range(config["n_encoder_layers"]))
        self.decoder = nn.ModuleList(PRORecDecoderLayer(*sizes) for _ in range(config["n_decoder_layers"]))
        self.encoder_norm = nn.LayerNorm(self.hidden)
        self.decoder_norm = nn.LayerNorm(self.hidden)
        self.dropout = PRORecDropout(config["dropout_prob"])
        self.head = nn.Linear(self.hidden, self.code_len * self.K)  # one K-way classifier per level
        if self.ikd_weight:
            self.ikd_proj = nn.Linear(self.hidden, self.integrated.shape[1])
        self.beam_stats: Counter = Counter()
        self._table: torch.Tensor | None = None  # set by one_table for one pass
        self.apply(self._init_weights)

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse settings this model cannot be built with; the runner asks before Stage I, which
        may train for minutes, and the model again when it is built."""
        if config["last_code_token"] not in cls.LAST_CODE_TOKENS:
            raise ValueError(f"last_code_token must be one of {cls.LAST_CODE_TOKENS}, got {config['last_code_token']!r}")
        if config["history_tokens"] not in cls.HISTORY_TOKENS:
            raise ValueError(f"history_tokens must be one of {cls.HISTORY_TOKENS}, got {config['history_tokens']!r}")
        if not 0 <= config["label_smoothing"] < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {config['label_smoothing']}")
        if config["hidden_size"] % config["n_heads"]:
            raise ValueError(f"hidden_size {config['hidden_size']} is not divisible by n_heads {config['n_heads']}")
        if config["beam_size"] < max(config["topk"]):
            raise ValueError(f"beam_size {config['beam_size']} must be >= max(topk) = {max(config['topk'])}")
        if not 0 <= config["item_id_dropout"] < 1:
            raise ValueError(f"item_id_dropout must lie in [0, 1), got {config['item_id_dropout']}")
        start, ramp = config["item_id_dropout_start"], config["item_id_dropout_ramp"]
        if start is not None:
            if not 0 <= start < 1:
                raise ValueError(f"item_id_dropout_start must lie in [0, 1), got {start}")
            if not (isinstance(ramp, (list, tuple)) and len(ramp) == 2 and all(isinstance(e, int) for e in ramp)
                    and 0 <= ramp[0] <= ramp[1]):
                raise ValueError("item_id_dropout_ramp must be two epochs [first, last] with 0 <= first <= last "
                                 f"when item_id_dropout_start is set, got {ramp!r}")
        if not config["item_id_shrinkage"] >= 0:
            raise ValueError(f"item_id_shrinkage must be >= 0, got {config['item_id_shrinkage']}")
        if not config["item_temperature"] > 0:
            raise ValueError(f"item_temperature must be > 0, got {config['item_temperature']}")
        if config["ikd_weight"] and (config["ikd_tau"] <= 0 or config["ikd_negatives"] < 1):
            raise ValueError("ikd_tau must be > 0 and ikd_negatives >= 1 when ikd_weight > 0")

    def _free_trust(self, dataset, shrinkage: float) -> torch.Tensor | None:
        """[n_items, 1] factors n / (n + ``shrinkage``) on the free item embeddings when ranking, n an
        item's count as a training target in ``dataset`` (RecBole's training split, one row per target);
        None when off. A free embedding is an offset from the item's Stage-I token fitted on n examples;
        as a prior would, ranking shrinks it towards that token the more, the fewer they were. Rare
        items (the test split holds more of them than validation) then rank mostly by what Stage I
        knows of them, as ID dropout trained the model to, and an item never a training target by that
        alone."""
        if not shrinkage:
            return None
        counts = torch.bincount(dataset.inter_feat[self.ITEM_ID], minlength=self.n_items).float()
        return (counts / (counts + shrinkage))[:, None]

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer before each training epoch (``epoch`` from 0, resumed runs
        included): moves the ID-dropout share along its schedule."""
        self.item_id_dropout = id_dropout_share(epoch, *self.id_dropout_schedule)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def token_table(self) -> torch.Tensor:
        """Embeddings [vocab, H] of every token (the one of the current pass, under ``one_table``).
        With ``integrated_item_tokens`` an item's own token is its free embedding plus a learned
        projection of its Stage-I integrated embedding: items seldom seen in training (the many rare
        test targets) still get a token informed by their text and collaborative neighbours instead
        of one that was only ever pushed down. Training may drop the free part (ID dropout); ranking
        weights it by ``free_trust``."""
        if self._table is not None:
            return self._table
        table = self.token_embedding.weight
        if not self.integrated_item_tokens:
            return table
        free = table[self.item_offset :]
        if self.training and self.item_id_dropout:
            # ID dropout: for a share of the items, this pass sees only what Stage I knows of them,
            # as it effectively does for items seldom trained on
            free = free * (torch.rand(len(free), 1, device=free.device) >= self.item_id_dropout)
        elif not self.training and self.free_trust is not None:
            free = free * self.free_trust  # ranking: each item's own embedding as far as training saw it
        return torch.cat([table[: self.item_offset], free + self.integrated_proj(self.integrated)])

    @contextmanager
    def one_table(self):
        """Use one token table for a whole pass (encoder and decoder inputs, item scores, every
        beam-search step): with integrated item tokens it costs a [n_items, d] x [d, H] product
        and its backward, which a pass would otherwise pay three times, and each step of a search."""
        self._table = self.token_table()
        try:
            yield
        finally:
            self._table = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.token_table(), padding_idx=0)

    def code_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Code values [..., L] -> level token ids (level-specific vocabulary; -1 -> padding 0)."""
        offsets = 1 + self.K * torch.arange(codes.shape[-1], device=codes.device)
        return torch.where(codes >= 0, codes + offsets, torch.zeros_like(codes))

    def _item_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """Each item's input tokens [n_items, L]: level tokens, the last one the item's own in item mode."""
        tokens = self.code_tokens(codes)
        if self.item_level:
            last = (codes >= 0).sum(1) - 1
            items = torch.arange(len(codes))
            tokens[items[1:], last[1:]] = self.item_offset + items[1:]
        return tokens

    def encode(self, interaction, queries: int) -> tuple[list, torch.Tensor]:
        """User history as unicode tokens -> what each decoder layer's cross-attention reads, and its
        mask [B, 1, 1, N']. ``queries`` counts the decoder positions per user that will read it.
        Where history tokens outnumber them more than twice (training on long histories: 4 positions
        against 20 items on ml-100k), that is the encoder states [B, N', H] themselves, read through
        projections applied to the queries (``PRORecAttention.attend_states``), which spares
        projecting every history token in every layer; otherwise (beam search: beams x steps; short
        histories) each layer's keys and values (each [B, N', H]), projected once. Twice: per query
        the states' form costs about twice what projecting one token does (CPU step time, ml-100k
        -10 %, Beauty's 1.7 tokens per query +3 %: docs/RESULTS.md, session 12).
        ``history_tokens``: ``codes`` reads each history item as its code tokens (the paper's form),
        ``item`` as one token, the sum of its code tokens' embeddings: half the encoder's tokens on
        two-level codes, with the same information about each item."""
        seq, seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        tokens = self.item_tokens[seq]  # [B, L, C]
        # position counted from the most recent item, so "last item" has one embedding
        recency = (seq_len[:, None] - 1 - torch.arange(seq.shape[1], device=seq.device)).clamp(min=0)
        if self.history_per_item:
            real = seq != 0
            packed = Packed(real)
            codes = tokens[real]  # [M, C], a shorter code padded with token 0
            x = (self.embed(codes) * (codes != 0)[..., None]).sum(1) + self.item_position(recency[real])
        else:
            real = tokens != 0
            packed = Packed(real.flatten(1))
            x = self.embed(tokens[real]) + self.item_position(recency[:, :, None].expand_as(tokens)[real])
        x = self.dropout(x)
        for layer in self.encoder:
            x = layer(x, packed)
        x = self.encoder_norm(x)
        if 2 * queries * packed.batch >= len(x):
            memory = [tuple(packed.pad(t) for t in layer.cross_attn.key_value(x)) for layer in self.decoder]
        else:
            memory = [packed.pad(x)] * len(self.decoder)
        return memory, packed.mask[:, None, None]

    def decode(self, tokens: torch.Tensor, memory: list, memory_mask: torch.Tensor,
               rows: slice | torch.Tensor = slice(None), past: list | None = None) -> tuple[torch.Tensor, list]:
        """Causal decoder states [B, W, T', H] for ``tokens`` [B, W, T] (W beams share a memory row)
        at the positions ``rows`` (T' of them; all by default), and each layer's self-attention keys
        and values of ``tokens``. Only the last layer skips the other positions: below it they are
        the keys and values of the later ones. ``past``: each layer's keys and values [B*W, P, H]
        of P earlier positions, from an earlier call (beam search decodes [BOS] once per user)."""
        B, W, T = tokens.shape
        P = 0 if past is None else past[0][0].shape[1]
        x = self.dropout(self.embed(tokens) + self.decoder_position.weight[P : P + T])
        causal = torch.ones(T, P + T, dtype=torch.bool, device=tokens.device).tril(diagonal=P)
        real = F.pad(tokens != 0, (P, 0), value=True).view(B * W, 1, P + T)  # earlier positions are real
        self_mask = (causal & real)[:, None]  # [B*W, 1, T, P+T] True = attend
        keys, last = [], len(self.decoder) - 1
        for i, (layer, kv) in enumerate(zip(self.decoder, memory)):
            x, layer_keys = layer(x, self_mask, kv, memory_mask, rows if i == last else slice(None),
                                  None if past is None else past[i])
            keys.append(layer_keys)
        return self.decoder_norm(x), keys

    def level_logits(self, states: torch.Tensor, nodes: torch.Tensor, first_level: int = 0) -> torch.Tensor:
        """Logits [N, T, K] of position t's code at level ``first_level + t``, the prefix being at
        trie node ``nodes`` [N, T]. Shared mode: the level's K-way head. Item mode: a child that
        completes an item is scored by that item's own token, a missing child gets no probability."""
        T = states.shape[1]
        weight = self.head.weight.view(self.code_len, self.K, self.hidden)[first_level : first_level + T]
        bias = self.head.bias.view(self.code_len, self.K)[first_level : first_level + T]
        logits = torch.einsum("nth,tkh->ntk", states, weight) + bias
        if not self.item_level:
            return logits
        levels = []
        for t in range(T):
            items = getattr(self, f"child_items_{first_level + t}")[nodes[:, t]]  # [N, K]
            # the most negative finite value, not -inf: a row whose node has no children (a padding
            # position of a shorter code, a beam that has just finished) must not turn into NaN
            level = logits[:, t].masked_fill(items == -2, torch.finfo(logits.dtype).min)
            if first_level + t in self.leaf_levels:
                own = self._item_logits(states[:, t], nodes[:, t], first_level + t)
                level = torch.where(items >= 0, own, level)
            levels.append(level)
        return torch.stack(levels, dim=1)

    def _item_logits(self, states: torch.Tensor, nodes: torch.Tensor, level: int) -> torch.Tensor:
        """<state, own token> + item bias [N, K] of the items completed by each child of ``nodes``
        (0 where a child completes no item). Only those children are scored (``leaf_children``: at
        most 85 of K=512 on Beauty, about 110 of K=256), in two forms of the same numbers chosen by cost on a
        CPU: with gradients, a gather of each row's [C, H] item embeddings and one batched product
        (half the cost of scoring the whole catalogue densely); without, one [rows, H] x [H, C]
        product per distinct node (beams crowd into few clusters), which never forms [N, n_items];
        on a GPU that is a few hundred small products per step, fine at beam 20 (decode.py)."""
        table = self.token_table()[self.item_offset :]
        codes, items = (getattr(self, f"leaf_{part}_{level}") for part in ("codes", "items"))
        if torch.is_grad_enabled():
            codes = codes[nodes]
            width = int((codes < self.K).sum(1).max())  # the batch's widest node
            codes, items = codes[:, :width], items[nodes, :width]
            scores = torch.bmm(F.embedding(items, table), states[:, :, None]).squeeze(-1) + self.item_bias[items]
        else:
            uniq, inv = nodes.unique(return_inverse=True)
            order = inv.argsort()
            groups = states[order].split(torch.bincount(inv, minlength=len(uniq)).tolist())
            scores = torch.cat([rows @ table[items[u]].T + self.item_bias[items[u]] for u, rows in zip(uniq, groups)])
            scores, codes = torch.empty_like(scores).index_copy_(0, order, scores), codes[nodes]
        out = states.new_zeros(len(states), self.K + 1)  # column K takes the padding
        return out.scatter_(1, codes, scores)[:, : self.K]

    def teacher_forced(self, interaction, items: torch.Tensor, with_ikd: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Logits [B, C, K] of each code of ``items``, its codes [B, C] and, ``with_ikd``, the
        [IKD] state [B, H] (else None). Without IKD the decoder reads only [BOS] and the first C - 1
        code tokens: a causal decoder's states never depend on later tokens, so the last code token
        and [IKD] would change nothing (on two-level codes, half the decoder's positions)."""
        bos = torch.full((len(items), 1), self.bos, device=items.device)
        if with_ikd:  # the last code token's state is read by no loss: the decoder's last layer skips it
            tokens = torch.cat([bos, self.item_tokens[items], torch.full_like(bos, self.ikd_token)], dim=1)
            rows = self.ikd_rows
        else:
            tokens, rows = torch.cat([bos, self.item_tokens[items, :-1]], dim=1), slice(None)
        codes = self.codes[items]
        with self.one_table():
            memory, memory_mask = self.encode(interaction, queries=tokens.shape[1])
            states = self.decode(tokens[:, None], memory, memory_mask, rows)[0][:, 0]
            logits = self.level_logits(states[:, : self.code_len], self.item_nodes[items])
            return logits, codes, states[:, -1] if with_ikd else None

    def calculate_loss(self, interaction) -> tuple[torch.Tensor, ...]:
        """Generation loss per code level (their sum is L_GR; a level an item's code does not
        reach adds 0 for it), then mu * L_IKD: RecBole sums the tuple, our trainer logs each part."""
        target = interaction[self.POS_ITEM_ID]
        logits, codes, ikd_state = self.teacher_forced(interaction, target, with_ikd=bool(self.ikd_weight))
        gen = self.generation_loss(logits, codes)
        ikd = self.ikd_weight * self.ikd_loss(ikd_state, target) if self.ikd_weight else gen.new_zeros(())
        return (*gen.unbind(), ikd)

    def generation_loss(self, logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Per-level cross-entropy [C] (summed over the batch's real code positions, divided by the
        batch size). With ``label_smoothing`` eps the target keeps 1 - eps and eps is spread over
        the codes that can follow the prefix (item mode: the node's children, not all K), so the
        smoothing never asks for probability where no item exists."""
        logp = logits.log_softmax(-1)  # [B, C, K]
        nll = -logp.gather(-1, codes.clamp(min=0)[..., None]).squeeze(-1)
        if self.label_smoothing:
            valid = logits > torch.finfo(logits.dtype).min
            uniform = -logp.masked_fill(~valid, 0).sum(-1) / valid.sum(-1).clamp(min=1)
            nll = (1 - self.label_smoothing) * nll + self.label_smoothing * uniform
        return nll.masked_fill(codes < 0, 0).sum(0) / len(codes)

    def ikd_loss(self, state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log softmax of sim(h, z_target) against sim(h, z_negative) (cosine / tau)."""
        # uniform over the real items other than the target
        neg = torch.randint(1, self.n_items - 1, (len(target), self.ikd_negatives), device=target.device)
        neg = neg + (neg >= target[:, None]).long()
        z = F.normalize(self.integrated[torch.cat([target[:, None], neg], dim=1)], dim=-1)
        h = F.normalize(self.ikd_proj(state), dim=-1)
        logits = torch.einsum("bd,bnd->bn", h, z) / self.ikd_tau
        return F.cross_entropy(logits, torch.zeros_like(target))

    def ranking_log_probs(self, logits: torch.Tensor, first_level: int = 0) -> torch.Tensor:
        """Log-probabilities [N, T, K] that rank items (beam search, ``predict``) from ``level_logits``:
        at levels where children complete items, the logits divided by ``item_temperature`` first.
        Training sharpens the choice of an item within its cluster beyond what holds on unseen
        users (training loss of that level 3.6 -> 1.5 nats over 30 Beauty epochs while validation
        recall fell); a temperature above 1 spreads the beam over more of the chosen clusters'
        items (docs/RESULTS.md, session 13). Training's loss is untouched."""
        if self.ranking_scale is not None:
            scale = self.ranking_scale[first_level : first_level + logits.shape[1]]
            logits = (logits * scale).clamp(min=torch.finfo(logits.dtype).min)  # a masked child stays finite
        return logits.log_softmax(-1)

    def predict(self, interaction) -> torch.Tensor:
        """Ranking log-likelihood of each given item's code (sum over its code tokens), the score
        beam search ranks by."""
        logits, codes, _ = self.teacher_forced(interaction, interaction[self.ITEM_ID])
        logp = self.ranking_log_probs(logits).gather(-1, codes.clamp(min=0)[..., None]).squeeze(-1)
        return logp.masked_fill(codes < 0, 0).sum(-1)

    @torch.no_grad()
    def beam_search(self, interaction) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``beam_size`` items [B, W] and their code log-likelihoods, best first.

        Every beam of a user starts from [BOS] alone, so the first step decodes it once per user
        and later steps reuse its keys and values (``past``), decoding only the generated codes:
        on two-level codes that is 1 + W decoder rows per user instead of W + 2 W."""
        with self.one_table():
            # decoder positions per user reading the encoder: 1 at the first step, then W x t at step t
            positions = 1 + self.beam_size * self.code_len * (self.code_len - 1) // 2
            memory, memory_mask = self.encode(interaction, queries=positions)
            B, W, device = memory_mask.shape[0], self.beam_size, memory_mask.device
            if self.trie.device != device:
                self.trie.to(device)
            bos_keys: list = []

            def step(prefix: torch.Tensor) -> torch.Tensor:
                if prefix.shape[1] == 0:  # [BOS] for every beam: decode it once per user
                    bos = torch.full((B, 1, 1), self.bos, device=device)
                    states, keys = self.decode(bos, memory, memory_mask)
                    # each user's keys and values, repeated for its W beams
                    bos_keys.extend(tuple(t.repeat_interleave(W, 0) for t in kv) for kv in keys)
                    root = torch.zeros(B, 1, dtype=torch.long, device=device)
                    logits = self.level_logits(states.view(B, 1, -1), root)
                    return self.ranking_log_probs(logits)[:, 0].repeat_interleave(W, 0)
                # an unfinished beam's prefix holds inner nodes only, whose tokens are level tokens
                tokens = self.code_tokens(prefix).view(B, W, -1)
                states, _ = self.decode(tokens, memory, memory_mask, slice(-1, None), bos_keys)
                node = self.trie.node_path(prefix)[:, -1:]  # at most code length - 1 table lookups
                logits = self.level_logits(states.view(B * W, 1, -1), node, prefix.shape[1])
                return self.ranking_log_probs(logits, prefix.shape[1])[:, 0]

            return constrained_beam_search(step, self.trie, B, W)

    def full_sort_predict(self, interaction) -> torch.Tensor:
        items, scores = self.beam_search(interaction)
        if self.ITEM_ID in interaction:  # RecBole's sequential evaluation passes the target along
            self._count_beam_hits(items, interaction[self.ITEM_ID])
        return scores_to_full(items, scores, self.n_items)

    def _count_beam_hits(self, items: torch.Tensor, target: torch.Tensor) -> None:
        """Diagnostics: how often the final beam holds the target's first code, and the target."""
        first = self.codes[items, 0].eq(self.codes[target, 0][:, None]).any(1)
        stats = self.beam_stats
        stats["users"] += len(target)
        stats["first_code_in_beam"] += int(first.sum())
        stats["item_in_beam"] += int(items.eq(target[:, None]).any(1).sum())

    def pop_eval_counts(self) -> dict[str, int]:
        """Beam diagnostics counted since the last call, with the number of ``users`` counted (the
        trainer sums them over DDP ranks, logs their rates and resets them per evaluation)."""
        stats, self.beam_stats = self.beam_stats, Counter()
        return {key: stats[key] for key in ("users", "first_code_in_beam", "item_in_beam")}
