"""Tests for recbole_prorec.semantic: item texts, encoding, caching and error messages."""
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from recbole_prorec.semantic import (
    EMPTY_TEXT_PLACEHOLDER,
    _pool,
    build_item_texts,
    encode_texts,
    item_semantic_embeddings,
    load_embedding_file,
    read_item_table,
)

TEXTS = ["red lipstick for women", "a red lipstick", "stainless steel camping stove"]
HEADER = "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq\tprice:float\n"


@pytest.fixture
def item_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.item"
    path.write_text(
        HEADER
        + "i1\tRed Lipstick\tAcme\tBeauty Skin_Care\t9.5\n"
        + "i2\tSoap &amp; Gel\t\tBath\t\n"
        + "i3\t\t\t\t3.0\n"
        + 'i4\tBig "Pro" Stove\tCampCo\t\t\n'
        + 'i5\t"""Quoted"" start"\t\t\t\n',  # as convert writes a title starting with '"'
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def mean_embeddings() -> np.ndarray:
    return encode_texts(TEXTS)


def test_read_item_table(item_file):
    table = read_item_table(item_file)
    assert list(table.columns) == ["item_id", "title", "brand", "categories", "price"]
    assert table.loc[2, "title"] == "" and table.loc[3, "title"] == 'Big "Pro" Stove'
    assert table.loc[4, "title"] == '"Quoted" start'  # what RecBole reads too
    assert table["price"].tolist() == ["9.5", "", "3.0", "", ""]


def test_read_item_table_errors(tmp_path, item_file):
    with pytest.raises(FileNotFoundError, match="missing.item"):
        read_item_table(tmp_path / "missing.item")
    with pytest.raises(ValueError, match="'asin'"):
        read_item_table(item_file, id_field="asin")


def test_build_item_texts_default_template(item_file):
    table = read_item_table(item_file)
    texts, n_empty = build_item_texts(
        table, ["i1", "i2", "i3", "i4", "unknown"], ["title", "brand", "categories"], None
    )
    assert texts[0] == "Title: Red Lipstick. Brand: Acme. Categories: Beauty, Skin Care."
    assert texts[1] == "Title: Soap & Gel. Categories: Bath."
    assert texts[2] == texts[4] == EMPTY_TEXT_PLACEHOLDER
    assert texts[3] == 'Title: Big "Pro" Stove. Brand: CampCo.'
    assert n_empty == 2


def test_build_item_texts_custom_template(item_file):
    table = read_item_table(item_file)
    texts, n_empty = build_item_texts(table, ["i4", "i1"], ["title"], "{title} by {brand}")
    assert texts == ['Big "Pro" Stove by CampCo', "Red Lipstick by Acme"]
    assert n_empty == 0


def test_build_item_texts_missing_columns(item_file):
    table = read_item_table(item_file)
    with pytest.raises(ValueError, match=r"\['color', 'size'\].*toy.item"):
        build_item_texts(table, ["i1"], ["title", "size", "color"], None, source=str(item_file))


def test_build_item_texts_all_empty(item_file):
    table = read_item_table(item_file)
    with pytest.raises(ValueError, match="All 2 items have empty text in .*toy.item"):
        build_item_texts(table, ["i3", "zzz"], ["title", "brand"], None, source=str(item_file))


def test_minilm_embeddings_are_semantic(mean_embeddings):
    emb = mean_embeddings
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_last_pooling_and_order_restored(mean_embeddings):
    last = encode_texts(TEXTS, pooling="last", batch_size=2)
    assert last.shape == (3, 384) and np.isfinite(last).all()
    assert not np.allclose(last, mean_embeddings)
    reordered = encode_texts(TEXTS[::-1], batch_size=2)  # length-sorted batching keeps order
    np.testing.assert_allclose(reordered[::-1], mean_embeddings, atol=1e-5)


def test_pool_handles_left_and_right_padding():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert _pool(hidden, right, "last").squeeze(1).tolist() == [1.0, 7.0]
    assert _pool(hidden, left, "last").squeeze(1).tolist() == [3.0, 7.0]
    assert _pool(hidden, left, "cls").squeeze(1).tolist() == [2.0, 4.0]
    assert _pool(hidden, right, "mean").squeeze(1).tolist() == [0.5, 5.5]


def test_cache_hit_skips_encoder(tmp_path, monkeypatch):
    first = encode_texts(TEXTS, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("encoder loaded despite cache hit")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    np.testing.assert_array_equal(encode_texts(TEXTS, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="despite cache hit"):  # other settings: a miss
        encode_texts(TEXTS, pooling="cls", cache_dir=tmp_path)


def test_missing_encoder_path_names_key(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="semantic_encoder"):
        encode_texts(TEXTS, encoder=str(tmp_path / "no_such_model"))


def test_load_embedding_file(tmp_path):
    path = tmp_path / "emb.npy"
    np.save(path, np.ones((4, 3), dtype=np.float64))
    loaded = load_embedding_file(path, 4)
    assert loaded.shape == (4, 3) and loaded.dtype == np.float32
    with pytest.raises(ValueError, match="emb.npy.*4 rows, expected 5"):
        load_embedding_file(path, 5)
    np.save(tmp_path / "flat.npy", np.ones(4))
    with pytest.raises(ValueError, match="flat.npy.*2-D"):
        load_embedding_file(tmp_path / "flat.npy", 4)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        load_embedding_file(tmp_path / "nope.npy", 4)


def test_item_semantic_embeddings(item_file, tmp_path):
    tokens = ["[PAD]", "i1", "i2", "i3"]
    emb = item_semantic_embeddings(item_file, tokens, columns=["title", "brand", "categories"],
                                   cache_dir=tmp_path / "cache")
    assert emb.shape == (4, 384)
    np.testing.assert_allclose(emb[0], emb[3], atol=1e-6)  # both empty: the placeholder text
    # a precomputed file has one row per .item row (i1..i5), picked here for the tokens asked
    path = tmp_path / "pre.npy"
    rows = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    np.save(path, rows)
    from_file = item_semantic_embeddings(item_file, ["i3", "i1"], columns=["nonexistent"],
                                         embedding_file=path)
    np.testing.assert_array_equal(from_file, rows[[2, 0]])
    with pytest.raises(ValueError, match="pre.npy.*lack items \\['zz'\\]"):
        item_semantic_embeddings(item_file, ["i1", "zz"], columns=["title"], embedding_file=path)
    np.save(path, rows[:4])
    with pytest.raises(ValueError, match="pre.npy has 4 rows, expected 5"):
        item_semantic_embeddings(item_file, ["i1"], columns=["title"], embedding_file=path)
