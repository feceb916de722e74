"""Top-k recommendations from a trained checkpoint, for known users or for any given history.

A user's history is all of their interactions in the dataset, in time order (the last
``MAX_ITEM_LIST_LENGTH`` of them), so the answer is what comes after the newest one. The model
scores exactly as in evaluation (PRORec: the constrained beam search), on the GPU when there is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from recbole.data.interaction import Interaction

from recbole_prorec.data import read_header
from recbole_prorec.semantic import read_item_table
from recbole_prorec.quick_start import load_data_and_model


@dataclass
class Recommendation:
    """One user's (or one history's) top-k: item ids, scores and titles, best first."""

    user: str | None
    history: list[str]
    items: list[str]
    scores: list[float]
    titles: list[str]


def _ids(dataset, field: str, tokens: Sequence[str], what: str) -> list[int]:
    known = dataset.field2token_id[field]
    unknown = [t for t in tokens if t not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[:10]} (not in dataset '{dataset.dataset_name}')")
    return [known[t] for t in tokens]


def user_histories(dataset, users: Sequence[int]) -> list[list[int]]:
    """Every interaction of each user, in time order: one sort by (user, time), then slices."""
    inter = dataset.inter_feat
    user_col, item_col = inter[dataset.uid_field].numpy(), inter[dataset.iid_field].numpy()
    keys = (inter[dataset.time_field].numpy(), user_col) if dataset.time_field in inter else (user_col,)
    order = np.lexsort(keys)
    user_sorted, item_sorted = user_col[order], item_col[order]
    starts = np.searchsorted(user_sorted, users, side="left")
    ends = np.searchsorted(user_sorted, users, side="right")
    return [item_sorted[a:b].tolist() for a, b in zip(starts, ends)]


def titles(item_file: Path, column: str, id_field: str) -> dict[str, str]:
    """Item id -> the ``column`` text of the ``.item`` file ('' when the file or column is absent)."""
    if not item_file.is_file() or column not in read_header(item_file):
        return {}
    table = read_item_table(item_file, id_field)
    return dict(zip(table[id_field], table[column]))


def recommend(
    model_file: str | Path,
    user_ids: Sequence[str] | None = None,
    history: Sequence[Sequence[str]] | None = None,
    k: int = 10,
    exclude_history: bool = False,
) -> list[Recommendation]:
    """Top ``k`` items for each of ``user_ids`` (their histories in the dataset) or for each given
    ``history`` (item ids, oldest first); ``exclude_history`` drops items already in it."""
    config, model, dataset, *_ = load_data_and_model(model_file)
    return recommend_loaded(config, model, dataset, user_ids, history, k, exclude_history)


def recommend_loaded(config, model, dataset, user_ids: Sequence[str] | None = None,
                     history: Sequence[Sequence[str]] | None = None, k: int = 10,
                     exclude_history: bool = False) -> list[Recommendation]:
    """``recommend`` for a model already loaded by ``load_data_and_model`` (no second load of
    the dataset when one model answers several requests)."""
    if (user_ids is None) == (history is None):
        raise ValueError("give either user_ids or history")
    if user_ids is not None:
        histories = user_histories(dataset, _ids(dataset, dataset.uid_field, list(user_ids), "user id(s)"))
    else:
        histories = [_ids(dataset, dataset.iid_field, list(h), "item id(s)") for h in history]
    if not histories:
        raise ValueError("no user ids or histories given")
    if any(not h for h in histories):
        raise ValueError("every history needs at least one item")
    if k > getattr(model, "beam_size", k):
        raise ValueError(f"k={k} is more than the model's beam_size {model.beam_size}: raise beam_size")
    top_scores, top_items = top_k(model, histories, k, exclude_history, config)
    names = titles(Path(config["data_path"]) / f"{config['dataset']}.item", "title", dataset.iid_field)
    out = []
    for row, h in enumerate(histories):
        finite = torch.isfinite(top_scores[row])  # a beam can hold fewer than k items
        items = [str(t) for t in dataset.id2token(dataset.iid_field, top_items[row][finite].cpu().numpy())]
        out.append(Recommendation(
            user=str(user_ids[row]) if user_ids is not None else None,
            history=[str(t) for t in dataset.id2token(dataset.iid_field, h)],
            items=items, scores=top_scores[row][finite].tolist(), titles=[names.get(i, "") for i in items]))
    return out


def top_k(model, histories: list[list[int]], k: int, exclude_history: bool, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and items [len(histories), k] of each history's top ``k``, scored ``eval_batch_size``
    histories at a time, so that all of a dataset's users fit in memory."""
    values, items = [], []
    batch = config["eval_batch_size"]
    for start in range(0, len(histories), batch):
        chunk = histories[start : start + batch]
        scores = score(model, chunk, config["MAX_ITEM_LIST_LENGTH"], config["device"])
        if exclude_history:
            for row, h in enumerate(chunk):
                scores[row, h] = float("-inf")
        top = scores.topk(k, dim=1)
        values.append(top.values.cpu())
        items.append(top.indices.cpu())
    return torch.cat(values), torch.cat(items)


@torch.no_grad()
def score(model, histories: list[list[int]], max_len: int, device) -> torch.Tensor:
    """Scores [len(histories), n_items] of the next item after each history, as in evaluation."""
    model.eval()
    recent = [h[-max_len:] for h in histories]
    seq = torch.zeros(len(recent), max_len, dtype=torch.long)
    for row, h in enumerate(recent):
        seq[row, : len(h)] = torch.tensor(h)
    batch = Interaction({model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: torch.tensor([len(h) for h in recent])})
    scores = model.full_sort_predict(batch.to(device)).view(len(recent), -1).clone()
    scores[:, 0] = float("-inf")  # the padding id is no item
    return scores
