"""New items from text alone: a trained PRORec recommends items it never saw, without retraining.

Given rows of an atomic ``.item`` file for items without interactions, ``add_items``:

1. embeds their text with the run's semantic settings (text columns, encoder, pooling);
2. maps the text embeddings into Stage I's integrated space with a ridge regression fitted on the
   warm items (text embedding -> integrated embedding). The modality adaptation layer alone would
   not do: CKA aligns it to the collaborative embeddings by cosine (InfoNCE), not in position or
   scale, while the k-means tree below is Euclidean; a map fitted on the warm items serves every
   fusion (``semantic_only``, ``concat``, CKA) the same way and needs nothing but Stage I's files;
3. descends Stage I's k-means tree: at each level the nearest cluster (centroid = mean integrated
   embedding of its warm items) that still has a free code below it, then the lowest free index of
   the leaf cluster; the code is unique and prefix-free by construction (``placement="random"``
   puts each item in a random leaf cluster instead: the baseline the tree is measured against);
4. writes a new artifact folder (Stage I's files plus the new rows) and a checkpoint of the model
   grown by the new items. With ``last_code_token: item`` an item has parameters of its own (its
   free token embedding and score bias); a new item's are predicted from its integrated embedding by
   a second ridge regression fitted on the warm items' trained values (with integrated item tokens
   the learned projection of the integrated embedding is added to them, as for any item). Ranking
   weighs a free embedding by its item's count as a training target (``item_id_shrinkage``), which
   is 0 for a new item: the predicted free embedding counts only with ``item_id_shrinkage: 0``, the
   predicted score bias always.

The result is an ordinary checkpoint: ``recommend`` and ``load_data_and_model`` take it as they
take the trained one. Limits: a new item is placed once, by its text; it cannot move when its
interactions arrive (that takes retraining), and a leaf cluster holds at most ``codebook_size``
items, so a full cluster sends the item to the next-nearest one.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import csv
import io
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pandas._libs.parsers import STR_NA_VALUES
from sklearn.linear_model import RidgeCV

from recbole_prorec.artifact import REPORT_FILE, UNICODE_FIELD, embedding_files
from recbole_prorec.config import plain_config
from recbole_prorec.files import atomic_file
from recbole_prorec.prorec_din import semantic_embeddings
from recbole_prorec.build import load_data
from recbole_prorec.quick_start import checkpoint_config, load_data_and_model
from recbole_prorec.semantic import read_item_table
from recbole_prorec.trainer import load_checkpoint

PLACEMENTS = ("tree", "random")
ITEM_WEIGHTS = ("ridge", "mean")
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0)  # chosen per fit by RidgeCV's leave-one-out error
GROWN_SETTINGS = {"item_inter_num_interval": "[0,inf)"}  # new items have no interactions: keep them


@dataclass
class ColdStart:
    """What ``add_items`` wrote: the grown checkpoint and artifact, and each new item's code."""

    checkpoint: Path
    artifact: Path
    items: list[str]
    codes: list[tuple[int, ...]]
    map_r2: float  # R^2 of the text -> integrated map on the warm items it was fitted on


class CodeTree:
    """Stage I's codes as a tree: children of each prefix, whether they are leaves, centroids."""

    def __init__(self, codes: list[tuple[int, ...]], emb: np.ndarray, K: int):
        self.K = K
        self.children: dict[tuple, set[int]] = defaultdict(set)
        self.leaf_parent: set[tuple] = set()  # prefixes whose children complete codes
        sums: dict[tuple, np.ndarray] = {}
        counts: dict[tuple, int] = defaultdict(int)
        for code, e in zip(codes, emb):
            for depth in range(len(code)):
                prefix = code[:depth]
                self.children[prefix].add(code[depth])
                if depth:
                    sums[prefix] = sums.get(prefix, 0) + e
                    counts[prefix] += 1
            self.leaf_parent.add(code[:-1])
        self.centroid = {p: s / counts[p] for p, s in sums.items()}

    def place_nearest(self, e: np.ndarray, prefix: tuple = ()) -> tuple[int, ...] | None:
        """The nearest free code below ``prefix`` for embedding ``e``, taken (None: all full):
        a free index beside the complete codes under ``prefix``, else the inner children (clusters),
        nearest centroid first."""
        if prefix in self.leaf_parent:
            code = self._take_free(prefix)
            if code is not None:
                return code
        inner = [c for c in self.children[prefix] if prefix + (c,) in self.centroid]
        for c in sorted(inner, key=lambda c: float(np.sum((self.centroid[prefix + (c,)] - e) ** 2))):
            code = self.place_nearest(e, prefix + (c,))
            if code is not None:
                return code
        return None

    def place_random(self, rng: np.random.Generator) -> tuple[int, ...] | None:
        """A free code in a leaf cluster drawn uniformly among those with room, taken."""
        open_leaves = sorted(p for p in self.leaf_parent if len(self.children[p]) < self.K)
        if not open_leaves:
            return None
        return self._take_free(open_leaves[rng.integers(len(open_leaves))])

    def _take_free(self, prefix: tuple) -> tuple[int, ...] | None:
        used = self.children[prefix]
        free = next((c for c in range(self.K) if c not in used), None)
        if free is None:
            return None
        used.add(free)
        return prefix + (free,)


def ridge(x: np.ndarray, y: np.ndarray) -> tuple[RidgeCV, float]:
    """A ridge regression x -> y (penalty chosen by leave-one-out error) and its R^2 on (x, y)."""
    model = RidgeCV(alphas=RIDGE_ALPHAS).fit(x, y)
    return model, float(model.score(x, y))


def read_new_items(item_file: Path, id_field: str, known: set[str]) -> list[str]:
    """The item ids of ``item_file``, refusing ids the model already has, repeated ids and ids
    RecBole would drop as missing (pandas' NA strings) or take for its padding."""
    if not item_file.is_file():
        raise FileNotFoundError(f"new items file {item_file} does not exist")
    tokens = [str(t) for t in read_item_table(item_file, id_field)[id_field]]
    if not tokens:
        raise ValueError(f"{item_file} holds no item rows")
    unusable = [t for t in tokens if t.strip() in STR_NA_VALUES or t == "[PAD]"]
    if unusable:
        raise ValueError(f"{item_file}: item ids {unusable[:5]} would be read by RecBole as missing or as padding")
    repeated = sorted(t for t, n in Counter(tokens).items() if n > 1)
    if repeated:
        raise ValueError(f"{item_file}: item ids {repeated[:5]} appear more than once")
    old = [t for t in tokens if t in known]
    if old:
        raise ValueError(f"{item_file}: items {old[:5]} are already in the model's dataset "
                         f"({len(old)} in all); a new item needs an id of its own")
    return tokens


def add_items(model_file: str | Path, item_file: str | Path, placement: str = "tree", seed: int = 0,
              item_weights: str = "ridge") -> ColdStart:
    """Make the items of ``item_file`` (``.item`` rows, text only) recommendable by the PRORec of
    ``model_file``; returns where the grown checkpoint and artifact are and the items' codes.
    ``placement`` and ``item_weights`` choose how codes and per-item weights are found (``tree``
    and ``ridge``; ``random`` and ``mean`` are the baselines they are measured against)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if item_weights not in ITEM_WEIGHTS:
        raise ValueError(f"item_weights must be one of {ITEM_WEIGHTS}, got {item_weights!r}")
    config, model, dataset, *_ = load_data_and_model(model_file)
    if not getattr(model, "needs_stage1", False):
        raise ValueError(f"{model_file} holds a {config['model']}: only models of Stage-I codes (PRORec) take new items")
    item_file, id_field, name = Path(item_file), dataset.iid_field, config["dataset"]
    if config["semantic_embedding_file"]:
        raise ValueError(f"{model_file} was trained on precomputed text embeddings (semantic_embedding_file "
                         f"{config['semantic_embedding_file']}): new items from text need a run with a text encoder")
    folder = Path(config["data_path"])
    warm = [str(t) for t in dataset.field2id_token[id_field][1:]]
    new = read_new_items(item_file, id_field, set(warm))
    warm_emb = _artifact_embeddings(folder, name, warm)
    text_map, r2 = ridge(semantic_embeddings(config, folder / f"{name}.item", warm), warm_emb)
    new_emb = text_map.predict(semantic_embeddings(config, item_file, new)).astype(np.float32)
    warm_codes = [tuple(int(c) for c in row if c >= 0) for row in model.codes[1:].cpu().tolist()]
    codes = place(CodeTree(warm_codes, warm_emb, model.K), new_emb, placement, seed, item_file)
    record = {"items": len(new), "item_file": str(item_file), "placement": placement, "seed": seed, "map_r2": r2,
              "item_weights": item_weights}
    artifact = write_grown_artifact(folder, dataset, item_file, new, codes, new_emb, record)
    checkpoint = grow_checkpoint(Path(model_file), model, dataset, artifact, warm_emb, new, new_emb, item_weights)
    return ColdStart(checkpoint, artifact, new, codes, r2)


def _artifact_embeddings(folder: Path, dataset: str, tokens: list[str]) -> np.ndarray:
    """Stage I's integrated embeddings of ``tokens``, in that order."""
    emb_file, items_file = embedding_files(folder, dataset)
    emb = np.load(emb_file)
    row = {t: i for i, t in enumerate(items_file.read_text(encoding="utf-8").split("\n")[: len(emb)])}
    return emb[[row[t] for t in tokens]]


def place(tree: CodeTree, emb: np.ndarray, placement: str, seed: int, item_file: Path) -> list[tuple[int, ...]]:
    """Codes for the new items, in order, each placed with the earlier ones' codes already taken."""
    rng = np.random.default_rng(seed)
    out = []
    for e in emb:
        code = tree.place_nearest(e) if placement == "tree" else tree.place_random(rng)
        if code is None:
            raise ValueError(f"{item_file}: no free code is left for new item {len(out) + 1}: every leaf cluster "
                             f"holds codebook_size={tree.K} items (retrain Stage I with the new items)")
        out.append(code)
    return out


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _clean(value: str) -> str:
    return " ".join(str(value).split())  # an atomic file's cell holds no tab or line break


def new_item_rows(item_file: Path, header: str, new: list[str], codes: list[tuple[int, ...]], id_field: str) -> str:
    """The new items' ``.item`` rows under the artifact's ``header``: values by column name (blank
    where the new file lacks the column), the code in the unicode column, quoted where RecBole's
    reader needs it; a non-number in a float column is refused before anything is written."""
    columns = [c.split(":", 1) for c in header.split("\t")]
    table = read_item_table(item_file, id_field).set_index(id_field)
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    for token, code in zip(new, codes):
        given = {id_field: token, UNICODE_FIELD: " ".join(map(str, code))}
        cells = [given.get(col) or (_clean(table.at[token, col]) if col in table.columns else "") for col, _ in columns]
        for (col, kind), cell in zip(columns, cells):
            if kind.startswith("float") and not all(_is_float(v) for v in cell.split()):
                raise ValueError(f"{item_file}: item {token}'s {col} {cell!r} is not a number ({col}:{kind})")
        writer.writerow(cells)
    return out.getvalue()


def write_grown_artifact(folder: Path, dataset, item_file: Path, new: list[str], codes: list[tuple[int, ...]],
                         emb: np.ndarray, record: dict) -> Path:
    """A copy of the artifact ``folder`` as the model saw it plus the new items' rows, codes and
    embeddings, beside it (named by a digest of what was added); returns the new folder.

    The copy holds exactly the model's users, items and interactions (RecBole's filters already
    applied), since the grown config turns the item filter off for the new items, which have no
    interactions: filtering again could then keep an item the model never had."""
    name, id_field = dataset.dataset_name, dataset.iid_field
    users, items = set(dataset.field2id_token[dataset.uid_field][1:]), set(dataset.field2id_token[id_field][1:])
    item_lines = _atomic_lines(folder / f"{name}.item")
    added = new_item_rows(item_file, item_lines[0], new, codes, id_field)
    digest = hashlib.sha256(json.dumps([new, [list(c) for c in codes], emb.round(6).tolist()]).encode()).hexdigest()[:8]
    target = folder.parent.with_name(f"{folder.parent.name}-new{digest}") / name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    inter = _atomic_lines(folder / f"{name}.inter")
    columns = [c.split(":", 1)[0] for c in inter[0].split("\t")]
    u, i = columns.index(dataset.uid_field), columns.index(id_field)
    kept = [line for line in inter[1:] if (cells := line.split("\t"))[u] in users and cells[i] in items]
    (target / f"{name}.inter").write_text("\n".join([inter[0], *kept]) + "\n", encoding="utf-8")
    j = [c.split(":", 1)[0] for c in item_lines[0].split("\t")].index(id_field)
    kept = [line for line in item_lines[1:] if line.split("\t")[j] in items]
    (target / f"{name}.item").write_text("\n".join([item_lines[0], *kept]) + "\n" + added, encoding="utf-8")
    emb_file, items_file = embedding_files(folder, name)
    new_emb_file, new_items_file = embedding_files(target, name)
    np.save(new_emb_file, np.vstack([np.load(emb_file), emb]).astype(np.float32))
    tokens = items_file.read_text(encoding="utf-8").rstrip("\n").split("\n")
    new_items_file.write_text("\n".join(tokens + new) + "\n", encoding="utf-8")
    report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    report["cold_start"] = {**record, "from": str(folder)}
    (target / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return target


def _atomic_lines(path: Path) -> list[str]:
    """An atomic file's non-blank lines, split as RecBole's reader splits them."""
    return [line for line in re.split(r"\r\n|\n|\r", path.read_text(encoding="utf-8")) if line]


def grow_checkpoint(model_file: Path, model, dataset, artifact: Path, warm_emb: np.ndarray,
                    new: list[str], new_emb: np.ndarray, item_weights: str = "ridge") -> Path:
    """A checkpoint of ``model`` on the grown ``artifact``: every weight as trained and, in item
    mode, each new item's own weights (free token embedding, score bias): ``ridge`` predicts them
    from its integrated embedding with a ridge regression fitted on the warm items, ``mean`` gives
    every new item the warm items' mean (the baseline that uses nothing of the item)."""
    spec, config = checkpoint_config(model_file, data_folder=artifact.parent, extra=GROWN_SETTINGS)
    grown = load_data(spec, config).dataset
    state = dict(model.state_dict())
    if model.item_level:
        H, offset = model.hidden, model.item_offset
        own = torch.cat([state["token_embedding.weight"][offset:], state["item_bias"][:, None]], dim=1).cpu()
        if item_weights == "ridge":
            fit, _ = ridge(warm_emb, own[1:].numpy())  # row i + 1 of ``own`` is warm item i
            predicted = torch.from_numpy(fit.predict(new_emb)).float()
        else:
            predicted = own[1:].mean(0).expand(len(new), -1)
        own = torch.cat([own, predicted])
        old_id, new_pos = dataset.field2token_id[dataset.iid_field], {t: i for i, t in enumerate(new)}
        order = [old_id[t] if t in old_id else len(old_id) + new_pos[t] for t in grown.field2id_token[grown.iid_field]]
        own = own[order]
        state["token_embedding.weight"] = torch.cat([state["token_embedding.weight"][:offset].cpu(), own[:, :H]])
        state["item_bias"] = own[:, H].contiguous()
    saved = load_checkpoint(str(model_file))
    saved.update(config=plain_config(config), state_dict=state)
    saved.pop("optimizer", None)  # a checkpoint to recommend with, not to go on training
    target = model_file.with_name(f"{model_file.stem}-{artifact.parent.name.rsplit('-', 1)[-1]}-{item_weights}.pth")
    with atomic_file(target, binary=True) as handle:
        torch.save(saved, handle)
    return target
