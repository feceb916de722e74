"""The Stage-I artifact: the only thing Stage I hands to Stage II, its writers and its readers.

An ordinary RecBole atomic dataset folder ``<unicode_dir>/<dataset>-<key>/<dataset>/``:

- ``<dataset>.inter``, a copy of the source's;
- ``<dataset>.item``, the source's with an added ``unicode:token_seq`` column, each item's code;
- ``<dataset>.emb.npy``, the integrated item embeddings (IKD's targets), whose row ``i`` belongs
  to the item token on line ``i`` of ``<dataset>.emb_items.txt``;
- ``stage1.json``, Stage I's report, written last: its presence marks the folder complete.

``<key>`` is Stage I's cache key (``stage1.stage1_key``); RecBole gets the parent of the folder as
``data_path``, so Stage II reads the codes as one more item feature.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recbole_prorec.data import read_header

UNICODE_FIELD = "unicode"
REPORT_FILE = "stage1.json"


@dataclass(frozen=True)
class Artifact:
    """Where one Stage-I output lives: ``root`` is RecBole's ``data_path`` for it."""

    root: Path
    dataset: str

    @classmethod
    def locate(cls, unicode_dir: str | Path, dataset: str, key: str) -> "Artifact":
        return cls(Path(unicode_dir) / f"{dataset}-{key}", dataset)

    @property
    def folder(self) -> Path:
        return self.root / self.dataset

    @property
    def report_file(self) -> Path:
        return self.folder / REPORT_FILE

    @property
    def complete(self) -> bool:
        return self.report_file.is_file()

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_file.read_text(encoding="utf-8"))

    @classmethod
    def find(cls, unicode_dir: str | Path, dataset: str, field: str, value: Any) -> "Artifact | None":
        """A complete artifact of ``dataset`` under ``unicode_dir`` whose report has ``field == value``."""
        for report_file in sorted(Path(unicode_dir).glob(f"{dataset}-*/{dataset}/{REPORT_FILE}")):
            artifact = cls(report_file.parent.parent, dataset)
            try:
                if artifact.report().get(field) == value:
                    return artifact
            except (OSError, ValueError) as e:  # another run's damaged report: not this one's to mend
                getLogger().warning(f"Stage I: skipping {report_file} ({e})")
        return None


@dataclass(frozen=True)
class ItemCodes:
    """What Stage I computed, row by row: item tokens (``.item`` ids), their codes as space-separated
    strings, and their integrated embeddings [len(tokens), d]."""

    tokens: list[str]
    codes: list[str]
    embeddings: np.ndarray


def embedding_files(folder: Path, dataset: str) -> tuple[Path, Path]:
    """The integrated embeddings and the item token of each of their rows."""
    return folder / f"{dataset}.emb.npy", folder / f"{dataset}.emb_items.txt"


def read_item_embeddings(folder: Path, dataset: str) -> tuple[list[str], np.ndarray]:
    """The item tokens and their integrated embeddings [len(tokens), d], as Stage I wrote them."""
    emb_file, items_file = embedding_files(folder, dataset)
    emb = np.load(emb_file, allow_pickle=False)
    tokens = items_file.read_text(encoding="utf-8").split("\n")[: len(emb)]
    if emb.ndim != 2 or len(tokens) != len(emb):
        raise ValueError(f"{emb_file} ({emb.shape}) does not match the {len(tokens)} tokens of {items_file}")
    return tokens, emb


def write_artifact(artifact: Artifact, source: Path, items: ItemCodes, report: dict[str, Any], *, id_field: str) -> None:
    """Write the folder atomically: build it aside, then rename it into place, so a reader never
    sees a half-written artifact and a failed run leaves the previous one intact."""
    target = artifact.folder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{artifact.dataset}-", dir=target.parent))
    try:
        write_artifact_files(source, tmp, artifact.dataset, items, id_field=id_field)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_artifact_files(source: Path, target: Path, dataset: str, items: ItemCodes, *, id_field: str) -> None:
    """The data files (no report) in ``target``: ``.inter``, ``.item`` with codes, embeddings."""
    shutil.copyfile(source / f"{dataset}.inter", target / f"{dataset}.inter")
    write_item_file(source / f"{dataset}.item", target / f"{dataset}.item", items.tokens, items.codes, id_field)
    emb_file, items_file = embedding_files(target, dataset)
    np.save(emb_file, items.embeddings.astype(np.float32, copy=False))
    items_file.write_text("\n".join(items.tokens) + "\n", encoding="utf-8")


def write_item_file(source: Path, target: Path, tokens: list[str], codes: list[str], id_field: str) -> None:
    """Copy ``source`` line by line adding a ``unicode`` column; items missing from it get a row."""
    code_of = dict(zip(tokens, codes))
    if source.is_file():
        header = read_header(source)
        if id_field not in header:
            raise ValueError(f"{source} has no '{id_field}' column")
        if UNICODE_FIELD in header:
            raise ValueError(f"{source} already has a '{UNICODE_FIELD}' column")
        # lines as RecBole's pandas sees them: blank ones skipped, and no split at \x0c, \u2028, ...
        # (str.splitlines would split there and shift codes into the wrong rows)
        lines = [line for line in re.split(r"\r\n|\n|\r", source.read_text(encoding="utf-8")) if line]
    else:  # a dataset without item features still gets codes
        header, lines = [id_field], [f"{id_field}:token"]
    col = header.index(id_field)
    seen = set()
    out = [lines[0] + f"\t{UNICODE_FIELD}:token_seq"]
    for line in lines[1:]:
        token = line.split("\t")[col]
        seen.add(token)
        out.append(f"{line}\t{code_of.get(token, '')}")
    blanks = ["" for _ in header]
    for token in tokens:
        if token not in seen:
            row = list(blanks)
            row[col] = token
            out.append("\t".join(row + [code_of[token]]))
    target.write_text("\n".join(out) + "\n", encoding="utf-8")


def _no_codes(dataset: str, data_file: Path | str) -> ValueError:
    return ValueError(
        f"dataset '{dataset}' has no '{UNICODE_FIELD}' column in {data_file}: run Stage I first "
        f"(python run_recbole_prorec.py --model=PRORec --dataset={dataset} --stage=unicode) "
        "or point data_path at its output folder"
    )


def require_codes(folder: Path, dataset: str) -> None:
    """Before RecBole loads a dataset for a model of codes: say how to make them if they are missing."""
    item_file = folder / f"{dataset}.item"
    if not item_file.is_file() or UNICODE_FIELD not in read_header(item_file):
        raise _no_codes(dataset, item_file)


def load_codes(dataset, data_file: str) -> torch.Tensor:
    """Codes [n_items, max_len] (-1 padded) from the dataset's ``unicode`` token_seq feature."""
    if UNICODE_FIELD not in dataset.field2type:
        raise _no_codes(dataset.dataset_name, data_file)
    tokens = dataset.field2id_token[UNICODE_FIELD]
    try:
        value = np.array([-1] + [int(t) for t in tokens[1:]], dtype=np.int64)
    except ValueError as e:
        raise ValueError(f"{data_file}: '{UNICODE_FIELD}' holds a non-integer code ({e})") from None
    codes = torch.from_numpy(value)[dataset.item_feat[UNICODE_FIELD].long()]
    missing = torch.nonzero((codes < 0).all(dim=1)[1:]).flatten() + 1
    if len(missing):
        names = dataset.id2token(dataset.iid_field, missing[:5].numpy())
        raise ValueError(
            f"{data_file}: {len(missing)} item(s) of the interactions have no '{UNICODE_FIELD}' code, "
            f"e.g. {list(names)}"
        )
    codes[0] = -1
    _, inverse, counts = np.unique(codes[1:].numpy(), axis=0, return_inverse=True, return_counts=True)
    shared = np.flatnonzero(counts[inverse.ravel()] > 1)
    if len(shared):  # the beam search could never tell these items apart
        group = np.flatnonzero(inverse.ravel() == inverse.ravel()[shared[0]]) + 1
        code = " ".join(str(int(c)) for c in codes[group[0]] if c >= 0)
        raise ValueError(
            f"{data_file}: {len(shared)} items share their '{UNICODE_FIELD}' code with another, e.g. "
            f"{list(dataset.id2token(dataset.iid_field, group[:5]))} all have '{code}'; codes must be unique "
            "(rebuild the Stage-I output with stage1_rerun=True)"
        )
    return codes


def load_integrated(dataset, data_dir: Path) -> torch.Tensor:
    """Stage-I integrated embeddings aligned to the dataset's internal item ids (row 0 zeros)."""
    name = dataset.dataset_name
    emb_file, items_file = embedding_files(data_dir, name)
    if not emb_file.is_file() or not items_file.is_file():
        raise FileNotFoundError(
            f"PRORec needs Stage I's embeddings {emb_file} and {items_file} for IKD and integrated_item_tokens "
            "(or ikd_weight: 0 and integrated_item_tokens: False)"
        )
    tokens, emb = read_item_embeddings(data_dir, name)
    row_of = {t: i for i, t in enumerate(tokens)}
    ids = dataset.field2id_token[dataset.iid_field][1:]
    absent = [t for t in ids if t not in row_of]
    if absent:
        raise ValueError(f"{emb_file} is not the Stage-I output of this dataset: no embedding for items {absent[:5]}")
    out = np.zeros((len(ids) + 1, emb.shape[1]), dtype=np.float32)
    out[1:] = emb[[row_of[t] for t in ids]]
    return torch.from_numpy(out)
