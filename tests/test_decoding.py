"""Tests for the trie-constrained beam search, checked against brute-force scoring."""
import pytest
import torch

from recbole_prorec.decoding import CodeTrie, constrained_beam_search, scores_to_full

HIDDEN = 8
# (K, shortest code, longest code, number of items, seed); seeds picked so every
# length occurs. The second case carries finished beams through several steps.
CASES = [(5, 2, 3, 40, 3), (4, 1, 4, 30, 3)]


def random_tree_codes(n: int, k: int, min_len: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[n + 2, max_len]`` prefix-free codes: ``n`` random leaves of a random tree.

    Row 0 is padding and row ``n + 1`` is an item without a code; both are all -1.
    """
    leaves, frontier = [], [[]]
    while frontier:
        prefix = frontier.pop()
        stop = len(prefix) >= min_len and (len(prefix) == max_len or torch.rand(1, generator=gen) < 0.3)
        if stop:
            leaves.append(prefix + [-1] * (max_len - len(prefix)))
            continue
        n_kids = k - int(torch.randint(2, (1,), generator=gen))
        frontier.extend(prefix + [int(c)] for c in torch.randperm(k, generator=gen)[:n_kids])
    assert len(leaves) >= n
    leaves = torch.tensor(leaves)[torch.randperm(len(leaves), generator=gen)[:n]]
    pad = torch.full((1, max_len), -1)
    return torch.cat([pad, leaves, pad])


class TinyModel:
    """Deterministic stand-in for the decoder: log_softmax(MLP(user context + prefix embedding))."""

    def __init__(self, n_users: int, k: int, max_len: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.context = torch.randn(n_users, HIDDEN, generator=gen, dtype=torch.float64)
        self.tok = torch.randn(max_len, k, HIDDEN, generator=gen, dtype=torch.float64)
        self.w1 = torch.randn(HIDDEN, HIDDEN, generator=gen, dtype=torch.float64)
        self.w2 = torch.randn(HIDDEN, k, generator=gen, dtype=torch.float64) * 2

    def log_probs(self, context: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        h = context.clone()
        for t in range(prefix.shape[1]):
            h = h + self.tok[t, prefix[:, t]]
        return torch.log_softmax(torch.tanh(h @ self.w1) @ self.w2, dim=-1)

    def step_fn(self, beam_size: int):
        context = self.context.repeat_interleave(beam_size, dim=0)
        return lambda prefix: self.log_probs(context, prefix)

    def brute_force(self, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-likelihood ``[n_users, n_items]`` (-inf for rows without a code)."""
        n_users, n_items = self.context.shape[0], codes.shape[0]
        context = self.context.repeat_interleave(n_items, dim=0)
        tokens = codes.repeat(n_users, 1)
        total = torch.zeros(n_users * n_items, dtype=torch.float64)
        for t in range(codes.shape[1]):
            lp = self.log_probs(context, tokens[:, :t].clamp(min=0))
            gathered = lp.gather(1, tokens[:, t : t + 1].clamp(min=0)).squeeze(1)
            total += torch.where(tokens[:, t] >= 0, gathered, torch.zeros_like(gathered))
        total[(tokens < 0).all(dim=1)] = float("-inf")
        return total.view(n_users, n_items)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"K{case[0]}-len{case[1]}to{case[2]}")
def setup(request):
    k, min_len, max_len, n, seed = request.param
    gen = torch.Generator().manual_seed(seed)
    codes = random_tree_codes(n, k, min_len, max_len, gen)
    lengths = (codes[1:-1] >= 0).sum(dim=1)
    assert set(lengths.tolist()) == set(range(min_len, max_len + 1)), "want every code length"
    return codes, CodeTrie(codes, k), TinyModel(6, k, max_len)




def n_real(codes: torch.Tensor) -> int:
    return int((codes >= 0).any(dim=1).sum())


def test_trie_walk_recovers_every_item(setup):
    codes, trie, _ = setup
    for i in range(1, codes.shape[0] - 1):
        node = torch.tensor([0])
        code = codes[i][codes[i] >= 0]
        for t, c in enumerate(code.tolist()):
            assert trie.children[t][node][0, c] >= 0
            assert trie.leaf_item[t][node].item() == -1
            node = trie.children[t][node, c]
        assert trie.leaf_item[len(code)][node].item() == i
    assert sum(int((leaf >= 0).sum()) for leaf in trie.leaf_item) == n_real(codes)


def test_leaf_children_pack_the_children_that_complete_items(setup):
    codes, trie, _ = setup
    for depth in range(trie.max_len):
        leaf_codes, leaf_items = trie.leaf_children(depth)
        child_items = trie.child_items(depth)
        counts = (child_items >= 0).sum(1)
        assert leaf_codes.shape == leaf_items.shape == (len(child_items), int(counts.max()))
        for node in range(len(child_items)):
            n = int(counts[node])
            expected = (child_items[node] >= 0).nonzero().squeeze(1)  # leaf codes, ascending
            assert torch.equal(leaf_codes[node, :n], expected)
            assert torch.equal(leaf_items[node, :n], child_items[node, expected])
            assert (leaf_codes[node, n:] == trie.K).all() and (leaf_items[node, n:] == 0).all()
            # each packed item's code is the node's prefix followed by its leaf code
            for code, item in zip(leaf_codes[node, :n].tolist(), leaf_items[node, :n].tolist()):
                assert codes[item, depth] == code and (depth + 1 == codes.shape[1] or codes[item, depth + 1] == -1)
    assert sum(int((trie.leaf_children(d)[1] > 0).sum()) for d in range(trie.max_len)) == n_real(codes)


@pytest.mark.parametrize("extra", [0, 5])
def test_wide_beam_matches_brute_force(setup, extra):
    """With beam >= number of items nothing is pruned, so the search is exact."""
    codes, trie, model = setup
    n = n_real(codes)
    items, scores = constrained_beam_search(model.step_fn(n + extra), trie, 6, n + extra)
    ref_scores, ref_items = model.brute_force(codes).topk(n, dim=1)
    assert torch.equal(items[:, :n], ref_items)
    torch.testing.assert_close(scores[:, :n], ref_scores)
    assert (items[:, n:] == 0).all() and torch.isneginf(scores[:, n:]).all()


def test_narrow_beam_items_real_distinct_sorted(setup):
    codes, trie, model = setup
    beam_size = 7
    items, scores = constrained_beam_search(model.step_fn(beam_size), trie, 6, beam_size)
    assert items.shape == scores.shape == (6, beam_size)
    assert ((items > 0) & (items < codes.shape[0] - 1)).all()
    assert all(len(set(row.tolist())) == beam_size for row in items)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    torch.testing.assert_close(scores, model.brute_force(codes).gather(1, items))


def test_scores_to_full(setup):
    codes, trie, model = setup
    n_items, beam_size = codes.shape[0], n_real(codes) + 5
    items, scores = constrained_beam_search(model.step_fn(beam_size), trie, 6, beam_size)
    full = scores_to_full(items, scores, n_items)
    assert full.shape == (6, n_items)
    assert torch.isneginf(full[:, 0]).all() and torch.isneginf(full[:, -1]).all()
    expected = torch.zeros(6, n_items, dtype=torch.bool).scatter_(1, items, True)
    expected[:, 0] = False
    assert torch.equal(torch.isfinite(full), expected)
    torch.testing.assert_close(full.gather(1, items[:, :-5]), scores[:, :-5])


def test_scores_to_full_never_scores_padding_item():
    inf = float("-inf")
    full = scores_to_full(torch.tensor([[3, 1], [3, 0]]), torch.tensor([[-1.0, inf], [-1.0, -2.0]]), 5)
    assert torch.equal(full, torch.tensor([[inf, inf, inf, -1.0, inf]] * 2))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([[0, 1, -1], [0, 1, -1]], "duplicate"),
        ([[0, 1, 2], [0, 1, 2]], "duplicate"),
        ([[0, 1, -1], [0, 1, 3]], "prefix"),
        ([[0, 1, 3], [0, -1, -1]], "prefix"),
        ([[0, 1, 5], [1, 1, 1]], r"\[0, 5\)"),
        ([[0, -1, 2], [1, 1, 1]], "padding"),
    ],
)
def test_invalid_codes_raise(rows, message):
    with pytest.raises(ValueError, match=message):
        CodeTrie(torch.tensor([[-1, -1, -1]] + rows), 5)


def test_nonpadding_row_zero_raises():
    with pytest.raises(ValueError, match="row 0"):
        CodeTrie(torch.tensor([[0, 1], [1, 1]]), 5)


def test_beam_size_below_one_raises(setup):
    _, trie, model = setup
    with pytest.raises(ValueError, match="beam_size"):
        constrained_beam_search(model.step_fn(1), trie, 6, 0)


def test_trie_builds_for_100k_items():
    gen = torch.Generator().manual_seed(0)
    n, k = 100_000, 256
    flat = torch.randint(k**3, (n + n // 4,), generator=gen).unique()[:n]
    flat = flat[torch.randperm(n, generator=gen)]
    codes = torch.stack([flat // k**2, flat // k % k, flat % k], dim=1)
    trie = CodeTrie(torch.cat([torch.full((1, 3), -1), codes]), k)
    assert trie.children[0].shape == (1, k) and trie.leaf_item[3].numel() == n
    assert int((trie.leaf_item[3] >= 0).sum()) == n
