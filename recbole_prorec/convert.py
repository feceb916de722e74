"""Convert raw Amazon Reviews 2014 (McAuley) files into RecBole atomic files.

Output layout, ``<out_dir>/<name>/``:

* ``<name>.inter``: ``user_id:token item_id:token timestamp:float rating:float``.
  Grouped by user (order of the user's first review in the raw file), chronological
  within a user (ties keep the raw-file order). ``timestamp`` is the real unixReviewTime.
* ``<name>.item``: ``item_id:token title:token_seq brand:token categories:token_seq
  price:float``, one row per surviving item in order of first appearance in ``.inter``;
  items without metadata get an empty row.

Escaping. RecBole 1.2.1 reads atomic files with ``pandas.read_csv(sep="\\t",
engine="python")`` and pandas' default quoting and NA handling, so:

* tab, newline and carriage return split fields or rows: they become spaces and the
  text is stripped. Other characters, HTML entities included, are kept raw.
* a field *starting* with ``"`` opens a quoted field (a parse error or a silently
  merged value). Only such fields are written CSV-quoted (``"`` + text with ``"``
  doubled + ``"``), which pandas reads back exactly. A ``"`` elsewhere is read
  literally and is left alone, so almost every line stays plain ``split("\\t")``-able.
* a whole field equal to one of pandas' default NA strings (``NA``, ``N/A``, ``None``,
  ``null``, ...) is read as missing whatever the quoting, so it is written empty and
  counted as missing. Such an id is an error.
"""
import argparse
import ast
import gzip
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from logging import INFO, basicConfig, getLogger
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from recbole_prorec.files import atomic_file

logger = getLogger(__name__)

INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float", "rating:float")
ITEM_HEADER = (
    "item_id:token",
    "title:token_seq",
    "brand:token",
    "categories:token_seq",
    "price:float",
)
META_FIELDS = ("title", "brand", "categories", "price")
REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime", "overall")

# pandas' default na_values (pandas._libs.parsers.STR_NA_VALUES), which RecBole keeps.
PANDAS_NA_STRINGS = frozenset(
    {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    }
)
_LINE_BREAKS = re.compile(r"[\t\n\r]")
# Cheap asin lookup so that meta lines of filtered-out items skip the slow literal_eval.
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"'\\]+)["']""")


def _gz_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) and turn gzip/decoding failures into errors naming the file."""
    lineno = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(tqdm(f, desc=path.name, unit=" lines", disable=None), 1):
                yield lineno, line
    except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: line {lineno + 1}: truncated, corrupted or non-UTF-8 gzip input ({e})"
        ) from e


def _check_id(value: object, key: str, where: str) -> str:
    """Ids are written verbatim, so reject those RecBole would split or read as missing."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if _LINE_BREAKS.search(value) or value in PANDAS_NA_STRINGS:
        raise ValueError(f"{where}: {key!r} value {value!r} cannot be stored in an atomic file")
    return value


def read_reviews(path: Path) -> pd.DataFrame:
    """Read a reviews file into columns user, item, time, rating, line (raw-file order)."""
    rows = []
    for lineno, line in _gz_lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object")
        missing = [k for k in REVIEW_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        try:
            time, rating = int(rec["unixReviewTime"]), float(rec["overall"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad unixReviewTime or overall ({e})") from e
        user = _check_id(rec["reviewerID"], "reviewerID", where)
        item = _check_id(rec["asin"], "asin", where)
        rows.append((user, item, time, rating, lineno))
    if not rows:
        raise ValueError(f"{path}: no reviews found")
    return pd.DataFrame(rows, columns=["user", "item", "time", "rating", "line"])


def drop_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Keep each (user, item) pair's earliest review; ties keep the raw-file order."""
    return df.sort_values(["time", "line"]).drop_duplicates(["user", "item"], keep="first")


def k_core(df: pd.DataFrame, k: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with fewer than k interactions until none is left; return rounds."""
    rounds = 0
    while True:
        keep = (df.groupby("user")["item"].transform("size") >= k) & (
            df.groupby("item")["user"].transform("size") >= k
        )
        if keep.all():
            return df, rounds
        rounds += 1
        df = df[keep]
        logger.info(f"{k}-core round {rounds}: {len(df)} interactions left")


def order_by_user(df: pd.DataFrame, user_rank: dict[str, int]) -> pd.DataFrame:
    """Group by user in raw-file first-appearance order, chronological within a user."""
    return (
        df.assign(rank=df["user"].map(user_rank))
        .sort_values(["rank", "time", "line"])
        .drop(columns="rank")
        .reset_index(drop=True)
    )


def _parse_meta_line(line: str, where: str) -> dict:
    """Parse strict JSON, falling back to the Python dict literals of the 2014 release."""
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f"{where}: neither JSON nor a Python dict literal ({e})") from e
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    if "asin" not in rec:
        raise ValueError(f"{where}: missing required key 'asin'")
    return rec


def read_meta(path: Path, wanted: set[str]) -> dict[str, dict]:
    """Read metadata of the wanted items; the first record of an asin wins."""
    meta: dict[str, dict] = {}
    for lineno, line in _gz_lines(path):
        if not line.strip():
            continue
        hit = _ASIN.search(line)
        if hit and (hit.group(1) not in wanted or hit.group(1) in meta):
            continue
        rec = _parse_meta_line(line, f"{path}: line {lineno}")
        asin = str(rec["asin"])
        if asin in wanted and asin not in meta:
            meta[asin] = rec
    return meta


def clean_text(value: object) -> str:
    """One-line text: tabs/newlines become spaces; HTML entities are kept raw."""
    if value is None:
        return ""
    return _LINE_BREAKS.sub(" ", str(value)).strip()


def clean_categories(value: object) -> str:
    """Flatten category paths into unique space-free tokens in first-seen order."""
    paths = value if isinstance(value, list) else []
    tokens: dict[str, None] = {}
    for path in paths:
        for cat in path if isinstance(path, list) else [path]:
            token = "_".join(clean_text(cat).split())
            if token:
                tokens[token] = None
    return " ".join(tokens)


def clean_price(value: object) -> str:
    """A finite float, else empty (RecBole fills empty floats with the column mean)."""
    try:
        price = float(value)
    except (TypeError, ValueError):
        return ""
    return repr(price) if math.isfinite(price) else ""


def item_fields(rec: dict | None) -> dict[str, str]:
    """Item metadata as cleaned strings; an NA-like value becomes empty, as pandas would read it."""
    rec = rec or {}
    fields = {
        "title": clean_text(rec.get("title")),
        "brand": clean_text(rec.get("brand")),
        "categories": clean_categories(rec.get("categories")),
        "price": clean_price(rec.get("price")),
    }
    return {k: "" if v in PANDAS_NA_STRINGS else v for k, v in fields.items()}


def quote_cell(value: str) -> str:
    """CSV-quote only a field starting with '"', the one case pandas misreads."""
    return '"' + value.replace('"', '""') + '"' if value.startswith('"') else value


def _write_all(files: dict[Path, tuple[tuple[str, ...], Iterable[Iterable[str]]]]) -> None:
    """Write every file, replacing the targets only once all are written: no half-written outputs."""
    with ExitStack() as stack:
        for target, (header, rows) in files.items():
            f = stack.enter_context(atomic_file(target))
            f.write("\t".join(header) + "\n")
            for row in rows:
                f.write("\t".join(quote_cell(c) for c in row) + "\n")


def _output_paths(
    reviews: Path, meta: Path | None, out_dir: Path, name: str, overwrite: bool
) -> tuple[Path, Path]:
    """Validate inputs and outputs before any work, so mistakes fail fast."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"invalid dataset name {name!r}: it must be a plain file name")
    inputs = [p for p in (reviews, meta) if p is not None]
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    inter, item = out_dir / name / f"{name}.inter", out_dir / name / f"{name}.item"
    for out in (inter, item):
        if any(out.resolve() == p.resolve() for p in inputs):
            raise ValueError(f"output {out} would overwrite an input file")
        if out.exists() and not overwrite:
            raise FileExistsError(f"output file already exists: {out} (pass overwrite=True)")
    return inter, item


def convert_amazon2014(
    reviews: Path,
    meta: Path | None,
    out_dir: Path,
    name: str,
    min_core: int = 5,
    overwrite: bool = False,
) -> dict:
    """Convert one Amazon 2014 category to RecBole atomic files and return statistics.

    Duplicate (user, item) pairs keep their earliest review and are dropped before the
    iterative ``min_core``-core filter, so repeated reviews cannot keep a user alive.
    """
    if min_core < 1:
        raise ValueError(f"min_core must be >= 1, got {min_core}")
    reviews, out_dir = Path(reviews), Path(out_dir)
    meta = Path(meta) if meta is not None else None
    inter_path, item_path = _output_paths(reviews, meta, out_dir, name, overwrite)

    raw = read_reviews(reviews)
    user_rank = {u: i for i, u in enumerate(raw["user"].unique())}
    dedup = drop_duplicates(raw)
    df, rounds = k_core(dedup, min_core)
    if df.empty:
        raise ValueError(f"{reviews}: no interactions survive {min_core}-core filtering")
    df = order_by_user(df, user_rank)

    items = list(df["item"].unique())
    metadata = read_meta(meta, set(items)) if meta is not None else {}
    fields = {i: item_fields(metadata.get(i)) for i in items}

    inter_rows = (
        (u, i, str(t), repr(r))
        for u, i, t, r in zip(df["user"], df["item"], df["time"], df["rating"])
    )
    item_rows = ([i] + [fields[i][f] for f in META_FIELDS] for i in items)
    inter_path.parent.mkdir(parents=True, exist_ok=True)
    _write_all({inter_path: (INTER_HEADER, inter_rows), item_path: (ITEM_HEADER, item_rows)})
    logger.info(f"wrote {inter_path} and {item_path}")

    n_users, n_items = df["user"].nunique(), len(items)
    return {
        "users": n_users,
        "items": n_items,
        "interactions": len(df),
        "density": len(df) / (n_users * n_items),
        "coverage": {f: sum(bool(v[f]) for v in fields.values()) for f in META_FIELDS},
        "items_without_meta": sum(i not in metadata for i in items),
        "raw_reviews": len(raw),
        "duplicates_removed": len(raw) - len(dedup),
        "kcore_rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: convert and print the statistics as JSON."""
    parser = argparse.ArgumentParser(
        description="Convert raw Amazon Reviews 2014 files into RecBole atomic files."
    )
    parser.add_argument(
        "--reviews", type=Path, required=True, help="reviews_<Category>[_5].json.gz"
    )
    parser.add_argument("--meta", type=Path, default=None, help="meta_<Category>.json.gz")
    parser.add_argument("--out", type=Path, required=True, help="data_path; writes OUT/NAME/NAME.*")
    parser.add_argument("--name", required=True, help="dataset name, e.g. Amazon_Beauty")
    parser.add_argument("--min-core", type=int, default=5)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    basicConfig(level=INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = convert_amazon2014(
            args.reviews, args.meta, args.out, args.name, args.min_core, args.overwrite
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
