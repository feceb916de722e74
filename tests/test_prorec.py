"""Stage II: PRORec's constrained beam search, scoring hooks, IKD, training and bad input."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from recbole.data.interaction import Interaction

from conftest import DATASET, build_recbole, make_prorec
from recbole_prorec.prorec import PRORec, id_dropout_share
from recbole_prorec.trainer import SafeTrainer


def randomise(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Spread the weights so code likelihoods differ clearly (no near-ties to reorder)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def first_batch(loader) -> Interaction:
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def brute_force(model: PRORec, batch: Interaction) -> torch.Tensor:
    """[B, n_items] log-likelihood of every real item's code via ``predict`` (column 0: -inf)."""
    B, n = len(batch), model.n_items - 1
    items = torch.arange(1, model.n_items).repeat(B)
    expanded = Interaction({
        model.ITEM_SEQ: batch[model.ITEM_SEQ].repeat_interleave(n, 0),
        model.ITEM_SEQ_LEN: batch[model.ITEM_SEQ_LEN].repeat_interleave(n, 0),
        model.ITEM_ID: items,
    })
    with torch.no_grad():
        scores = model.predict(expanded).view(B, n)
    return torch.cat([torch.full((B, 1), float("-inf")), scores], dim=1)


# --------------------------------------------------------------------------- encoder packing


@pytest.mark.parametrize("history_tokens", ["codes", "item"])
def test_a_users_scores_do_not_depend_on_the_rest_of_the_batch(stage2, history_tokens):
    """The encoder packs real history tokens; padding and batch neighbours must not leak in."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2, history_tokens=history_tokens), seed=3, std=0.1).eval()
    batch = first_batch(train)
    lengths = batch[model.ITEM_SEQ_LEN]
    assert lengths.min() < lengths.max()  # the batch mixes short and long histories
    with torch.no_grad():
        together = model.predict(batch)
        for i in torch.argsort(lengths)[[0, -1]].tolist():
            alone = Interaction({k: batch[k][i : i + 1] for k in (model.ITEM_SEQ, model.ITEM_SEQ_LEN, model.ITEM_ID)})
            torch.testing.assert_close(model.predict(alone), together[i : i + 1], rtol=1e-5, atol=1e-5)
            # history padding holds item 0 whatever the width: widening it changes nothing
            alone[model.ITEM_SEQ] = torch.cat([alone[model.ITEM_SEQ], torch.zeros_like(alone[model.ITEM_SEQ])], 1)
            torch.testing.assert_close(model.predict(alone), together[i : i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("last_code_token", ["item", "shared"])
def test_item_history_tokens_are_the_sums_of_each_items_code_embeddings(stage2, last_code_token):
    """``history_tokens: item``: the encoder reads one token per real history item (not one per
    code token), the sum of the embeddings of the item's code tokens plus its recency position."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2, history_tokens="item", last_code_token=last_code_token), 4, 0.1).eval()
    batch = first_batch(train)
    seq, lengths = batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN]
    seen = []
    model.encoder[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        _, mask = model.encode(batch, queries=1)
        table = model.token_table()
    assert torch.equal(mask.sum((1, 2, 3)), lengths)
    expected = []
    for row, n in zip(seq, lengths.tolist()):
        for position, item in enumerate(row[:n].tolist()):
            tokens = model.item_tokens[item]
            expected.append(table[tokens[tokens != 0]].sum(0) + model.item_position.weight[n - 1 - position])
    torch.testing.assert_close(seen[0], torch.stack(expected))


# --------------------------------------------------------------------------- beam search


FORMS = {"item": {"integrated_item_tokens": False}, "shared": {"last_code_token": "shared"}, "integrated": {},
         "item history": {"history_tokens": "item"}, "plain likelihood": {"item_temperature": 1.0},
         "shared, temperature 0.5": {"last_code_token": "shared", "item_temperature": 0.5},
         "integrated, no ID dropout": {"item_id_dropout": 0.0, "item_id_dropout_start": None}}


@pytest.mark.parametrize("seed,form", [(0, "item"), (1, "item"), (0, "shared"), (1, "shared"), (0, "integrated"),
                                       (0, "item history"), (0, "plain likelihood"), (0, "shared, temperature 0.5")])
def test_beam_search_is_the_brute_force_top_k(stage2, seed, form):
    """With beam_size >= n_items nothing is pruned: beams = exact top-k of all code likelihoods
    (the ranking ones, with ``item_temperature``, which ``predict`` uses too)."""
    config, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, beam_size=48, **FORMS[form]), seed).eval()
    assert model.beam_size >= model.n_items - 1
    assert len(set((model.codes[1:] >= 0).sum(1).tolist())) > 1  # codes of 2 and 3 levels are mixed
    batch = first_batch(test)
    items, scores = model.beam_search(batch)
    exact = brute_force(model, batch)
    n_real = model.n_items - 1
    top_scores, top_items = exact.topk(n_real, dim=1)
    assert items.shape == (len(batch), model.beam_size)
    torch.testing.assert_close(items[:, :n_real], top_items)
    torch.testing.assert_close(scores[:, :n_real], top_scores, rtol=1e-4, atol=1e-4)
    # slots beyond the number of items are empty
    assert (items[:, n_real:] == 0).all() and torch.isinf(scores[:, n_real:]).all()
    # the search's own scores are the items' likelihoods (not just the same ranking)
    torch.testing.assert_close(scores[:, :n_real], exact.gather(1, items[:, :n_real]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("last_code_token", ["item", "shared"])
def test_item_temperature_divides_the_logits_of_the_levels_that_complete_items(stage2, last_code_token):
    """Ranking log-probabilities: logits of a level where some child completes an item are divided
    by item_temperature before the softmax, other levels' are not; masked children stay finite."""
    model = make_prorec(stage2, last_code_token=last_code_token, item_temperature=2.0)
    assert 0 not in model.leaf_levels and model.leaf_levels  # the first code never completes an item here
    torch.manual_seed(0)
    logits = torch.randn(6, model.code_len, model.K)
    got = model.ranking_log_probs(logits)
    for t in range(model.code_len):
        scale = 2.0 if t in model.leaf_levels else 1.0
        torch.testing.assert_close(got[:, t], (logits[:, t] / scale).log_softmax(-1))
    torch.testing.assert_close(model.ranking_log_probs(logits[:, 1:], first_level=1), got[:, 1:])
    plain = make_prorec(stage2, last_code_token=last_code_token, item_temperature=1.0)
    torch.testing.assert_close(plain.ranking_log_probs(logits), logits.log_softmax(-1))
    masked = logits.clone()
    masked[:, -1, 1:] = torch.finfo(logits.dtype).min  # children that do not exist stay finite and get ~0
    sharp = make_prorec(stage2, last_code_token=last_code_token, item_temperature=0.5).ranking_log_probs(masked)
    assert torch.isfinite(sharp).all() and sharp[:, -1, 0].abs().max() < 1e-6
    with pytest.raises(ValueError, match="item_temperature must be > 0"):
        make_prorec(stage2, item_temperature=0.0)


@pytest.mark.parametrize("last_code_token", ["item", "shared"])
def test_beam_search_items_are_real_and_distinct(stage2, last_code_token):
    _, data, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, last_code_token=last_code_token), 3).eval()
    for i, (batch, *_rest) in enumerate(test):
        items, scores = model.beam_search(batch)
        assert items.shape == (len(batch), 20)
        assert (items >= 1).all() and (items < model.n_items).all()
        assert torch.isfinite(scores).all()
        assert all(len(set(row.tolist())) == len(row) for row in items)
        assert (scores[:, 1:] <= scores[:, :-1] + 1e-6).all(), "beams not sorted best first"
        # every decoded item has a code (it is a real item of the .item file)
        assert ((model.codes[items] >= 0).sum(-1) > 0).all()
        if i == 1:
            break


def test_beam_search_is_deterministic(stage2):
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2), 4).eval()
    batch = first_batch(test)
    a, b = model.beam_search(batch), model.beam_search(batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_beam_smaller_than_topk_is_refused(stage2):
    with pytest.raises(ValueError, match="beam_size"):
        make_prorec(stage2, beam_size=10)  # topk [5, 10, 20]


def test_full_sort_predict_holds_beam_scores_and_minus_inf_elsewhere(stage2):
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2), 5).eval()
    batch = first_batch(test)
    full = model.full_sort_predict(batch)
    items, scores = model.beam_search(batch)
    assert full.shape == (len(batch), model.n_items)
    finite = torch.isfinite(full)
    assert (finite.sum(1) == model.beam_size).all()
    assert not finite[:, 0].any()
    expected = torch.zeros_like(finite)
    expected.scatter_(1, items, True)
    assert torch.equal(finite, expected)
    torch.testing.assert_close(full.gather(1, items), scores)
    assert (full[~finite] == float("-inf")).all()


# --------------------------------------------------------------------------- IKD and training


def test_ikd_gradients_reach_the_decoder(stage2):
    _, _, (train, _, _) = stage2
    model = make_prorec(stage2)
    model.train()
    *gen, ikd = model.calculate_loss(first_batch(train))
    assert ikd.item() > 0
    ikd.backward()
    decoder_grads = [p.grad for p in model.decoder.parameters() if p.grad is not None]
    assert decoder_grads and sum(g.abs().sum() for g in decoder_grads) > 0
    # the last decoder layer's feed-forward and the [IKD] token embedding both learn from IKD
    assert model.decoder[-1].ffn[0].weight.grad.abs().sum() > 0
    assert model.token_embedding.weight.grad[model.ikd_token].abs().sum() > 0
    assert model.ikd_proj.weight.grad.abs().sum() > 0
    # IKD does not touch the code classifier
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0


def test_ikd_weight_zero_turns_ikd_off(stage2):
    _, _, (train, _, _) = stage2
    model = make_prorec(stage2, ikd_weight=0.0)
    assert hasattr(model, "integrated") and not hasattr(model, "ikd_proj")  # integrated item tokens read them
    *gen, ikd = model.calculate_loss(first_batch(train))
    assert ikd.item() == 0 and all(g.item() > 0 for g in gen)
    plain = make_prorec(stage2, ikd_weight=0.0, integrated_item_tokens=False)
    assert not hasattr(plain, "integrated") and not hasattr(plain, "ikd_proj")  # Stage I's embeddings unread


def test_without_ikd_the_decoder_skips_the_positions_no_loss_reads(stage2):
    """The causal decoder's code logits cannot depend on the last code token or [IKD], so
    dropping them (ikd_weight 0, predict) changes no number; the IKD state exists only with IKD."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2), 11).eval()
    batch = first_batch(train)
    target = batch[model.POS_ITEM_ID]
    with torch.no_grad():
        full, codes, state = model.teacher_forced(batch, target, with_ikd=True)
        short, same_codes, none = model.teacher_forced(batch, target)
        model.ikd_weight = 0.0
        *gen, ikd = model.calculate_loss(batch)
    assert state.shape == (len(target), model.hidden) and none is None
    assert torch.equal(codes, same_codes)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(gen), model.generation_loss(full, codes), rtol=1e-5, atol=1e-5)
    assert ikd.item() == 0


def chance_loss(model: PRORec, targets: torch.Tensor) -> float:
    """Mean generation loss of a uniform guess: log K per code position (shared head), or the log
    of the number of children of the prefix at each position (item mode scores only those)."""
    codes = model.codes[targets]
    if not model.item_level:
        return (codes >= 0).sum(1).float().mean().item() * math.log(model.K)
    nodes = model.item_nodes[targets]
    total = sum(
        torch.where(codes[:, t] >= 0, (getattr(model, f"child_items_{t}")[nodes[:, t]] != -2).sum(1).float().log(), 0.0)
        for t in range(model.code_len)
    )
    return total.mean().item()


@pytest.mark.parametrize("form", ["item", "shared", "integrated", "integrated, no ID dropout", "item history"])
def test_training_lowers_both_losses(stage2, form):
    _, _, (train, _, _) = stage2
    model = make_prorec(stage2, **FORMS[form])
    batches = list(train)

    def mean_losses():
        model.eval()
        torch.manual_seed(7)  # the same IKD negatives every time
        with torch.no_grad():
            parts = [model.calculate_loss(b) for b in batches]
        return [sum(sum(p[:-1]).item() for p in parts) / len(parts), sum(p[-1].item() for p in parts) / len(parts)]

    gen0, ikd0 = mean_losses()
    # chance level for gen; IKD is about log 2 only at large tau (tau = 0.1 here)
    targets = torch.cat([b[model.POS_ITEM_ID] for b in batches])
    assert abs(gen0 - chance_loss(model, targets)) < 0.3 and ikd0 > 0.3
    optim = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    steps = 0
    while steps < 200:
        for batch in batches:
            optim.zero_grad()
            sum(model.calculate_loss(batch)).backward()
            optim.step()
            steps += 1
    gen1, ikd1 = mean_losses()
    assert gen1 < 0.75 * gen0, (gen0, gen1)
    assert ikd1 < 0.75 * ikd0, (ikd0, ikd1)


def test_recbole_metrics_equal_recomputation_from_decoded_lists(stage2, tmp_path):
    config, _, (train, _, test) = stage2
    model = make_prorec(stage2)
    # a little training so the ranking is not arbitrary
    optim = torch.optim.Adam(model.parameters(), lr=0.003)
    model.train()
    for batch in list(train)[:6]:
        loss = sum(model.calculate_loss(batch))
        optim.zero_grad()
        loss.backward()
        optim.step()
    config["checkpoint_dir"] = str(tmp_path)
    trainer = SafeTrainer(config, model)
    result = trainer.evaluate(test, load_best_model=False)

    model.eval()
    hits = {k: [] for k in config["topk"]}
    gains = {k: [] for k in config["topk"]}
    first_code = []
    for batch, _history, _pos_u, pos_i in test:
        items, _ = model.beam_search(batch)
        first_code += (model.codes[items, 0] == model.codes[pos_i, 0][:, None]).any(1).tolist()
        for row, target in zip(items.tolist(), pos_i.tolist()):
            rank = row.index(target) + 1 if target in row else None
            for k in config["topk"]:
                hit = rank is not None and rank <= k
                hits[k].append(float(hit))
                gains[k].append(1.0 / math.log2(rank + 1) if hit else 0.0)
    n_users = len(hits[5])
    assert n_users == len(test.dataset)
    assert sum(hits[20]) > 0, "no hit at all: the comparison would be vacuous"
    # the evaluation's diagnostics: with beam 20 = top 20, "target in the beam" is recall@20
    assert trainer._last_eval_stats["item_in_beam"] == pytest.approx(sum(hits[20]) / n_users)
    assert trainer._last_eval_stats["first_code_in_beam"] == pytest.approx(sum(first_code) / n_users)
    for k in config["topk"]:
        assert result[f"recall@{k}"] == pytest.approx(sum(hits[k]) / n_users, abs=1e-4)
        assert result[f"ndcg@{k}"] == pytest.approx(sum(gains[k]) / n_users, abs=1e-4)


# --------------------------------------------------------------------------- per-level loss, item-level last code


def test_generation_loss_is_reported_per_code_level(stage2):
    _, _, (train, _, _) = stage2
    model = make_prorec(stage2).eval()
    assert model.code_len >= 2
    assert model.loss_names == (*[f"gen_l{level + 1}" for level in range(model.code_len)], "ikd")
    batch = first_batch(train)
    with torch.no_grad():
        parts = model.calculate_loss(batch)
        logits, codes, _ = model.teacher_forced(batch, batch[model.POS_ITEM_ID])
    assert len(parts) == len(model.loss_names)
    for level, part in enumerate(parts[:-1]):
        real = codes[:, level] >= 0
        expected = F.cross_entropy(logits[real, level], codes[real, level], reduction="sum") / len(codes)
        torch.testing.assert_close(part, expected)


@pytest.mark.parametrize("last_code_token", ["item", "shared"])
def test_label_smoothing_spreads_eps_over_the_codes_that_can_follow(stage2, last_code_token):
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2, last_code_token=last_code_token, label_smoothing=0.2), 10).eval()
    batch = first_batch(train)
    with torch.no_grad():
        logits, codes, _ = model.teacher_forced(batch, batch[model.POS_ITEM_ID])
        smoothed = model.generation_loss(logits, codes)
        model.label_smoothing = 0.0
        plain = model.generation_loss(logits, codes)
    assert torch.isfinite(smoothed).all() and not torch.allclose(smoothed, plain)
    nodes = model.item_nodes[batch[model.POS_ITEM_ID]]
    for level in range(model.code_len):
        real = codes[:, level] >= 0
        logp = logits[real, level].log_softmax(-1)
        if last_code_token == "item":  # eps goes to the node's children only
            allowed = model.trie.children[level][nodes[real, level]] >= 0
        else:  # the shared head may put probability on every code
            allowed = torch.ones_like(logp, dtype=torch.bool)
        target = torch.zeros_like(logp).masked_fill(allowed, 0.2) / allowed.sum(1, keepdim=True)
        target[torch.arange(len(target)), codes[real, level]] += 0.8
        expected = -(target * logp.masked_fill(~allowed, 0)).sum() / len(codes)
        torch.testing.assert_close(smoothed[level], expected)
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        make_prorec(stage2, label_smoothing=1.0)


@pytest.mark.parametrize("last_code_token", ["item", "shared"])
def test_item_mode_scores_only_the_children_of_the_prefix(stage2, last_code_token):
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, last_code_token=last_code_token), 6).eval()
    batch = first_batch(test)
    targets = batch[model.ITEM_ID]
    with torch.no_grad():
        probs = model.teacher_forced(batch, targets)[0].softmax(-1)
    codes, nodes = model.codes[targets], model.item_nodes[targets]
    outside = []
    for t in range(model.code_len):
        real = codes[:, t] >= 0
        children = model.trie.children[t][nodes[real, t]] >= 0  # [users, K]
        assert children.gather(1, codes[real, t, None]).all()  # the node table leads to the target
        outside.append(probs[real, t][~children])
    outside = torch.cat(outside)
    if last_code_token == "item":
        assert outside.numel() and (outside == 0).all()
    else:  # the shared head spreads probability over codes no item continues with
        assert (outside > 0).all()


def test_item_mode_gives_each_item_its_own_token_tied_to_its_output_score(stage2):
    _, _, (_, _, test) = stage2
    item_mode = randomise(make_prorec(stage2), 7).eval()
    shared = make_prorec(stage2, last_code_token="shared")
    items = torch.arange(1, item_mode.n_items)
    last = (item_mode.codes[items] >= 0).sum(1) - 1
    own = item_mode.item_tokens[items, last]
    assert torch.equal(own, item_mode.item_offset + items)
    assert torch.equal(item_mode.item_tokens[items].clamp(max=item_mode.bos - 1),
                       shared.item_tokens[items].scatter(1, last[:, None], item_mode.bos - 1))
    assert len(set(shared.item_tokens[items, last].tolist())) < len(items)  # ranks repeat across clusters
    # the score of a child that completes an item is <state, that item's input embedding> + its bias
    batch = first_batch(test)
    targets = batch[item_mode.ITEM_ID]
    with torch.no_grad():
        logits, codes, _ = item_mode.teacher_forced(batch, targets)
        tokens = torch.cat([torch.full((len(targets), 1), item_mode.bos), item_mode.item_tokens[targets]], 1)
        memory, mask = item_mode.encode(batch, queries=tokens.shape[1])
        states = item_mode.decode(tokens[:, None], memory, mask)[0][:, 0]
    rows = torch.arange(len(targets))
    target_last = (codes >= 0).sum(1) - 1
    expected = (states[rows, target_last] * item_mode.token_table()[item_mode.item_offset + targets]).sum(-1)
    expected = expected + item_mode.item_bias[targets]
    got = logits[rows, target_last].gather(1, codes[rows, target_last][:, None]).squeeze(1)
    torch.testing.assert_close(got, expected)


def test_integrated_item_tokens_add_the_projected_stage1_embedding(stage2):
    """An item's own token = its free embedding + W e_item (Stage I's integrated embedding), used
    alike as encoder input, decoder input and output score; level tokens are untouched (ranking's
    shrinkage of the free part off: its own test below)."""
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, integrated_item_tokens=True, item_id_shrinkage=0), 5).eval()
    plain = make_prorec(stage2, integrated_item_tokens=False)
    assert set(dict(model.named_parameters())) - set(dict(plain.named_parameters())) == {"integrated_proj.weight"}
    table = model.token_table()
    free = model.token_embedding.weight
    torch.testing.assert_close(table[: model.item_offset], free[: model.item_offset])
    items = torch.arange(1, model.n_items)
    projected = model.integrated[items] @ model.integrated_proj.weight.T
    assert projected.abs().min(1).values.gt(0).all()  # every real item has a Stage-I embedding
    torch.testing.assert_close(table[model.item_offset + items], free[model.item_offset + items] + projected)
    # without the projection the model is the plain item form with the same weights
    batch = first_batch(test)
    with torch.no_grad():
        with_projection = model.predict(batch)
        model.integrated_proj.weight.zero_()
        plain.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(model.predict(batch), plain.eval().predict(batch))
    assert not torch.allclose(with_projection, model.predict(batch))
    shared = make_prorec(stage2, last_code_token="shared", integrated_item_tokens=True)
    assert not shared.integrated_item_tokens and not hasattr(shared, "integrated_proj")  # shared form has no item tokens


def dropped_items(model: PRORec, seed: int) -> torch.Tensor:
    """Which item tokens a training pass drawn with ``seed`` leaves without their free embedding;
    asserts that every other item token is whole and the level tokens untouched."""
    weight, offset = model.token_embedding.weight.detach(), model.item_offset
    projected = model.integrated_proj(model.integrated).detach()
    torch.manual_seed(seed)
    table = model.train().token_table().detach()
    torch.testing.assert_close(table[:offset], weight[:offset])  # level tokens untouched
    kept = (table[offset:] - weight[offset:] - projected).abs().amax(1) < 1e-6
    dropped = (table[offset:] - projected).abs().amax(1) < 1e-6
    assert bool((kept ^ dropped).all())  # each row one or the other, never a mix
    return dropped


def test_item_id_dropout_leaves_the_free_part_out_of_a_share_of_item_tokens_in_training_only(stage2):
    """Training: each item token is either its free embedding + W e_item or W e_item alone, one draw
    per item and pass (encoder, decoder and scores share it); evaluation: always the full token."""
    model = randomise(make_prorec(stage2, item_id_dropout=0.5, item_id_shrinkage=0), 3)
    full = model.eval().token_table().detach()
    assert 0.2 < dropped_items(model, 0).float().mean() < 0.8  # about half of the 47 items
    torch.testing.assert_close(model.eval().token_table(), full)
    model.train()
    torch.manual_seed(1)
    loss = sum(model.calculate_loss(first_batch(stage2[2][0])))
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match=r"item_id_dropout must lie in \[0, 1\), got 1.0"):
        make_prorec(stage2, item_id_dropout=1.0)
    # free item tokens are never dropped (an empty token); the shared form has none
    for form in ({"integrated_item_tokens": False}, {"last_code_token": "shared"}):
        plain = make_prorec(stage2, item_id_dropout=0.5, **form)
        torch.testing.assert_close(plain.train().token_table(), plain.token_embedding.weight)


def test_id_dropout_share_moves_from_its_start_to_item_id_dropout_over_the_ramp(stage2):
    assert [id_dropout_share(e, 0.5, 0.3, (2, 6)) for e in range(8)] == pytest.approx(
        [0.3, 0.3, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5])
    assert [id_dropout_share(e, 0.5, 0.1, (3, 3)) for e in (2, 3)] == [0.1, 0.5]  # a step
    assert id_dropout_share(0, 0.5, None, None) == 0.5  # no start: constant
    model = randomise(make_prorec(stage2, item_id_dropout=0.6, item_id_dropout_start=0.1, item_id_dropout_ramp=[1, 3]), 3)
    assert model.item_id_dropout == 0.1  # before the trainer's first set_epoch
    early = dropped_items(model, 0)
    model.set_epoch(2)
    assert model.item_id_dropout == pytest.approx(0.35)
    model.set_epoch(9)
    late = dropped_items(model, 0)
    # the same draws against a higher share: the early pass's dropped items and more
    assert bool((late | ~early).all()) and int(late.sum()) > int(early.sum())
    for bad, message in ((dict(item_id_dropout_start=1.0), r"item_id_dropout_start must lie in \[0, 1\), got 1.0"),
                         (dict(item_id_dropout_start=0.1, item_id_dropout_ramp=None),
                          r"item_id_dropout_ramp must be two epochs .* got None"),
                         (dict(item_id_dropout_start=0.1, item_id_dropout_ramp=[3, 1]), r"got \[3, 1\]")):
        with pytest.raises(ValueError, match=message):
            make_prorec(stage2, **bad)


def test_item_id_shrinkage_ranks_with_each_free_embedding_as_far_as_training_saw_its_item(stage2):
    """Ranking: item i's token is n_i / (n_i + c) times its free embedding plus the projection of its
    Stage-I embedding, n_i its count as a training target; training and the level tokens are untouched."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2, item_id_shrinkage=2.0, item_id_dropout=0.0, item_id_dropout_start=None), 3)
    weight, offset = model.token_embedding.weight.detach(), model.item_offset
    projected = model.integrated_proj(model.integrated).detach()
    counts = torch.bincount(train.dataset.inter_feat[model.ITEM_ID], minlength=model.n_items).float()
    assert counts[0] == 0 and 1 < counts.max() and counts.sum() == len(train.dataset)  # padding never a target
    ranking = model.eval().token_table().detach()
    torch.testing.assert_close(ranking[:offset], weight[:offset])
    torch.testing.assert_close(ranking[offset:], weight[offset:] * (counts / (counts + 2.0))[:, None] + projected)
    training = model.train().token_table().detach()
    torch.testing.assert_close(training, torch.cat([weight[:offset], weight[offset:] + projected]))
    off = randomise(make_prorec(stage2, item_id_shrinkage=0, item_id_dropout=0.0, item_id_dropout_start=None), 3).eval()
    assert off.free_trust is None
    torch.testing.assert_close(off.token_table().detach()[offset:], weight[offset:] + projected)
    # free item tokens alone have no Stage-I token to shrink towards
    assert make_prorec(stage2, integrated_item_tokens=False).free_trust is None
    with pytest.raises(ValueError, match=r"item_id_shrinkage must be >= 0, got -1"):
        make_prorec(stage2, item_id_shrinkage=-1)


@pytest.mark.parametrize("form", ["item", "integrated"])
def test_item_scores_are_the_same_with_and_without_gradients(stage2, form):
    """Training scores items by a gather and a batched product, inference per trie node: the same numbers."""
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, **FORMS[form]), 9).eval()
    batch = first_batch(test)
    targets = batch[model.ITEM_ID]
    with torch.no_grad():
        grouped, codes, _ = model.teacher_forced(batch, targets)
    dense = model.teacher_forced(batch, targets)[0]
    assert dense.requires_grad
    assert (grouped > torch.finfo(grouped.dtype).min).any(-1)[codes >= 0].all()  # each real position scores children
    torch.testing.assert_close(grouped, dense.detach(), rtol=1e-5, atol=1e-5)


def test_unknown_last_code_token_or_history_tokens_is_refused(stage2):
    with pytest.raises(ValueError, match="last_code_token must be one of"):
        make_prorec(stage2, last_code_token="items")
    with pytest.raises(ValueError, match=r"history_tokens must be one of \('codes', 'item'\), got 'items'"):
        make_prorec(stage2, history_tokens="items")


def test_beam_diagnostics_count_first_codes_and_targets(stage2):
    _, _, (_, _, test) = stage2
    model = randomise(make_prorec(stage2, beam_size=20), 8).eval()
    empty = {"users": 0, "first_code_in_beam": 0, "item_in_beam": 0}
    assert model.pop_eval_counts() == empty
    batch = first_batch(test)
    targets = batch[model.ITEM_ID]
    model.full_sort_predict(batch)
    items, _ = model.beam_search(batch)
    counts = model.pop_eval_counts()
    first = (model.codes[items, 0] == model.codes[targets, 0][:, None]).any(1)
    hit = (items == targets[:, None]).any(1)
    assert counts == {"users": len(targets), "first_code_in_beam": int(first.sum()), "item_in_beam": int(hit.sum())}
    assert 0 < counts["item_in_beam"] < counts["first_code_in_beam"]  # the two diagnostics differ here
    assert model.pop_eval_counts() == empty  # counts start again after each pop


# --------------------------------------------------------------------------- bad input


def copy_stage1(stage1_folder: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(stage1_folder, root)
    return root


def edit_item_file(root: Path, edit) -> None:
    """Rewrite the copied ``.item`` file's rows (lists of fields) with ``edit``."""
    path = root / DATASET / f"{DATASET}.item"
    header, *rows = path.read_text(encoding="utf-8").splitlines()
    rows = edit([row.split("\t") for row in rows])
    path.write_text("\n".join([header, *("\t".join(row) for row in rows)]) + "\n", encoding="utf-8")


def build_model(tiny_overrides, folder: Path, **extra) -> PRORec:
    config, _, (train, _, _) = build_recbole("PRORec", tiny_overrides(**extra), folder)
    return PRORec(config, train._dataset)


def test_dataset_without_unicode_column_says_run_stage1(tiny_root, tiny_overrides):
    with pytest.raises(ValueError, match=r"Stage I.*--stage=unicode"):
        build_model(tiny_overrides, tiny_root)


def test_duplicate_codes_are_refused(stage1_folder, tmp_path, tiny_overrides):
    root = copy_stage1(stage1_folder, tmp_path)

    def duplicate(rows):
        rows[1][-1] = rows[0][-1]
        return rows

    edit_item_file(root, duplicate)
    with pytest.raises(ValueError, match=r"copy/tiny/tiny\.item: 2 items share their 'unicode' code with another"):
        build_model(tiny_overrides, root)


def test_item_without_code_names_the_file(stage1_folder, tmp_path, tiny_overrides):
    root = copy_stage1(stage1_folder, tmp_path)

    def blank(rows):
        rows[3][-1] = ""
        return rows

    edit_item_file(root, blank)
    with pytest.raises(ValueError, match=r"copy/tiny/tiny\.item.*no 'unicode' code"):
        build_model(tiny_overrides, root)


def test_code_beyond_codebook_size_is_refused(stage1_folder, tiny_overrides):
    with pytest.raises(ValueError, match=r"tiny\.item.*codebook_size 3"):
        build_model(tiny_overrides, stage1_folder, codebook_size=3)


def test_hidden_size_not_divisible_by_heads_names_both_keys(stage2):
    with pytest.raises(ValueError, match=r"hidden_size.*n_heads"):
        make_prorec(stage2, hidden_size=30, n_heads=4)


def test_missing_embeddings_file_with_ikd_names_the_file(stage1_folder, tmp_path, tiny_overrides):
    root = copy_stage1(stage1_folder, tmp_path)
    (root / DATASET / f"{DATASET}.emb.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"tiny\.emb\.npy"):
        build_model(tiny_overrides, root)
    # without IKD and integrated item tokens the embeddings are not needed
    model = build_model(tiny_overrides, root, ikd_weight=0.0, integrated_item_tokens=False)
    assert not hasattr(model, "integrated")


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_keeps_the_expectation_and_drops_a_share_p(p):
    """PRORecDropout draws its mask from random bytes: a share p (rounded to a multiple of 1/256)
    of entries is zeroed at every byte position of the 64-bit draws, the others are scaled so the
    mean is exactly kept, the gradient flows through the kept ones only, and evaluation mode is
    the identity."""
    from recbole_prorec.prorec import PRORecDropout

    torch.manual_seed(0)
    drop = PRORecDropout(p)
    rate = round(p * 256) / 256
    x = torch.full((200, 504), 2.0, requires_grad=True)
    y = drop(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - rate) < 0.005
    per_byte = dropped.view(-1, 8).float().mean(0)  # one column per byte of a 64-bit draw
    assert (per_byte - rate).abs().max() < 0.012
    assert torch.allclose(y[~dropped], torch.tensor(2.0 / (1 - rate)))
    assert abs(y.mean().item() - 2.0) < 0.02
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # drawn from torch's generator: seeded runs repeat
    assert drop(x[:7, :3]).shape == (7, 3)  # sizes that are not a multiple of 8
    drop.eval()
    assert drop(x) is x
    assert PRORecDropout(0.0)(x) is x
    assert PRORecDropout(0.001)(x) is x  # rounds to no dropout: no mask drawn
    assert torch.equal(PRORecDropout(1.0)(x), torch.zeros_like(x))


def test_attention_equals_torch_sdpa_and_survives_a_row_without_keys():
    """PRORecAttention.attend writes attention out (faster than CPU flash attention at these
    lengths): it must give F.scaled_dot_product_attention's numbers and gradients under causal and
    key-padding masks, and a query row that may attend to nothing gets a finite average of the
    values instead of NaN."""
    from recbole_prorec.prorec import PRORecAttention

    torch.manual_seed(0)
    attn = PRORecAttention(hidden=16, heads=4, dropout=0.0)
    q, k, v = (torch.randn(3, n, 16, requires_grad=True) for n in (5, 7, 7))
    real = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6], dtype=torch.bool)
    masks = [real[:, None, None], torch.ones(5, 7, dtype=torch.bool).tril()[None, None] & real[:, None, None]]
    for mask in masks:
        ours = attn.attend(q, k, v, mask)
        heads = [t.unflatten(-1, (4, 4)).transpose(1, 2) for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*heads, mask).transpose(1, 2).flatten(2)
        assert ours.shape == (3, 5, 16)
        assert torch.allclose(ours, ref, atol=1e-6)
        grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, ref_grads))
    nothing = torch.zeros(3, 1, 1, 7, dtype=torch.bool)
    out = attn.attend(q, k, v, nothing)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, v.mean(1, keepdim=True).expand_as(out), atol=1e-6)
    # attn_dropout_prob drops attention weights in training only (PRORecDropout: zeroed, rest rescaled)
    dropping = PRORecAttention(hidden=16, heads=4, dropout=0.5)
    dropping.load_state_dict(attn.state_dict())
    torch.manual_seed(1)
    undropped = attn.attend(q, k, v, masks[0])
    assert not torch.allclose(dropping.attend(q, k, v, masks[0]), undropped)
    assert torch.equal(dropping.eval().attend(q, k, v, masks[0]), undropped)


def test_attention_to_unprojected_states_equals_attention_to_their_keys_and_values():
    """attend_states (training's cross-attention: projections moved onto the queries) must give
    attend(q, *key_value(states))'s numbers and gradients (biases included, the key bias having no
    effect), under padding, a row without keys and attention dropout (the same mask is drawn)."""
    from recbole_prorec.prorec import PRORecAttention

    torch.manual_seed(0)
    attn = PRORecAttention(hidden=16, heads=4, dropout=0.0)
    nn.init.normal_(attn.qkv.bias)
    q = torch.randn(3, 5, 16, requires_grad=True)
    states = torch.randn(3, 7, 16, requires_grad=True)
    real = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7], dtype=torch.bool)
    ours = attn.attend_states(q, states, real[:, None])
    ref = attn.attend(q, *attn.key_value(states), real[:, None, None])
    assert ours.shape == (3, 5, 16)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    params = (q, states, attn.qkv.weight)
    grads = torch.autograd.grad(ours.square().sum(), params)
    ref_grads = torch.autograd.grad(ref.square().sum(), params)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    dropping = PRORecAttention(hidden=16, heads=4, dropout=0.5)
    dropping.load_state_dict(attn.state_dict())
    torch.manual_seed(1)
    dropped = dropping.attend_states(q, states, real[:, None])
    torch.manual_seed(1)
    torch.testing.assert_close(dropped, dropping.attend(q, *dropping.key_value(states), real[:, None, None]),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dropped, ours, atol=1e-3)


def test_the_decoder_reads_the_encoder_alike_through_states_or_projected_keys(stage2):
    """encode hands the decoder the encoder states when a user has fewer decoder positions than
    history tokens and per-layer keys and values otherwise; both must give the same decoder states."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2), 4, 0.1).eval()
    batch = first_batch(train)
    items = batch[model.POS_ITEM_ID]
    tokens = torch.cat([torch.full((len(items), 1), model.bos), model.item_tokens[items]], 1)[:, None]
    with torch.no_grad():
        as_states, mask = model.encode(batch, queries=1)
        as_keys, same_mask = model.encode(batch, queries=10**6)
        assert not isinstance(as_states[0], tuple) and isinstance(as_keys[0], tuple)
        assert torch.equal(mask, same_mask)
        torch.testing.assert_close(model.decode(tokens, as_states, mask)[0], model.decode(tokens, as_keys, mask)[0],
                                   atol=1e-5, rtol=1e-5)


def test_the_decoder_computes_only_the_positions_asked_for_with_the_same_states(stage2):
    """decode(rows=...) skips the other positions in its last layer only (below it they are keys
    and values of later positions): the states it returns must equal the full decode's at those
    positions, for the index training uses ([BOS], code positions and [IKD], not the last code
    token) and the slice beam search uses (the last position); and decoding a sequence in two calls,
    the second attending to the first's keys and values (``past``), must give the same states."""
    _, _, (train, _, _) = stage2
    model = randomise(make_prorec(stage2), 4, 0.1).eval()
    batch = first_batch(train)
    items = batch[model.POS_ITEM_ID]
    bos = torch.full((len(items), 1), model.bos)
    tokens = torch.cat([bos, model.item_tokens[items], torch.full_like(bos, model.ikd_token)], 1)[:, None]
    C = model.code_len
    with torch.no_grad():
        memory, mask = model.encode(batch, queries=1)
        full, keys = model.decode(tokens, memory, mask)
        for rows in (torch.tensor([*range(C), C + 1]), slice(-1, None)):
            part, _ = model.decode(tokens, memory, mask, rows)
            assert part.shape == full[:, :, rows].shape
            torch.testing.assert_close(part, full[:, :, rows], atol=1e-5, rtol=1e-5)
        # what the beam search does: the first positions' keys and values from one call, the rest in another
        for P in (1, 2):
            head, past = model.decode(tokens[:, :, :P], memory, mask)
            tail, tail_keys = model.decode(tokens[:, :, P:], memory, mask, past=past)
            torch.testing.assert_close(torch.cat([head, tail], 2), full, atol=1e-5, rtol=1e-5)
            for (k, v), (k_tail, v_tail), (k_all, v_all) in zip(past, tail_keys, keys):
                torch.testing.assert_close(torch.cat([k, k_tail], 1), k_all, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(torch.cat([v, v_tail], 1), v_all, atol=1e-5, rtol=1e-5)
