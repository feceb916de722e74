"""Item embeddings -> unique discrete codes ("unicodes") for generative retrieval.

Three quantizers share the ``Codes`` result:

* ``hkmeans`` (the paper's choice): hierarchical k-means, variable-length, prefix-free codes.
* ``rqvae``: a residual-quantized VAE as in TIGER, plus one disambiguating level.
* ``random``: random prefix-free codes, a reference without semantics.
"""
from __future__ import annotations

import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import Logger, getLogger

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from tqdm import tqdm

logger = getLogger()

METHODS = ("hkmeans", "rqvae", "random")


@dataclass
class Codes:
    """One code (tuple of ints in [0, K)) per item, in item order, with quantization stats."""

    codes: list[tuple[int, ...]]
    codebook_size: int
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stats:
            self.stats = _code_stats(self.codes, self.codebook_size, 0)

    @property
    def max_length(self) -> int:
        return max((len(code) for code in self.codes), default=0)

    def as_array(self, pad: int = -1) -> np.ndarray:
        """[n_items, max_length] int64 array, shorter codes right-padded with ``pad``."""
        array = np.full((len(self.codes), self.max_length), pad, dtype=np.int64)
        for row, code in enumerate(self.codes):
            array[row, : len(code)] = code
        return array

    def to_strings(self) -> list[str]:
        return [" ".join(map(str, code)) for code in self.codes]

    def log_stats(self, log: Logger | None = None) -> None:
        stats = self.stats
        usage = ", ".join(f"{u:.1%}" for u in stats["usage_per_level"])
        (log or logger).info(
            f"Codes for {len(self.codes)} items (K={self.codebook_size}): "
            f"lengths {stats['length_histogram']}, max length {stats['max_length']}, "
            f"collisions resolved {stats['collisions_resolved']}, code usage per level [{usage}]"
        )


def _code_stats(codes: list[tuple[int, ...]], K: int, collisions: int) -> dict:
    max_length = max((len(code) for code in codes), default=0)
    usage = [len({code[level] for code in codes if len(code) > level}) / K
             for level in range(max_length)]
    return {
        "length_histogram": dict(sorted(Counter(len(code) for code in codes).items())),
        "collisions_resolved": collisions,
        "usage_per_level": usage,
        "max_length": max_length,
    }


def _make_codes(codes: list[tuple[int, ...]], K: int, collisions: int) -> Codes:
    """Wrap codes after checking the invariants every quantizer promises."""
    if len(set(codes)) != len(codes):
        raise RuntimeError("Quantizer produced duplicate codes")
    if any(not 0 <= c < K for code in codes for c in code):
        raise RuntimeError(f"Quantizer produced codes outside [0, {K})")
    return Codes(codes, K, _code_stats(codes, K, collisions))


def _digits(value: int, base: int, length: int) -> tuple[int, ...]:
    """Big-endian base-``base`` digits of ``value``, zero-padded to ``length``."""
    out = []
    for _ in range(length):
        value, digit = divmod(value, base)
        out.append(digit)
    return tuple(reversed(out))


def _min_length(n: int, K: int) -> int:
    """Smallest L >= 1 with K**L >= n (integer arithmetic, no float log error)."""
    length = 1
    while K**length < n:
        length += 1
    return length


# --------------------------------------------------------------------------- hkmeans


def _kmeans(points: np.ndarray, K: int, seed: int, n_init: int, max_iter: int) -> KMeans:
    with warnings.catch_warnings():  # duplicate points: fewer distinct clusters is handled
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=K, n_init=n_init, max_iter=max_iter, random_state=seed).fit(points)


def balanced_labels(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Cluster of each point [n] given its distances to the centres [n, K], no cluster holding
    more than ``capacity`` points (K * capacity >= n). In rounds, every unplaced point proposes
    to its nearest centre with room and each centre keeps its closest proposers up to its room,
    so points go to their nearest centre whenever capacity allows."""
    n, K = dist.shape
    if K * capacity < n:
        raise ValueError(f"{K} clusters of at most {capacity} cannot hold {n} points")
    dist = dist.astype(np.float64, copy=True)
    labels, room = np.full(n, -1), np.full(K, capacity)
    while (free := np.flatnonzero(labels < 0)).size:
        choice = dist[free].argmin(1)
        order = np.lexsort((dist[free, choice], choice))  # by centre, closest first
        chosen = choice[order]
        rank = np.arange(len(order)) - np.searchsorted(chosen, chosen)  # place in its centre's queue
        keep = rank < room[chosen]
        labels[free[order[keep]]] = chosen[keep]
        room -= np.bincount(chosen[keep], minlength=K)
        dist[:, room == 0] = np.inf
    return labels


def hkmeans(emb: np.ndarray, K: int = 256, seed: int = 2020, n_init: int = 1,
            max_iter: int = 100, show_progress: bool = True, balanced: bool = False) -> Codes:
    """Hierarchical k-means codes, as in PRORec.

    K-means with K clusters splits every node holding more than K items; the code is the
    cluster index at each level. A node with at most K items is a leaf level: its items get
    indices 0..m-1 (so a singleton cluster still adds one level, index 0). Children of a node
    are therefore all clusters or all leaves, which makes the codes prefix-free and of variable
    length. Items sharing a length-l prefix were in the same cluster at level l.

    A node k-means cannot split (all its points identical) is enumerated with fixed-length
    base-K indices; its items count as ``collisions_resolved``. ``balanced`` caps every cluster
    at ceil(items / K) (``balanced_labels`` on k-means' centres), so a level's codes are equally
    likely a priori and no leaf node has more than that many children. Full-batch sklearn KMeans with
    ``n_init=1`` is used: most nodes are small, and on 2 cores one 12k x 64 top-level fit
    takes seconds, so MiniBatchKMeans' noisier clusters are not worth it.
    """
    n = emb.shape[0]
    codes: list[tuple[int, ...] | None] = [None] * n
    collisions = 0
    stack: list[tuple[np.ndarray, tuple[int, ...]]] = [(np.arange(n), ())]
    progress = tqdm(total=n, desc="Hierarchical k-means", disable=not show_progress)
    while stack:
        members, prefix = stack.pop()
        if len(members) <= K:
            _assign(codes, members, prefix, K)
            progress.update(len(members))
            continue
        fitted = _kmeans(emb[members], K, seed, n_init, max_iter)
        labels = fitted.labels_
        if balanced:
            labels = balanced_labels(fitted.transform(emb[members]), -(-len(members) // K))
        clusters = np.unique(labels)
        if len(clusters) == 1:  # identical points: k-means cannot separate them
            _assign(codes, members, prefix, K)
            collisions += len(members)
            progress.update(len(members))
            continue
        for cluster in clusters[::-1]:
            stack.append((members[labels == cluster], prefix + (int(cluster),)))
    progress.close()
    return _make_codes(codes, K, collisions)


def _assign(codes: list, members: np.ndarray, prefix: tuple[int, ...], K: int) -> None:
    """Give ``members`` consecutive fixed-length indices under ``prefix`` (one digit if <= K)."""
    length = _min_length(len(members), K)
    for rank, item in enumerate(members):
        codes[item] = prefix + _digits(rank, K, length)


# --------------------------------------------------------------------------- rqvae


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _RQVAE(nn.Module):
    """Encoder MLP -> ``levels`` residual codebooks -> decoder MLP."""

    def __init__(self, in_dim: int, hidden_dims: list[int], latent_dim: int, K: int,
                 levels: int, beta: float) -> None:
        super().__init__()
        self.encoder = _mlp([in_dim, *hidden_dims, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden_dims), in_dim])
        self.codebooks = nn.ParameterList(
            nn.Parameter(torch.randn(K, latent_dim) * 0.01) for _ in range(levels))
        self.beta = beta

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int) -> None:
        """K-means init on a first sample avoids dead codes from a random codebook."""
        residual = self.encoder(x)
        for codebook in self.codebooks:
            K = codebook.shape[0]
            n_clusters = min(K, len(residual))
            fitted = _kmeans(residual.cpu().numpy(), n_clusters, seed, 1, 50)
            centers = torch.as_tensor(fitted.cluster_centers_, dtype=residual.dtype,
                                      device=residual.device)
            if n_clusters < K:  # small batch: fill with jittered copies of random centers
                extra = centers[torch.randint(n_clusters, (K - n_clusters,))]
                centers = torch.cat([centers, extra + 0.01 * torch.randn_like(extra)])
            codebook.copy_(centers)
            residual = residual - centers[self._nearest(residual, centers)]

    @staticmethod
    def _nearest(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return torch.cdist(residual, codebook).argmin(1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return straight-through quantized latent, codes [b, levels] and codebook loss."""
        residual, quantized = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        for codebook in self.codebooks:
            index = self._nearest(residual.detach(), codebook)
            chosen = codebook[index]
            loss = loss + ((chosen - residual.detach()) ** 2).mean() \
                + self.beta * ((residual - chosen.detach()) ** 2).mean()
            quantized = quantized + chosen
            residual = residual - chosen.detach()
            codes.append(index)
        return z + (quantized - z).detach(), torch.stack(codes, 1), loss

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quantized, _, quant_loss = self.quantize(self.encoder(x))
        recon_loss = ((self.decoder(quantized) - x) ** 2).mean()
        return recon_loss, quant_loss


def rqvae(emb: np.ndarray, K: int = 256, levels: int = 3, seed: int = 2020, epochs: int = 50,
          hidden_dims: tuple[int, ...] = (256, 128), latent_dim: int = 32, lr: float = 1e-3,
          batch_size: int = 256, beta: float = 0.25, device: str = "cpu", show_progress: bool = True) -> Codes:
    """Residual-quantized VAE codes, TIGER style, of length ``levels + 1``.

    Inputs are centred and scaled by their global std so one learning rate fits any encoder.
    Training uses reconstruction MSE + codebook/commitment losses (``beta``) with a
    straight-through estimator; codebooks are k-means initialised on a first random sample of
    max(batch_size, 4K) items.

    Final level: items sharing their ``levels`` codes get 0, 1, 2, ... (by item order) as an
    extra code, and items with unique codes get 0, so every code has length ``levels + 1``.
    Colliding items count as ``collisions_resolved``. If more than K items share a prefix, that
    group's extra level uses as many base-K digits as needed (longer codes, still unique and
    prefix-free) and a warning is logged.
    """
    if levels < 1:
        raise ValueError(f"rqvae levels must be >= 1, got {levels}")
    x_all = torch.as_tensor(emb, dtype=torch.float32)
    x_all = (x_all - x_all.mean(0)) / x_all.std(correction=0).clamp(min=1e-8)
    # seed locally, leaving the caller's RNG alone
    with torch.random.fork_rng(devices=[]), _cpu_threads(device):
        torch.manual_seed(seed)
        model = _RQVAE(x_all.shape[1], list(hidden_dims), latent_dim, K, levels, beta).to(device)
        x_all = x_all.to(device)
        prefixes = _train_rqvae(model, x_all, epochs, lr, batch_size, seed, show_progress)
    return _disambiguate(prefixes, K)


@contextmanager
def _cpu_threads(device: str, n_threads: int = 1) -> Iterator[None]:
    """Run tiny-model CPU training single-threaded: with busy cores, intra-op threading made
    each step ~100x slower (spin-waiting) while one thread gives ~4 ms steps."""
    previous = torch.get_num_threads()
    if str(device).startswith("cpu"):
        torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_rqvae(model: _RQVAE, x: torch.Tensor, epochs: int, lr: float, batch_size: int,
                 seed: int, show_progress: bool = True) -> np.ndarray:
    """Train, then return the [n, levels] codes of every item."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    # init sample: several points per code, else level 1 would just memorise the sample
    init_size = max(batch_size, 4 * model.codebooks[0].shape[0])
    model.init_codebooks(x[torch.randperm(len(x), device=x.device)[:init_size]], seed)
    for _ in tqdm(range(epochs), desc="Training RQ-VAE", disable=not show_progress):
        for batch in torch.randperm(len(x), device=x.device).split(batch_size):
            recon_loss, quant_loss = model(x[batch])
            optimizer.zero_grad()
            (recon_loss + quant_loss).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        recon_loss, quant_loss = model(x)
        _, codes, _ = model.quantize(model.encoder(x))
    logger.info(f"RQ-VAE reconstruction loss {recon_loss.item():.4f}, "
                f"quantization loss {quant_loss.item():.4f}")
    return codes.cpu().numpy()


def _disambiguate(prefixes: np.ndarray, K: int) -> Codes:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for item, prefix in enumerate(map(tuple, prefixes.tolist())):
        groups[prefix].append(item)
    codes: list[tuple[int, ...] | None] = [None] * len(prefixes)
    for prefix, members in groups.items():
        _assign(codes, np.asarray(members), prefix, K)
    sizes = np.array([len(members) for members in groups.values()])
    if (sizes > K).any():
        logger.warning(f"{(sizes > K).sum()} RQ-VAE code prefixes are shared by more than K={K} "
                       f"items (max {sizes.max()}); their disambiguating level uses several digits")
    return _make_codes(codes, K, int(sizes[sizes > 1].sum()))


# --------------------------------------------------------------------------- random


def random_codes(n_items: int, length_profile: list[int] | None = None, K: int = 256,
                 seed: int = 2020) -> Codes:
    """Uniformly random unique, prefix-free codes.

    Item i gets a code of length ``length_profile[i]`` (pass the lengths of a reference
    ``Codes`` to match its profile); by default all codes have the minimal length
    ceil(log_K n). Lengths are filled shortest first: a code of length l is drawn uniformly
    from the length-l codes that neither equal nor extend an already drawn code.
    """
    lengths = np.asarray(length_profile if length_profile is not None
                         else [_min_length(n_items, K)] * n_items, dtype=np.int64)
    if len(lengths) != n_items:
        raise ValueError(f"length_profile has {len(lengths)} entries for {n_items} items")
    if n_items and (lengths.min() < 1 or K ** int(lengths.max()) >= 2**62):
        raise ValueError(f"length_profile lengths must be in [1, log_K(2^62)), K={K}")
    rng = np.random.default_rng(seed)
    codes: list[tuple[int, ...] | None] = [None] * n_items
    drawn: list[tuple[int, int]] = []  # (value, length) of codes already drawn
    for length in np.unique(lengths):
        length = int(length)
        items = np.flatnonzero(lengths == length)
        values = _draw_free(rng, drawn, length, len(items), K)
        for item, value in zip(items, values.tolist()):
            codes[item] = _digits(value, K, length)
        drawn.extend((value, length) for value in values.tolist())
    return _make_codes(codes, K, 0)


def _draw_free(rng: np.random.Generator, drawn: list[tuple[int, int]], length: int, m: int,
               K: int) -> np.ndarray:
    """Draw m distinct length-``length`` codes (as ints) outside the blocked intervals.

    A drawn code c of length l' <= length blocks the disjoint interval
    [c * K^(length-l'), (c+1) * K^(length-l')) of length-``length`` codes.
    """
    intervals = sorted((value * K ** (length - n), K ** (length - n)) for value, n in drawn)
    starts = np.array([start for start, _ in intervals], dtype=np.int64)
    sizes = np.array([size for _, size in intervals], dtype=np.int64)
    free = K**length - int(sizes.sum())
    if free < m:
        raise ValueError(f"length_profile cannot be realised: {m} codes of length {length} "
                         f"needed, {free} free (K={K})")
    ranks = np.sort(rng.choice(free, size=m, replace=False))
    # free codes before each blocked interval; a rank >= that skips the interval
    free_before = starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    skipped = np.searchsorted(free_before, ranks, side="right")
    offset = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return rng.permutation(ranks + offset[skipped])


# --------------------------------------------------------------------------- dispatcher


def check_quantizer(method: str, K: int) -> None:
    """Refuse a quantizer or codebook size that cannot work (Stage I asks before it trains)."""
    if method not in METHODS:
        raise ValueError(f"Unknown quantizer '{method}'; choose one of {METHODS}")
    if K < 2:
        raise ValueError(f"codebook_size (K) must be >= 2, got {K}")


def quantize(emb: np.ndarray, method: str = "hkmeans", K: int = 256, seed: int = 2020,
             **method_kwargs) -> Codes:
    """Quantize item embeddings [n, d] with ``method`` (the ``quantizer`` config key)."""
    check_quantizer(method, K)
    emb = np.asarray(emb)
    if emb.ndim != 2 or emb.shape[0] == 0 or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"Embeddings to quantize must be a non-empty 2-D float array, "
                         f"got shape {emb.shape} dtype {emb.dtype}")
    if not np.isfinite(emb).all():
        raise ValueError("Embeddings to quantize contain NaN or inf")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    start = time.time()
    if method == "hkmeans":
        codes = hkmeans(emb, K, seed, **method_kwargs)
    elif method == "rqvae":
        codes = rqvae(emb, K, seed=seed, **method_kwargs)
    else:
        codes = random_codes(emb.shape[0], K=K, seed=seed, **method_kwargs)
    logger.info(f"Quantized {emb.shape[0]} items with {method} in {time.time() - start:.1f}s")
    codes.log_stats()
    return codes
