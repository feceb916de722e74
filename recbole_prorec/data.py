"""Finding atomic datasets, checking them before RecBole reads them, and describing them.

RecBole, given a dataset it cannot find, asks y/n on stdin and downloads; here a missing
dataset stops at once with a message that says where we looked and how to get the files.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Mapping, Sequence

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


def read_header(path: Path) -> list[str]:
    """Bare column names (``title`` of ``title:token_seq``) of an atomic file."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if not header:
        raise ValueError(f"{path} is empty: an atomic file starts with a header line")
    return [col.split(":")[0] for col in header.split("\t")]


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
    mid-line or a stray tab without a word, shifting or dropping values. ``unique_id`` (an
    ``.item`` file's id column) must name each row once; RecBole would keep one row silently."""
    header = read_header(path)
    column = header.index(unique_id) if unique_id in header else None
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")  # pandas' default quoting, as RecBole reads the file
        next(rows)
        for fields in rows:
            number = rows.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}, line {number}: {len(fields)} fields where the header has {len(header)} "
                                 f"({chr(9).join(fields)[:60]!r}): a file cut mid-line, or a tab inside a value?")
            if column is not None:
                key = fields[column]
                if key in first_line:
                    raise ValueError(f"{path}, line {number}: '{key}' has a row already (line {first_line[key]}); "
                                     f"each {unique_id} needs exactly one")
                first_line[key] = number


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
