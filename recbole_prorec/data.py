"""Finding atomic datasets, checking them before RecBole reads them, and describing them.

RecBole, given a dataset it cannot find, asks y/n on stdin and downloads; here a missing
dataset stops at once with a message that says where we looked and how to get the files.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from recbole.data.dataset import Dataset

from recbole_prorec import PROJECT_ROOT


class DatasetNotFoundError(FileNotFoundError):
    """No folder holds ``<name>/<name>.inter``."""


def search_folders(data_path: str | None, search_paths: Sequence[str] | None) -> list[Path]:
    """Folders to look in, in order: ``--data_path``, then the configured ``data_search_paths``."""
    folders = [Path(data_path)] if data_path else []
    for p in search_paths or []:
        p = Path(p)
        folders.append(p if p.is_absolute() else PROJECT_ROOT / p)
    return folders


def bundled_folder(name: str) -> Path | None:
    """RecBole ships ``ml-100k`` inside its package; use it when nothing else is found."""
    import recbole

    folder = Path(recbole.__file__).parent / "dataset_example"
    return folder if (folder / name / f"{name}.inter").is_file() else None


def find_dataset(name: str, folders: Iterable[Path]) -> Path:
    """The first folder holding ``<name>/<name>.inter`` (that folder's parent is RecBole's data_path)."""
    folders = list(folders)
    for folder in folders:
        if (folder / name / f"{name}.inter").is_file():
            return folder.resolve()
    bundled = bundled_folder(name)
    if bundled is not None:
        return bundled
    looked = "\n".join(f"  - {f / name}" for f in folders)
    incomplete = [f / name for f in folders if (f / name).is_dir()]
    hint = f"\n{incomplete[0]} exists but has no {name}.inter." if incomplete else ""
    raise DatasetNotFoundError(
        f"dataset '{name}' not found: no {name}.inter in\n{looked}{hint}\n"
        "Get the atomic files by one of:\n"
        f"  - pointing --data_path at a folder that holds {name}/{name}.inter "
        "(the shared Amazon 2014 copies live in ../shared/datasets);\n"
        "  - RecBole's own dataset collection (its atomic-file downloads; no interactive download "
        "is started from here);\n"
        "  - converting the raw McAuley 2014 files: python -m recbole_prorec.convert "
        "--reviews reviews_X_5.json.gz --meta meta_X.json.gz --out DIR --name NAME"
    )


ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's column types


def read_header(path: Path) -> list[str]:
    """Bare column names (``title`` of ``title:token_seq``) of an atomic file, whose header must
    give each column one of RecBole's types (RecBole's own error names neither file nor line)."""
    with open(path, "rb") as f:  # text mode would decode a whole buffer, not just this line
        raw = f.readline()
    try:
        header = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}, line 1: not UTF-8 text ({e.reason})") from None
    if not header:
        raise ValueError(f"{path} is empty: an atomic file starts with a header line")
    names = []
    for column in header.split("\t"):
        name, _, kind = column.partition(":")
        if not column.isprintable():
            raise ValueError(f"{path}, line 1: not a header of tab-separated column names (binary data?)")
        if kind not in ATOMIC_TYPES:
            raise ValueError(f"{path}, line 1: column {column!r} needs one of RecBole's types "
                             f"{', '.join(ATOMIC_TYPES)} after a colon (e.g. '{name}:token')")
        names.append(name)
    return names


def first_undecodable_line(path: Path) -> int:
    """The number of the first line of ``path`` that is not UTF-8 (0: none)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


def check_columns(folder: Path, name: str, load_col: Mapping[str, Sequence[str]] | None) -> None:
    """Every column that ``load_col`` asks for exists; RecBole itself would silently drop it."""
    for suffix, wanted in (load_col or {}).items():
        path = folder / name / f"{name}.{suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"load_col asks for '{suffix}' columns but {path} does not exist")
        missing = [c for c in wanted if c not in read_header(path)]
        if missing:
            raise ValueError(
                f"{path} lacks the column(s) {missing} named in load_col['{suffix}'] "
                f"(it has {read_header(path)})"
            )


def check_rows(path: Path, unique_id: str | None = None) -> None:
    """Every line of an atomic file has as many fields as its header: RecBole reads a file cut
    mid-line or a stray tab without a word, shifting or dropping values. The file has rows, in
    UTF-8. ``unique_id`` (an ``.item`` file's id column) must name each row once, where RecBole
    would keep one row silently; without it (an ``.inter`` file) no row may repeat another
    exactly, which would count one interaction twice and could put it in two splits."""
    header = read_header(path)
    column = header.index(unique_id) if unique_id in header else None
    first_line: dict = {}
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t")  # pandas' default quoting, as RecBole reads the file
            next(rows)
            for fields in rows:
                if fields:
                    _check_row(path, header, fields, rows.line_num, column, first_line, unique_id)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}, line {first_undecodable_line(path)}: not UTF-8 text ({e.reason})") from None
    if not first_line:
        raise ValueError(f"{path} has a header but no rows")


def _check_row(path: Path, header: list[str], fields: list[str], number: int, column: int | None,
               first_line: dict, unique_id: str | None) -> None:
    if len(fields) != len(header):
        raise ValueError(f"{path}, line {number}: {len(fields)} fields where the header has {len(header)} "
                         f"({chr(9).join(fields)[:60]!r}): a file cut mid-line, or a tab inside a value?")
    key = fields[column] if column is not None else tuple(fields)
    if key in first_line:
        what = f"'{key}' has a row already" if column is not None else "repeats the row"
        need = f"each {unique_id} needs exactly one" if column is not None else "remove repeated rows"
        raise ValueError(f"{path}, line {number}: {what} (line {first_line[key]}); {need}")
    first_line[key] = number


def drop_last_interactions(dataset: Dataset, n: int) -> None:
    """Remove each user's ``n`` latest interactions, in the order RecBole's split uses (a stable
    sort by time, so ties keep file order), before the split. With ``n = 1`` the validation item
    becomes the test target and the one before it the validation target: a nested leave-one-out
    on which a setting or an epoch can be chosen by a held-out split that, like the real test,
    lies two steps past the training data, without reading the real test split. Item and user
    ids stay those of the full dataset (RecBole's filters and remapping have run), so Stage I
    codes the same items."""
    if n < 0:
        raise ValueError(f"drop_last_interactions must be >= 0, got {n}")
    if n == 0:
        return
    feat = dataset.inter_feat  # a DataFrame until RecBole's build
    order = np.argsort(feat[dataset.time_field].to_numpy(), kind="stable")
    users = feat[dataset.uid_field].to_numpy()[order]
    from_end = pd.Series(users).groupby(users).cumcount(ascending=False).to_numpy()
    dataset.inter_feat = feat.iloc[np.sort(order[from_end >= n])].reset_index(drop=True)


def check_split(dataset: Dataset, config) -> None:
    """Leave-one-out (``LS: valid_and_test``) needs three interactions per user: one to train on,
    one to validate, one to test. RecBole splits shorter histories without a word."""
    split = (config["eval_args"] or {}).get("split") or {}
    if split.get("LS") != "valid_and_test":
        return
    uid = config["USER_ID_FIELD"]
    ids = dataset.inter_feat[uid]
    counts = np.bincount(ids.numpy() if isinstance(ids, torch.Tensor) else ids.to_numpy(), minlength=dataset.user_num)
    short = np.flatnonzero((counts > 0) & (counts < 3))
    if len(short):
        examples = ", ".join(f"{dataset.id2token(uid, int(u))}: {counts[u]}" for u in short[:5])
        raise ValueError(
            f"{len(short)} users of {config['data_path']} have fewer than 3 interactions ({examples}): "
            "leave-one-out needs one each to train on, validate and test. Drop them with the config key "
            "user_inter_num_interval: '[3,inf)'"
        )


def statistics(dataset: Dataset) -> dict:
    """Counts as in the paper's Table 2 (RecBole's counts include one padding id)."""
    users, items, inters = dataset.user_num - 1, dataset.item_num - 1, dataset.inter_num
    return {
        "users": users,
        "items": items,
        "interactions": inters,
        "density": inters / (users * items),
    }


def statistics_table(name: str, stats: Mapping[str, float]) -> str:
    return (
        "| Dataset | #Users | #Items | #Interactions | #Density |\n"
        "|---|---|---|---|---|\n"
        f"| {name} | {stats['users']:,} | {stats['items']:,} | {stats['interactions']:,} "
        f"| {stats['density']:.5f} |"
    )
