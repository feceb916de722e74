"""New items from text alone: placement in Stage I's k-means tree, the grown checkpoint, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DATASET, TOPICS
from recbole_prorec.cold_start import CodeTree, add_items, place


def test_tree_takes_the_nearest_cluster_with_room_then_the_lowest_free_index():
    # two clusters of K=2 leaves: cluster 0 (near the origin) is full, cluster 1 (near 10) has room
    codes = [(0, 0), (0, 1), (1, 0)]
    emb = np.array([[0.0], [0.2], [10.0]])
    tree = CodeTree(codes, emb, K=2)
    assert tree.centroid[(0,)] == pytest.approx([0.1]) and tree.centroid[(1,)] == pytest.approx([10.0])
    assert tree.place_nearest(np.array([0.0])) == (1, 1)  # the nearest cluster is full
    assert tree.place_nearest(np.array([10.0])) is None  # now everything is
    with pytest.raises(ValueError, match="new.item: no free code is left for new item 1.*codebook_size=2"):
        place(tree, np.zeros((1, 1)), "tree", 0, __import__("pathlib").Path("new.item"))


def test_random_placement_fills_open_leaf_clusters_reproducibly():
    codes = [(0, 0), (1, 0), (2, 0), (2, 1)]
    trees = [CodeTree(codes, np.zeros((4, 1)), K=2) for _ in range(2)]
    a, b = (place(t, np.zeros((2, 1)), "random", 3, None) for t in trees)
    assert a == b and sorted(a) == [(0, 1), (1, 1)]  # cluster 2 is full; each open one gets one item


NEW_ITEMS = [("n1", "strategy board game 11", "Meeple", "Toys Board_Games"),
             ("n2", "strategy board game 12", "Meeple", "Toys Board_Games"),
             ("n3", f"{TOPICS[0][0]} 11", TOPICS[0][1], TOPICS[0][2])]


def write_new_items(path, rows=NEW_ITEMS):
    lines = ["item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq"] + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grown(trained_prorec, tmp_path_factory):
    new_file = write_new_items(tmp_path_factory.mktemp("new") / "new.item")
    return add_items(trained_prorec, new_file), new_file


def test_new_items_get_unique_codes_in_the_nearest_clusters(trained_prorec, grown):
    from recbole_prorec import load_data_and_model
    from recbole_prorec.cold_start import _artifact_embeddings

    result, _ = grown
    config, model, dataset, *_ = load_data_and_model(trained_prorec)
    warm = [tuple(int(c) for c in row if c >= 0) for row in model.codes[1:].tolist()]
    assert result.items == ["n1", "n2", "n3"] and len(set(result.codes)) == 3
    assert not set(result.codes) & set(warm)
    # each joins a leaf cluster: warm items' complete codes share its prefix
    assert all(any(w[:-1] == c[:-1] and len(w) == len(c) for w in warm) for c in result.codes)
    # the first code is the top-level cluster whose centroid is nearest to the predicted embedding
    emb = np.load(result.artifact / f"{DATASET}.emb.npy")[-3:]
    warm_emb = _artifact_embeddings(result.artifact, DATASET, [str(t) for t in dataset.field2id_token["item_id"][1:]])
    first = np.array([c[0] for c in warm])
    clusters = np.unique(first)
    centroids = np.stack([warm_emb[first == c].mean(0) for c in clusters])
    nearest = clusters[((emb[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]
    assert [c[0] for c in result.codes] == nearest.tolist()
    assert 0.0 < result.map_r2 <= 1.0


def test_grown_checkpoint_keeps_every_trained_weight_and_recommends_new_items(trained_prorec, grown):
    from recbole_prorec import load_data_and_model
    from recbole_prorec.recommend import recommend, score

    result, _ = grown
    _, old, old_data, *_ = load_data_and_model(trained_prorec)
    config, new, new_data, *_ = load_data_and_model(result.checkpoint)
    assert new.n_items == old.n_items + 3
    old_id, new_id = old_data.field2token_id["item_id"], new_data.field2token_id["item_id"]
    warm = list(old_id)[1:]
    rows = torch.tensor([new_id[t] for t in warm])
    assert torch.equal(new.item_bias[rows], old.item_bias[torch.tensor([old_id[t] for t in warm])])
    # the tokens ranking uses (in training ID dropout leaves the free part out of random items')
    table_old, table_new = old.eval().token_table().detach(), new.eval().token_table().detach()
    assert torch.equal(table_new[new.item_offset + rows], table_old[old.item_offset + torch.tensor([old_id[t] for t in warm])])
    for key, value in old.state_dict().items():
        if key not in ("token_embedding.weight", "item_bias"):
            assert torch.equal(new.state_dict()[key], value), key
    # the new items are reachable: beam search and brute force agree that they can be decoded
    fresh = torch.tensor([new_id[t] for t in result.items])
    assert torch.isfinite(new.item_bias[fresh]).all()
    history = [warm[:4]]
    scores = score(new, [[new_id[t] for t in history[0]]], config["MAX_ITEM_LIST_LENGTH"], "cpu")
    assert scores.shape == (1, new.n_items)
    (rec,) = recommend(result.checkpoint, history=history, k=20)
    assert len(rec.items) == 20
    titles = dict(zip(rec.items, rec.titles))
    for item, title, *_ in NEW_ITEMS:
        if item in titles:
            assert titles[item] == title


def test_bad_new_items_are_named(trained_prorec, tmp_path):
    with pytest.raises(ValueError, match=r"new.item: items \['i01'\] are already in the model's dataset"):
        add_items(trained_prorec, write_new_items(tmp_path / "new.item", [("i01", "x", "y", "z")]))
    with pytest.raises(ValueError, match=r"dup.item: item ids \['n1'\] appear more than once"):
        add_items(trained_prorec, write_new_items(tmp_path / "dup.item", [NEW_ITEMS[0], NEW_ITEMS[0]]))
    with pytest.raises(FileNotFoundError, match="missing.item does not exist"):
        add_items(trained_prorec, tmp_path / "missing.item")
    with pytest.raises(ValueError, match="placement must be one of"):
        add_items(trained_prorec, tmp_path / "new.item", placement="nearest")


def test_command_line_adds_items_and_says_how_to_recommend(trained_prorec, tmp_path, capsys):
    from recbole_prorec.cli import main

    new_file = write_new_items(tmp_path / "new.item", NEW_ITEMS[:1])
    main(["--add_items", str(new_file), "--placement", "random", "--item_weights", "mean",
          f"--load_checkpoint={trained_prorec}"])
    out = capsys.readouterr().out
    assert "1 new items placed (random, mean item weights" in out and "| n1 | " in out
    checkpoint = out.split("checkpoint: ")[1].split("\n")[0]
    assert checkpoint.endswith("-mean.pth")  # the grown checkpoint names its item weights
    assert checkpoint.endswith(".pth") and __import__("pathlib").Path(checkpoint).is_file()
    assert f"--recommend --load_checkpoint={checkpoint}" in out
    with pytest.raises(SystemExit):
        main(["--add_items", str(new_file)])
    assert "--add_items needs --load_checkpoint=FILE" in capsys.readouterr().err


def test_a_full_leaf_beside_a_cluster_sends_the_item_into_the_cluster():
    # the root holds a complete code (0,) and clusters 1 and 2; with K=3 the root has no free index
    tree = CodeTree([(0,), (1, 2), (1, 3), (2, 0, 1)], np.zeros((4, 1)), K=4)
    first = tree.place_nearest(np.zeros(1))
    assert first == (3,)  # a free index beside the complete code comes first
    assert tree.place_nearest(np.zeros(1)) in {(1, 0), (1, 1)}  # then the clusters below


def test_ids_recbole_would_drop_and_unparsable_floats_are_refused(trained_prorec, tmp_path):
    with pytest.raises(ValueError, match=r"item ids \['NA'\] would be read by RecBole as missing"):
        add_items(trained_prorec, write_new_items(tmp_path / "na.item", [("NA", "x", "y", "z")]))
    from recbole_prorec.cold_start import new_item_rows

    new = tmp_path / "n.item"  # a quoted title with quotes and a run of spaces inside
    new.write_text('item_id:token\ttitle:token_seq\nn9\t"say ""hi""   there"\n', encoding="utf-8")
    header = "item_id:token\ttitle:token_seq\tprice:float\tunicode:token_seq"
    row = new_item_rows(new, header, ["n9"], [(1, 2)], "item_id")
    import pandas as pd
    back = pd.read_csv(__import__("io").StringIO(header + "\n" + row), sep="\t", dtype=str, keep_default_na=False)
    assert back.iloc[0].tolist() == ["n9", 'say "hi" there', "", "1 2"]  # quoted, spaces cleaned, price blank
    bad = tmp_path / "bad.item"
    bad.write_text("item_id:token\ttitle:token_seq\tprice:float\nn9\tx\tcheap\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.item: item n9's price 'cheap' is not a number \(price:float\)"):
        new_item_rows(bad, header, ["n9"], [(1, 2)], "item_id")


def test_mean_item_weights_give_every_new_item_the_warm_mean(trained_prorec, grown, tmp_path):
    from recbole_prorec import load_data_and_model

    _, new_file = grown
    result = add_items(trained_prorec, new_file, item_weights="mean")
    assert result.checkpoint.name.endswith("-mean.pth") and result.checkpoint != grown[0].checkpoint
    _, old, old_data, *_ = load_data_and_model(trained_prorec)
    _, model, data, *_ = load_data_and_model(result.checkpoint)
    fresh = torch.tensor([data.field2token_id["item_id"][t] for t in result.items])
    warm_bias = old.item_bias[1:].mean()
    assert torch.allclose(model.item_bias[fresh], warm_bias.expand(3))
    free = model.token_embedding.weight[model.item_offset + fresh]
    assert torch.allclose(free, old.token_embedding.weight[old.item_offset + 1:].mean(0).expand(3, -1), atol=1e-6)
    with pytest.raises(ValueError, match="item_weights must be one of"):
        add_items(trained_prorec, new_file, item_weights="zero")
