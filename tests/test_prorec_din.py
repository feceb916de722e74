"""Stage I model: modality adaptation (AdaLN), InfoNCE alignment, DIN's activation unit, PRORecDIN."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_recbole
from recbole_prorec.prorec_din import DINActivationUnit, ModalityAdaptation, PRORecDIN, info_nce


# --------------------------------------------------------------------------- MAL / AdaLN


def test_mal_output_shape_and_plain_normalised_projection_at_init():
    torch.manual_seed(0)
    mal = ModalityAdaptation(24, 16)
    x = torch.randn(5, 7, 24)
    out = mal(x)
    assert out.shape == (5, 7, 16)
    # zero-initialised modulation: exactly LN(W x + b), i.e. zero mean and unit variance per row
    expected = F.layer_norm(mal.proj(x), (16,))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.mean(-1), torch.zeros(5, 7), atol=1e-5, rtol=0)


def test_mal_scale_and_shift_depend_on_the_input():
    torch.manual_seed(1)
    mal = ModalityAdaptation(24, 16)
    nn.init.zeros_(mal.proj.bias)
    x1 = torch.randn(3, 24)
    x2 = 3.0 * x1  # same direction: LN(W x) is identical for both
    close = dict(atol=1e-3, rtol=0)  # LayerNorm's eps makes the scale invariance inexact
    torch.testing.assert_close(F.layer_norm(mal.proj(x1), (16,)), F.layer_norm(mal.proj(x2), (16,)), **close)
    torch.testing.assert_close(mal(x1), mal(x2), **close)  # at init nothing but the normalised projection

    with torch.no_grad():
        mal.modulation.weight.normal_(std=0.2)
        mal.modulation.bias.normal_(std=0.2)
    out1, out2 = mal(x1), mal(x2)
    assert (out1 - out2).abs().max() > 0.1, "AdaLN scale/shift ignore the raw input"
    # and the documented form: LN(W x + b) * (1 + gamma(x)) + beta(x)
    gamma, beta = mal.modulation(x2).chunk(2, dim=-1)
    torch.testing.assert_close(out2, F.layer_norm(mal.proj(x2), (16,)) * (1 + gamma) + beta)
    # LayerNorm has no affine parameters of its own
    assert not list(mal.norm.parameters())


def test_mal_gradients_reach_the_zero_initialised_modulation():
    torch.manual_seed(2)
    mal = ModalityAdaptation(24, 16)
    target = torch.randn(8, 16)
    loss = ((mal(torch.randn(8, 24)) - target) ** 2).mean()
    loss.backward()
    for name in ("weight", "bias"):
        grad = getattr(mal.modulation, name).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient to modulation.{name}"
    assert mal.proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- InfoNCE (CKA)


def test_info_nce_is_log_batch_at_random_init():
    torch.manual_seed(3)
    batch = 64
    loss = info_nce(torch.randn(batch, 32), torch.randn(batch, 32), tau=1.0)
    assert abs(loss.item() - math.log(batch)) < 0.3


def test_info_nce_is_low_for_aligned_pairs_and_symmetric_in_scale():
    torch.manual_seed(4)
    a = torch.randn(16, 8)
    aligned = info_nce(a, 5 * a, tau=0.1)  # cosine similarity: scale does not matter
    assert aligned.item() < 0.1
    torch.testing.assert_close(aligned, info_nce(a, a, tau=0.1))


def test_cka_loss_falls_when_mal_and_embeddings_are_trained():
    """A small MAL + ID embedding table learns to align with random 'semantic' vectors."""
    torch.manual_seed(5)
    n, sem_dim, dim = 64, 24, 16
    semantic = torch.randn(n, sem_dim)
    ids = nn.Embedding(n, dim)
    mal = ModalityAdaptation(sem_dim, dim)
    optim = torch.optim.Adam([*ids.parameters(), *mal.parameters()], lr=0.01)
    losses = []
    for _ in range(100):
        batch = torch.randperm(n)[:32]
        loss = info_nce(ids(batch), mal(semantic[batch]), tau=0.1)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[0] > 2.5  # ~ log(32) = 3.47 at random init
    assert sum(losses[-10:]) / 10 < 0.3 * losses[0]


# --------------------------------------------------------------------------- activation unit


def naive_activation(unit: DINActivationUnit, first: nn.Linear, history, mask, candidates):
    """DIN's unit written out: MLP([h, t, h - t, h * t]) over explicit concatenations."""
    B, L, d = history.shape
    if candidates.dim() == 2:
        candidates = candidates.expand(B, -1, -1)
    C = candidates.shape[1]
    h = history[:, None].expand(B, C, L, d)
    t = candidates[:, :, None].expand(B, C, L, d)
    features = torch.cat([h, t, h - t, h * t], dim=-1)  # [B, C, L, 4d]
    weights = unit.mlp(first(features)).squeeze(-1)
    weights = weights.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bcl,bld->bcd", weights, history)


@pytest.mark.parametrize("shared_candidates", [False, True], ids=["candidates_BCd", "candidates_Cd"])
def test_activation_unit_factored_form_equals_concatenation(shared_candidates):
    torch.manual_seed(6)
    d, first_size = 6, 5
    unit = DINActivationUnit(d, [first_size, 4])
    # one explicit first layer over [h, t, h - t, h * t]; fold it into the unit's factored weights
    first = nn.Linear(4 * d, first_size)
    A, Bw, Cw, D = first.weight.detach().split(d, dim=1)
    with torch.no_grad():
        unit.hist.weight.copy_(A + Cw)
        unit.hist.bias.copy_(first.bias)
        unit.target.weight.copy_(Bw - Cw)
        unit.product.copy_(D.T)
        for p in unit.mlp.parameters():  # non-trivial PReLU slopes and deeper layers
            p.add_(0.3 * torch.randn_like(p))
    B, L, C = 3, 7, 4
    history = torch.randn(B, L, d)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 1:] = False  # a user with a single history item
    candidates = torch.randn(C, d) if shared_candidates else torch.randn(B, C, d)
    got = unit(history, mask, candidates)
    assert got.shape == (B, C, d)
    torch.testing.assert_close(got, naive_activation(unit, first, history, mask, candidates))
    # padding positions get no weight: changing them changes nothing
    history2 = history.clone()
    history2[0, 5:] = 100.0
    torch.testing.assert_close(unit(history2, mask, candidates), got)


# --------------------------------------------------------------------------- PRORecDIN on tiny


@pytest.fixture(scope="module")
def din(tiny_overrides):
    config, _, (train, valid, test) = build_recbole("PRORecDIN", tiny_overrides())
    torch.manual_seed(0)
    return config, PRORecDIN(config, train._dataset), train, test


def test_din_losses_are_two_finite_scalars(din):
    _, model, train, _ = din
    model.train()
    batch = next(iter(train))
    losses = model.calculate_loss(batch)
    assert isinstance(losses, tuple) and len(losses) == 2
    for loss in losses:
        assert loss.dim() == 0 and torch.isfinite(loss)
    assert losses[1].item() > 0  # CKA is on (cka_weight = 1)
    # at init both are close to their chance levels: log(1 + negatives) and log(batch items)
    assert abs(losses[0].item() - math.log(1 + model.neg_samples)) < 1.0


@pytest.fixture
def din_eval(din):
    """The DIN in eval mode and a fresh first test batch."""
    _, model, _, test = din
    return model.eval(), next(iter(test))[0]


def test_din_full_sort_predict_equals_predict(din_eval):
    model, batch = din_eval
    with torch.no_grad():
        full = model.full_sort_predict(batch)
        assert full.shape == (len(batch), model.n_items)
        assert torch.isfinite(full[:, 1:]).all()
        # the target column, then a few other items for every user
        torch.testing.assert_close(full.gather(1, batch[model.ITEM_ID][:, None]).squeeze(1), model.predict(batch))
        for item in (1, 7, model.n_items - 1):
            batch[model.ITEM_ID] = torch.full_like(batch[model.ITEM_ID], item)
            torch.testing.assert_close(full[:, item], model.predict(batch))


def test_din_item_bias_adds_to_every_users_score(din_eval):
    """The per-item bias is DIN's popularity channel: it shifts that item's score for all users."""
    model, batch = din_eval
    with torch.no_grad():
        before = model.full_sort_predict(batch)
        model.item_bias.weight[5] += 2.5
        try:
            after = model.full_sort_predict(batch)
        finally:
            model.item_bias.weight[5] -= 2.5
    torch.testing.assert_close(after[:, 5], before[:, 5] + 2.5)
    others = torch.arange(model.n_items) != 5
    torch.testing.assert_close(after[:, others], before[:, others])
    assert model.item_bias.weight[0].abs().sum() == 0  # padding has no bias


def test_din_training_lowers_next_item_loss(tiny_overrides):
    config, _, (train, _, _) = build_recbole("PRORecDIN", tiny_overrides())
    torch.manual_seed(0)
    model = PRORecDIN(config, train._dataset)

    def mean_losses():
        model.eval()
        torch.manual_seed(123)  # same sampled negatives every time
        with torch.no_grad():
            parts = [model.calculate_loss(b) for b in train]
        return [sum(p[i].item() for p in parts) / len(parts) for i in range(2)]

    nip0, cka0 = mean_losses()
    # CKA (tau 0.1) dominates the first steps; a high rate lets next-item learning show quickly
    optim = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(10):  # ~ 110 steps
        for batch in train:
            nip, cka = model.calculate_loss(batch)
            optim.zero_grad()
            (nip + cka).backward()
            optim.step()
    nip1, cka1 = mean_losses()
    assert nip1 < 0.8 * nip0, (nip0, nip1)
    assert cka1 < cka0, (cka0, cka1)
