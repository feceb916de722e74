"""Tests of the Amazon 2014 -> RecBole atomic file converter on a tiny synthetic category."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recbole_prorec.convert import PANDAS_NA_STRINGS, convert_amazon2014, main

NAME = "Amazon_Tiny"

# (reviewerID, asin, unixReviewTime, overall) in raw-file order; min_core=2 below.
# Dedup first: U1/ITEMA keeps t=100 (not the earlier line with t=300); U5/ITEMG collapses
# to one review. k-core round 1 drops U5, ITEMG, ITEME; round 2 drops U3 (left with
# ITEMC only); round 3 drops ITEMC (left with U1 only). U1 then still has 2 items.
REVIEWS = [
    ("U2", "ITEMA", 10, 5.0),
    ("U1", "ITEMA", 300, 1.0),
    ("U2", "ITEMB", 10, 4.0),
    ("U1", "ITEMB", 50, 3.0),
    ("U3", "ITEMC", 1, 2.0),
    ("U1", "ITEMA", 100, 2.0),
    ("U3", "ITEME", 2, 5.0),
    ("U2", "ITEMD", 5, 1.0),
    ("U1", "ITEMC", 200, 4.0),
    ("U4", "ITEMD", 7, 5.0),
    ("U5", "ITEMG", 3, 3.0),
    ("U5", "ITEMG", 4, 3.0),
    ("U4", "ITEMB", 8, 2.0),
    ("U2", "ITEMH", 20, 3.0),
    ("U4", "ITEMH", 6, 4.0),
]

# 2014 meta lines are Python literals; ITEMB is strict JSON; ITEMH has no meta.
META_LINES = [
    r"""{'asin': 'ITEMA', 'title': "L'Oreal Tab\there &amp; Co", 'brand': 'Brand\'s', """
    r"""'categories': [['Beauty', 'Skin Care', 'Face'], ['Beauty', 'Makeup', 'Face']], """
    r"""'price': 12.5}""",
    r"""{"asin": "ITEMB", "title": "\"Quoted\" start", "categories": [["Beauty"]], "price": 3}""",
    r"""{'asin': 'ITEMC', 'title': 'Filtered out'}""",
    r"""{'asin': 'ITEMD', 'title': 'Line one\nline two\r\n', 'brand': 'N/A', 'description': 'x', """
    r"""'categories': [['Beauty', 'Hair Care'], ['Beauty', 'Hair Care', 'Shampoo']]}""",
    r"""{'asin': 'ITEMA', 'title': 'Second record is ignored'}""",
]

EXPECTED_INTER = [
    ["U2", "ITEMD", "5", "1.0"],
    ["U2", "ITEMA", "10", "5.0"],
    ["U2", "ITEMB", "10", "4.0"],
    ["U2", "ITEMH", "20", "3.0"],
    ["U1", "ITEMB", "50", "3.0"],
    ["U1", "ITEMA", "100", "2.0"],
    ["U4", "ITEMH", "6", "4.0"],
    ["U4", "ITEMD", "7", "5.0"],
    ["U4", "ITEMB", "8", "2.0"],
]

# Raw .item lines: only the field starting with '"' is CSV-quoted.
EXPECTED_ITEM_LINES = [
    "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tprice:float",
    "ITEMD\tLine one line two\t\tBeauty Hair_Care Shampoo\t",
    "ITEMA\tL'Oreal Tab here &amp; Co\tBrand's\tBeauty Skin_Care Face Makeup\t12.5",
    'ITEMB\t"""Quoted"" start"\t\tBeauty\t3.0',
    "ITEMH\t\t\t\t",
]


def _write_gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    return path


def _review_lines(reviews: list[tuple]) -> list[str]:
    return [
        json.dumps({"reviewerID": u, "asin": i, "reviewerName": "x", "helpful": [0, 0],
                    "overall": r, "unixReviewTime": t, "reviewTime": "01 1, 2014"})
        for u, i, t, r in reviews
    ]


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "raw"
    src.mkdir()
    return (
        _write_gz(src / "reviews_Tiny_5.json.gz", _review_lines(REVIEWS)),
        _write_gz(src / "meta_Tiny.json.gz", META_LINES),
    )


@pytest.fixture
def converted(raw: tuple[Path, Path], tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "data"
    stats = convert_amazon2014(raw[0], raw[1], out, NAME, min_core=2)
    return out, stats


def _read_like_recbole(path: Path) -> pd.DataFrame:
    """Mirror RecBole 1.2.1 Dataset._load_feat: header types, python-engine read_csv, seq split."""
    with open(path, encoding="utf-8") as f:
        head = f.readline()[:-1].split("\t")
    dtype = {h: np.float64 if h.endswith(":float") else str for h in head}
    df = pd.read_csv(path, delimiter="\t", usecols=head, dtype=dtype, encoding="utf-8",
                     engine="python")
    df.columns = [h.split(":")[0] for h in head]
    for h in head:
        if h.endswith(":token_seq"):
            col = h.split(":")[0]
            df[col] = [list(filter(None, s.split(" "))) for s in df[col].fillna("").values]
    return df


def test_inter_kcore_dedup_and_order(converted: tuple[Path, dict]) -> None:
    out, _ = converted
    lines = (out / NAME / f"{NAME}.inter").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float\trating:float"
    assert [line.split("\t") for line in lines[1:]] == EXPECTED_INTER


def test_item_rows(converted: tuple[Path, dict]) -> None:
    out, _ = converted
    text = (out / NAME / f"{NAME}.item").read_text(encoding="utf-8")
    assert text.splitlines() == EXPECTED_ITEM_LINES
    assert sorted(p.name for p in (out / NAME).iterdir()) == [f"{NAME}.inter", f"{NAME}.item"]


def test_recbole_style_pandas_reading(converted: tuple[Path, dict]) -> None:
    out, _ = converted
    inter = _read_like_recbole(out / NAME / f"{NAME}.inter")
    assert inter.values.tolist() == [[u, i, float(t), float(r)] for u, i, t, r in EXPECTED_INTER]
    item = _read_like_recbole(out / NAME / f"{NAME}.item")
    assert item["item_id"].tolist() == ["ITEMD", "ITEMA", "ITEMB", "ITEMH"]
    assert item["title"].tolist() == [
        ["Line", "one", "line", "two"], ["L'Oreal", "Tab", "here", "&amp;", "Co"],
        ['"Quoted"', "start"], [],
    ]
    assert item["brand"].isna().tolist() == [True, False, True, True]
    assert item.loc[1, "brand"] == "Brand's"
    assert item["categories"].tolist() == [
        ["Beauty", "Hair_Care", "Shampoo"], ["Beauty", "Skin_Care", "Face", "Makeup"],
        ["Beauty"], [],
    ]
    assert item["price"].fillna(-1).tolist() == [-1, 12.5, 3.0, -1]


def test_stats(converted: tuple[Path, dict]) -> None:
    _, stats = converted
    assert stats == {
        "users": 3,
        "items": 4,
        "interactions": 9,
        "density": 0.75,
        "coverage": {"title": 3, "brand": 1, "categories": 3, "price": 2},
        "items_without_meta": 1,
        "raw_reviews": 15,
        "duplicates_removed": 2,
        "kcore_rounds": 3,
    }


def test_cli_prints_stats(raw: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    args = ["--reviews", str(raw[0]), "--meta", str(raw[1]), "--out", str(tmp_path / "d"),
            "--name", NAME, "--min-core", "2"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["interactions"] == 9
    assert main(args) == 1
    assert "already exists" in capsys.readouterr().err


def test_overwrite_refused_then_allowed(
    converted: tuple[Path, dict], raw: tuple[Path, Path]
) -> None:
    out, _ = converted
    inter = out / NAME / f"{NAME}.inter"
    inter.write_text("sentinel\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match=f"{NAME}.inter"):
        convert_amazon2014(raw[0], raw[1], out, NAME, min_core=2)
    assert inter.read_text(encoding="utf-8") == "sentinel\n"
    convert_amazon2014(raw[0], raw[1], out, NAME, min_core=2, overwrite=True)
    assert inter.read_text(encoding="utf-8").splitlines()[1].split("\t") == EXPECTED_INTER[0]
    assert len(list((out / NAME).iterdir())) == 2  # no temp files left behind


def test_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    (tmp_path / NAME).mkdir()
    reviews = _write_gz(tmp_path / NAME / f"{NAME}.inter", _review_lines(REVIEWS))
    with pytest.raises(ValueError, match="would overwrite an input"):
        convert_amazon2014(reviews, None, tmp_path, NAME, min_core=2, overwrite=True)


def test_truncated_gzip_names_file(raw: tuple[Path, Path], tmp_path: Path) -> None:
    data = gzip.compress("".join(line + "\n" for line in _review_lines(REVIEWS * 50)).encode())
    bad = tmp_path / "reviews_Cut.json.gz"
    bad.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match=r"reviews_Cut\.json\.gz: line \d+: truncated"):
        convert_amazon2014(bad, raw[1], tmp_path / "out", NAME, min_core=2)
    assert not (tmp_path / "out").exists()


def test_bad_meta_and_missing_key_errors(raw: tuple[Path, Path], tmp_path: Path) -> None:
    bad_meta = _write_gz(tmp_path / "meta_Bad.json.gz", ["{'title': 'no asin'}"])
    with pytest.raises(ValueError, match=r"meta_Bad\.json\.gz: line 1: missing required key"):
        convert_amazon2014(raw[0], bad_meta, tmp_path / "out", NAME, min_core=2)
    lines = _review_lines(REVIEWS)
    lines[2] = json.dumps({"reviewerID": "U2", "asin": "ITEMB", "overall": 4.0})
    bad_reviews = _write_gz(tmp_path / "reviews_Bad.json.gz", lines)
    with pytest.raises(ValueError, match=r"reviews_Bad\.json\.gz: line 3: .*unixReviewTime"):
        convert_amazon2014(bad_reviews, None, tmp_path / "out", NAME, min_core=2)
    with pytest.raises(FileNotFoundError, match="nowhere.json.gz"):
        convert_amazon2014(tmp_path / "nowhere.json.gz", None, tmp_path / "out", NAME)
    assert not (tmp_path / "out").exists()


def test_na_strings_match_pandas() -> None:
    """The converter blanks exactly the values pandas (so RecBole) would read as missing."""
    from pandas._libs.parsers import STR_NA_VALUES

    assert PANDAS_NA_STRINGS == STR_NA_VALUES


def test_recbole_loads_output(converted: tuple[Path, dict], tmp_path: Path, monkeypatch) -> None:
    from recbole.config import Config
    from recbole.data import create_dataset

    monkeypatch.setattr(sys, "argv", ["x"])  # Config parses --k=v arguments from sys.argv
    out, stats = converted
    config = Config(
        model="SASRec",
        dataset=NAME,
        config_dict={
            "data_path": str(out),
            "load_col": {
                "inter": ["user_id", "item_id", "timestamp"],
                "item": ["item_id", "title", "brand", "categories", "price"],
            },
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full",
                          "group_by": "user"},
            "train_neg_sample_args": None,
            "loss_type": "CE",
            "checkpoint_dir": str(tmp_path / "saved"),
            "show_progress": False,
        },
    )
    dataset = create_dataset(config)
    assert dataset.user_num == stats["users"] + 1  # +1: RecBole's padding id
    assert dataset.item_num == stats["items"] + 1
    assert dataset.inter_num == stats["interactions"]
    item_a = dataset.token2id("item_id", "ITEMA")
    assert dataset.id2token("brand", int(dataset.item_feat["brand"][item_a])) == "Brand's"
