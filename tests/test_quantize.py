"""Tests for recbole_prorec.quantize: uniqueness, tree consistency, profiles, errors."""
import numpy as np
import pytest
from sklearn.cluster import KMeans

from recbole_prorec.quantize import Codes, balanced_labels, hkmeans, quantize, random_codes, rqvae


def _blobs(n: int, dim: int = 8, centers: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=5.0, size=(centers, dim))
    return (means[rng.integers(centers, size=n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _assert_prefix_free(codes: list[tuple[int, ...]]) -> None:
    full = set(codes)
    assert len(full) == len(codes), "codes are not unique"
    for code in codes:
        assert not any(code[:cut] in full for cut in range(1, len(code))), f"{code} has a code prefix"


def _check_tree(emb, codes, members, depth, K, seed):
    """Re-run the k-means of every internal node: the code digit at ``depth`` must be its label."""
    sub = [codes[i] for i in members]
    if len(members) <= K:  # leaf level: own index, code ends here
        assert sorted(code[depth] for code in sub) == list(range(len(members)))
        assert all(len(code) == depth + 1 for code in sub)
        return
    labels = KMeans(n_clusters=K, n_init=1, max_iter=100, random_state=seed).fit(emb[members]).labels_
    assert [code[depth] for code in sub] == labels.tolist()
    for cluster in np.unique(labels):
        _check_tree(emb, codes, members[labels == cluster], depth + 1, K, seed)


def test_hkmeans_codes_follow_cluster_tree():
    emb, K, seed = _blobs(600), 8, 3
    result = quantize(emb, "hkmeans", K=K, seed=seed)
    assert result.stats["max_length"] >= 3
    assert result.stats["collisions_resolved"] == 0
    _assert_prefix_free(result.codes)
    _check_tree(emb, result.codes, np.arange(len(emb)), 0, K, seed)
    # every node of the prefix tree has at most K children
    for level in range(1, result.stats["max_length"]):
        children = {}
        for code in result.codes:
            if len(code) > level:
                children.setdefault(code[:level], set()).add(code[level])
        assert max(len(c) for c in children.values()) <= K
    assert quantize(emb, "hkmeans", K=K, seed=seed).codes == result.codes


def test_balanced_labels_fill_nearest_centres_up_to_capacity():
    rng = np.random.default_rng(0)
    dist = rng.random((103, 10))
    labels = balanced_labels(dist, capacity=11)
    assert labels.min() >= 0 and np.bincount(labels, minlength=10).max() <= 11
    # a point is never kept from a nearer centre that ended with room to spare
    counts = np.bincount(labels, minlength=10)
    nearer = dist < dist[np.arange(103), labels][:, None]
    assert not (nearer & (counts < 11)[None, :]).any()
    assert (balanced_labels(dist, capacity=103) == dist.argmin(1)).all()  # no cap: plain nearest centre
    # three points all nearest to centre 0, room for two: the farthest goes to its second choice
    dist = np.array([[0.1, 0.9], [0.2, 0.5], [0.3, 0.4]])
    assert balanced_labels(dist, capacity=2).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="2 clusters of at most 1 cannot hold 3 points"):
        balanced_labels(dist, capacity=1)


def test_balanced_hkmeans_caps_every_cluster():
    emb, K = _blobs(600), 8  # 20 blobs of unequal size: plain k-means clusters differ in size
    plain, balanced = hkmeans(emb, K=K, seed=3), hkmeans(emb, K=K, seed=3, balanced=True)
    _assert_prefix_free(balanced.codes)
    assert len(balanced.codes) == 600

    def sizes(codes, depth):  # items under each prefix of length depth
        return np.unique([code[:depth] for code in codes], axis=0, return_counts=True)[1]

    assert sizes(balanced.codes, 1).max() <= -(-600 // K) < sizes(plain.codes, 1).max()


def test_hkmeans_duplicate_points_get_unique_codes():
    emb = np.concatenate([_blobs(50), np.repeat(_blobs(1, seed=9), 40, axis=0)])
    result = hkmeans(emb, K=8, seed=1)
    _assert_prefix_free(result.codes)
    assert result.stats["collisions_resolved"] == 40
    dup_codes = result.codes[50:]
    assert len({code[:-2] for code in dup_codes}) == 1  # one unsplittable node, 2 enumeration digits


def test_hkmeans_all_identical_and_small_inputs():
    same = hkmeans(np.ones((30, 4), dtype=np.float32), K=4, seed=0)
    assert len(set(same.codes)) == 30
    assert same.stats["length_histogram"] == {3: 30}  # 4**3 >= 30
    small = hkmeans(_blobs(5), K=8)
    assert sorted(small.codes) == [(i,) for i in range(5)]


def test_rqvae_unique_fixed_length_and_deterministic():
    emb = _blobs(300, centers=30)
    first = rqvae(emb, K=16, levels=3, seed=5, epochs=3, hidden_dims=(32,), latent_dim=8)
    _assert_prefix_free(first.codes)
    lengths = {len(code) for code in first.codes}
    groups = {}
    for code in first.codes:
        groups.setdefault(code[:3], []).append(code)
    if max(map(len, groups.values())) <= 16:
        assert lengths == {4}
    # collided items are exactly those sharing a 3-level prefix
    assert first.stats["collisions_resolved"] == sum(len(g) for g in groups.values() if len(g) > 1)
    second = rqvae(emb, K=16, levels=3, seed=5, epochs=3, hidden_dims=(32,), latent_dim=8)
    assert second.codes == first.codes


def test_rqvae_overflowing_collisions_extend_codes():
    emb = np.concatenate([_blobs(20), np.repeat(_blobs(1, seed=4), 20, axis=0)])
    result = quantize(emb, "rqvae", K=8, seed=0, levels=2, epochs=2, hidden_dims=(16,),
                      latent_dim=4)
    _assert_prefix_free(result.codes)
    assert result.stats["collisions_resolved"] >= 20
    assert max(len(code) for code in result.codes[20:]) == 4  # 20 > K: two extra digits


def test_random_codes_match_profile_and_default_length():
    reference = hkmeans(_blobs(600), K=8, seed=3)
    profile = [len(code) for code in reference.codes]
    result = quantize(_blobs(600), "random", K=8, seed=1, length_profile=profile)
    assert [len(code) for code in result.codes] == profile
    _assert_prefix_free(result.codes)
    assert result.codes != reference.codes
    default = random_codes(600, None, K=8, seed=1)
    assert {len(code) for code in default.codes} == {4}  # 8**3 = 512 < 600
    _assert_prefix_free(default.codes)
    full = random_codes(64, None, K=8, seed=2)  # exactly fills 8**2
    assert sorted(full.codes) == [(a, b) for a in range(8) for b in range(8)]


def test_random_codes_reject_impossible_profile():
    with pytest.raises(ValueError, match="length_profile"):
        random_codes(9, [1] * 9, K=8, seed=0)
    with pytest.raises(ValueError, match="length_profile"):
        random_codes(3, [1, 2], K=8, seed=0)


def test_codes_helpers():
    codes = Codes([(1, 2), (3,), (0, 0, 1)], codebook_size=4)
    np.testing.assert_array_equal(codes.as_array(), [[1, 2, -1], [3, -1, -1], [0, 0, 1]])
    assert codes.to_strings() == ["1 2", "3", "0 0 1"]
    assert codes.stats["length_histogram"] == {1: 1, 2: 1, 3: 1}
    assert codes.stats["usage_per_level"] == [0.75, 0.5, 0.25]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "hkmeans", "K": 1}, "codebook_size"),
        ({"method": "kmeans++", "K": 8}, "quantizer"),
    ],
)
def test_quantize_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(_blobs(20), **kwargs)


@pytest.mark.parametrize(
    "emb",
    [np.ones(5, dtype=np.float32), np.ones((5, 2), dtype=np.int64),
     np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32)],
)
def test_quantize_rejects_bad_embeddings(emb):
    with pytest.raises(ValueError, match="[Ee]mbeddings"):
        quantize(emb, "hkmeans", K=8)


def test_progress_bars_follow_show_progress(capsys):
    emb = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    quantize(emb, "hkmeans", K=4, show_progress=False)
    quantize(emb, "rqvae", K=4, epochs=1, show_progress=False)
    err = capsys.readouterr().err
    assert "k-means" not in err and "RQ-VAE" not in err
    quantize(emb, "hkmeans", K=4, show_progress=True)
    assert "Hierarchical k-means" in capsys.readouterr().err
