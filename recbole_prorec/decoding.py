"""Trie-constrained beam search over item codes.

Every item is a short sequence of code tokens in ``[0, K)``. Decoding is only
allowed to follow prefixes of real items, so the search walks a prefix trie
stored as dense per-depth lookup tables: one gather per step, no Python loop
over users or beams.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]


class CodeTrie:
    """Prefix trie of the item codes, stored as tensors.

    Nodes are numbered per depth (depth 0 is the single root, depth ``d`` holds
    the distinct length-``d`` prefixes, ordered lexicographically).

    Attributes:
        K: code vocabulary size per position.
        max_len: longest code length (number of decoding steps).
        n_items: number of rows of ``codes`` (including padding item 0).
        children: ``children[t]`` is a LongTensor ``[n_nodes(t), K]``; entry
            ``[n, c]`` is the id of the depth-``t+1`` node reached from node
            ``n`` with code ``c``, or -1 when no item continues that way.
        leaf_item: ``leaf_item[d]`` is a LongTensor ``[n_nodes(d)]`` holding the
            item whose complete code is that node, or -1 for inner nodes
            (``d = 0 .. max_len``; the root is never a leaf).
        blocked: ``blocked[t]`` is a BoolTensor ``[n_nodes(t) + 1, K]``, the
            negation of ``children[t] >= 0`` plus a last "finished" row that only
            opens code 0, so finished beams go through the same masked top-k.

    Memory: the tables are dense, ``9 * K * sum_{t < max_len} n_nodes(t)``
    bytes (int64 ``children`` plus a bool mask used by the search); since
    ``n_nodes(t) <= min(K**t, n_items)`` this is at most
    ``9 * K * max_len * n_items`` bytes, e.g. ~135 MB for 100k random items
    (K=256, length 3) and ~26 MB for 12k items of length 2-3.
    """

    def __init__(self, codes: Tensor, K: int) -> None:
        codes = _check_codes(codes, K)
        self.K = K
        self.n_items = codes.shape[0]
        lengths = (codes >= 0).sum(dim=1)
        self.max_len = int(lengths.max()) if self.n_items else 0
        self.children: list[Tensor] = []
        self.blocked: list[Tensor] = []
        self.leaf_item: list[Tensor] = [torch.full((1,), -1, dtype=torch.long, device=codes.device)]
        node = torch.zeros(self.n_items, dtype=torch.long, device=codes.device)
        for d in range(self.max_len):
            self._add_depth(codes, lengths, node, d)

    def _add_depth(self, codes: Tensor, lengths: Tensor, node: Tensor, d: int) -> None:
        """Create depth ``d+1`` nodes from the items still longer than ``d``; updates ``node`` in place."""
        rows = (lengths > d).nonzero().squeeze(1)
        # (parent, code) keys stay below n_nodes(d) * K, so no overflow for long codes;
        # sorted unique keys number the new nodes in lexicographic order.
        key = node[rows] * self.K + codes[rows, d]
        uniq, inv = torch.unique(key, return_inverse=True)
        table = torch.full((self.leaf_item[d].numel(), self.K), -1, dtype=torch.long, device=codes.device)
        table.view(-1)[uniq] = torch.arange(uniq.numel(), device=codes.device)
        counts = torch.bincount(inv, minlength=uniq.numel())
        ends = lengths[rows] == d + 1
        _check_prefix_free(rows, inv, counts, ends)
        leaf = torch.full((uniq.numel(),), -1, dtype=torch.long, device=codes.device)
        leaf[inv[ends]] = rows[ends]
        node[rows] = inv
        self.children.append(table)
        finished = torch.ones(1, self.K, dtype=torch.bool, device=codes.device)
        finished[0, 0] = False
        self.blocked.append(torch.cat([table < 0, finished]))
        self.leaf_item.append(leaf)

    def node_path(self, codes: Tensor) -> Tensor:
        """Nodes [N, t+1] visited by each row of ``codes`` [N, t] from the root (column d: depth d).
        A row that leaves the trie (padding -1, a finished beam's filler codes) goes on at node 0,
        a valid row index for the next depth's tables."""
        path = [torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)]
        for t in range(codes.shape[1]):
            path.append(self.children[t][path[-1], codes[:, t].clamp(min=0)].clamp(min=0))
        return torch.stack(path, dim=1)

    def child_items(self, depth: int) -> Tensor:
        """[n_nodes(depth), K]: the item each child completes, -1 for an inner child, -2 for none."""
        children = self.children[depth]
        leaf = self.leaf_item[depth + 1][children.clamp(min=0)]
        return torch.where(children >= 0, leaf, torch.full_like(leaf, -2))

    def leaf_children(self, depth: int) -> tuple[Tensor, Tensor]:
        """The children of each depth-``depth`` node that complete an item, packed to the left:
        codes ``[n_nodes(depth), C]`` and items ``[n_nodes(depth), C]``, C = the most any node has.
        A node with fewer pads with code ``K`` (one past the last) and item 0. Scoring only these
        costs C (Amazon clusters: about 110) where all K codes would cost K."""
        items = self.child_items(depth)
        leaf = items >= 0
        codes = (~leaf).to(torch.uint8).argsort(dim=1, stable=True)[:, : int(leaf.sum(1).max())]
        real = torch.arange(codes.shape[1], device=codes.device) < leaf.sum(1, keepdim=True)
        return codes.masked_fill(~real, self.K), items.gather(1, codes).masked_fill(~real, 0)

    def to(self, device: torch.device | str) -> "CodeTrie":
        """Move all tables to ``device`` (in place, returns self like ``nn.Module.to``)."""
        self.children = [c.to(device) for c in self.children]
        self.blocked = [b.to(device) for b in self.blocked]
        self.leaf_item = [leaf.to(device) for leaf in self.leaf_item]
        return self

    @property
    def device(self) -> torch.device:
        return self.leaf_item[0].device


def _check_codes(codes: Tensor, K: int) -> Tensor:
    """Validate shape, value range, padding layout and padding row 0; return a LongTensor."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    if codes.dim() != 2 or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be an integer tensor [n_items, max_len], got {codes.dtype} {tuple(codes.shape)}")
    codes = codes.long()
    if codes.numel() and (codes.min() < -1 or codes.max() >= K):
        raise ValueError(f"code values must lie in [0, {K}) (or -1 for padding)")
    if ((codes[:, :-1] < 0) & (codes[:, 1:] >= 0)).any():
        raise ValueError("-1 padding must only appear at the end of a code")
    if codes.shape[0] and (codes[0] >= 0).any():
        raise ValueError("row 0 is the padding item and must be all -1")
    return codes


def _check_prefix_free(rows: Tensor, inv: Tensor, counts: Tensor, ends: Tensor) -> None:
    """A code ending at a node must be the only item through it: else duplicate or prefix."""
    bad = ends & (counts[inv] > 1)
    if not bad.any():
        return
    first = int(bad.nonzero()[0])
    same = (inv == inv[first]) & (rows != rows[first])
    item, dup = int(rows[first]), rows[same & ends]
    if dup.numel():
        raise ValueError(f"duplicate codes: items {item} and {int(dup[0])} have the same code")
    other = int(rows[same][0])
    raise ValueError(f"codes are not prefix-free: the code of item {item} is a prefix of item {other}'s code")


def constrained_beam_search(
    step_fn: StepFn,
    trie: CodeTrie,
    batch_size: int,
    beam_size: int,
) -> tuple[Tensor, Tensor]:
    """Decode the ``beam_size`` most likely items per user, restricted to real codes.

    Args:
        step_fn: maps the generated prefix ``[B*beam, t]`` (batch-major rows:
            row ``b*beam + j`` is beam ``j`` of user ``b``) to log-probabilities
            ``[B*beam, K]`` of the code at position ``t`` (the prefix is
            ``[B*beam, 0]`` at ``t = 0``). Finished and empty beams keep
            being passed (finished ones are extended with the filler code 0);
            their outputs are ignored.
        trie: the item code trie; the search runs on its device (move it once
            with ``trie.to``), where ``step_fn`` must return its scores.

    Returns:
        ``(items [B, beam], scores [B, beam])`` sorted by score descending;
        score is the summed log-probability of the item's code. Slots without
        an item hold item 0 and score -inf. Items in a row are distinct.

    Ties between equal scores are resolved by ``torch.topk``: deterministic
    for a given device and build, but CPU and GPU may order exact ties
    differently (a stable sort would not, but is far slower on CPU).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    device = trie.device
    n_rows = batch_size * beam_size
    # Only beam 0 starts live: all beams share the root, others would duplicate it.
    score = torch.full((batch_size, beam_size), float("-inf"), device=device)
    score[:, 0] = 0.0
    score = score.view(-1)
    node = torch.zeros(n_rows, dtype=torch.long, device=device)
    item = torch.zeros(n_rows, dtype=torch.long, device=device)
    done = torch.zeros(n_rows, dtype=torch.bool, device=device)
    prefix = torch.zeros(n_rows, 0, dtype=torch.long, device=device)
    row_base = torch.arange(batch_size, device=device).unsqueeze(1) * beam_size
    for t in range(trie.max_len):
        if bool((done | torch.isinf(score)).all()):
            break
        log_probs = step_fn(prefix)
        if log_probs.shape != (n_rows, trie.K):
            raise ValueError(f"step_fn returned {tuple(log_probs.shape)}, expected {(n_rows, trie.K)}")
        cand = _candidates(trie, t, log_probs, score, node, done)
        score, pick = cand.view(batch_size, -1).topk(beam_size, dim=1)
        score = score.reshape(-1)
        src = (row_base + pick // trie.K).view(-1)
        code = (pick % trie.K).view(-1)
        node, item, done = _advance(trie, t, node[src], item[src], done[src], code, score)
        prefix = torch.cat([prefix[src], code.unsqueeze(1)], dim=1)
    alive = done & torch.isfinite(score)
    item = torch.where(alive, item, torch.zeros_like(item))
    score = torch.where(alive, score, torch.full_like(score, float("-inf")))
    return item.view(batch_size, beam_size), score.view(batch_size, beam_size)


def _candidates(trie: CodeTrie, t: int, log_probs: Tensor, score: Tensor, node: Tensor, done: Tensor) -> Tensor:
    """Scores ``[N, K]`` of every allowed extension; a finished beam's only option is code 0 at its own score."""
    sentinel = trie.blocked[t].shape[0] - 1
    blocked = trie.blocked[t][torch.where(done, torch.full_like(node, sentinel), node)]
    cand = (score.unsqueeze(1) + log_probs).masked_fill_(blocked, float("-inf"))
    cand[:, 0] = torch.where(done, score.to(cand.dtype), cand[:, 0])
    return cand


def _advance(
    trie: CodeTrie, t: int, node: Tensor, item: Tensor, done: Tensor, code: Tensor, score: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Move the selected beams one level down; beams that were finished keep their item."""
    alive = torch.isfinite(score)
    # Finished or dead beams may point at missing children (-1): clamp so the gather stays in range.
    child = trie.children[t][node, code].clamp(min=0)
    leaf = trie.leaf_item[t + 1][child]
    item = torch.where(done, item, leaf.clamp(min=0))
    done = alive & (done | (leaf >= 0))
    node = torch.where(alive & ~done, child, torch.zeros_like(child))
    return node, item, done


def scores_to_full(items: Tensor, scores: Tensor, n_items: int) -> Tensor:
    """Scatter beam scores into a ``[B, n_items]`` matrix of -inf for RecBole's full-sort evaluation.

    Empty slots (item 0 / score -inf) write -inf into column 0, so the padding
    item is never ranked.
    """
    full = torch.full((items.shape[0], n_items), float("-inf"), dtype=scores.dtype, device=scores.device)
    keep = (items > 0) & torch.isfinite(scores)
    index = torch.where(keep, items, torch.zeros_like(items))
    return full.scatter_(1, index, scores.masked_fill(~keep, float("-inf")))
