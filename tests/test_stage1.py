"""Stage I pipeline: unicodes in the atomic .item file, reuse/rerun, fusion variants, quantizers, bad input."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from recbole.utils import FeatureType

import recbole_prorec.stage1 as stage1_mod
from conftest import DATASET, ITEMS_WITHOUT_ROW, N_ITEMS, build_recbole
from recbole_prorec.prorec import PRORec
from recbole_prorec.quantize import quantize
from recbole_prorec.registry import resolve_model
from recbole_prorec.stage1 import run_stage1, stage1_config, stage1_key


def read_codes(folder: Path) -> dict[str, str]:
    """item token -> unicode string, from a written ``.item`` file."""
    lines = (folder / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    header = [c.split(":")[0] for c in lines[0].split("\t")]
    iid, code = header.index("item_id"), header.index("unicode")
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows)
    return {r[iid]: r[code] for r in rows}


def assert_unique_prefix_free(codes: list[str]) -> None:
    tuples = [tuple(c.split()) for c in codes]
    assert all(tuples), "an item has an empty code"
    full = set(tuples)
    assert len(full) == len(tuples), "codes are not unique"
    for code in tuples:
        assert not any(code[:cut] in full for cut in range(1, len(code))), f"{code} has a code prefix"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


class Recorder:
    """Wraps ``train_din`` to record calls (and the CKA weight each call trained with)."""

    def __init__(self, real):
        self.real, self.cka_weights = real, []

    def __call__(self, run, model):
        self.cka_weights.append(run.config["cka_weight"])
        return self.real(run, model)


def stage1_root(dataset: str, files: list, overrides: dict) -> Path:
    """The data folder of the Stage-I artifact ``run_stage1`` wrote or reused."""
    return run_stage1(dataset, files, overrides).artifact.root


def forbid_training(*_args, **_kwargs):
    raise AssertionError("Stage I retrained although its output exists")


# --------------------------------------------------------------------------- the written dataset


def test_unicode_column_round_trips_through_recbole(stage1_folder, stage2):
    _, data, _ = stage2
    assert data.field2type["unicode"] == FeatureType.TOKEN_SEQ
    written = read_codes(stage1_folder)
    tokens = data.field2id_token["item_id"]
    code_tokens = data.field2id_token["unicode"]
    assert data.item_num - 1 == N_ITEMS == len(written)
    for iid in range(1, data.item_num):
        row = data.item_feat["unicode"][iid].tolist()
        loaded = " ".join(code_tokens[t] for t in row if t != 0)
        assert loaded == written[tokens[iid]], f"item {tokens[iid]}"
    # the codes are hkmeans of the saved integrated embeddings, in emb_items.txt order
    folder = stage1_folder / DATASET
    emb = np.load(folder / f"{DATASET}.emb.npy")
    order = (folder / f"{DATASET}.emb_items.txt").read_text(encoding="utf-8").split()
    assert emb.shape == (N_ITEMS, 16) and sorted(order) == sorted(written)
    again = quantize(emb, "hkmeans", K=4, seed=2020, n_init=1).to_strings()
    assert again == [written[t] for t in order]
    assert_unique_prefix_free(list(written.values()))
    lengths = {len(c.split()) for c in written.values()}
    assert max(lengths) >= 3  # K = 4 with 40 items: at least three levels


def test_original_rows_and_columns_survive(stage1_folder, tiny_root):
    src = (tiny_root / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    out = (stage1_folder / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    assert out[0] == src[0] + "\tunicode:token_seq"
    for before, after in zip(src[1:], out[1 : len(src)]):
        prefix, _, code = after.rpartition("\t")
        assert prefix == before and code.strip()
    # .inter is an exact copy
    assert (stage1_folder / DATASET / f"{DATASET}.inter").read_bytes() == (
        tiny_root / DATASET / f"{DATASET}.inter").read_bytes()
    report = json.loads((stage1_folder / DATASET / "stage1.json").read_text(encoding="utf-8"))
    assert report["items"] == N_ITEMS and report["codes"]["collisions_resolved"] == 0


def test_items_without_item_row_get_a_row_and_a_code(stage1_folder, tiny_root, stage2):
    src = (tiny_root / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    out = (stage1_folder / DATASET / f"{DATASET}.item").read_text(encoding="utf-8").splitlines()
    extra = [line.split("\t") for line in out[len(src):]]
    assert sorted(row[0] for row in extra) == sorted(ITEMS_WITHOUT_ROW)
    for row in extra:
        assert row[1:-1] == ["", "", ""] and row[-1].strip()  # other columns blank, a code
    # and Stage II sees them with their codes
    config, data, (train, _, _) = stage2
    model = PRORec(config, train._dataset)
    for token in ITEMS_WITHOUT_ROW:
        iid = data.token2id("item_id", token)
        assert (model.codes[iid] >= 0).any()


# --------------------------------------------------------------------------- reuse and rerun


def test_second_run_reuses_the_output(stage1_folder, tiny_overrides, monkeypatch):
    before = snapshot(stage1_folder)
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    monkeypatch.setattr(stage1_mod, "quantize", forbid_training)
    assert stage1_root(DATASET, [], tiny_overrides()) == stage1_folder
    # keys that cannot change the output, or belong to Stage II only, reuse it too
    again = tiny_overrides(semantic_batch_size=7, hidden_size=64, n_decoder_layers=3, beam_size=30)
    assert stage1_root(DATASET, [], again) == stage1_folder
    assert snapshot(stage1_folder) == before


def test_other_quantizer_settings_quantize_the_same_dins_embeddings(stage1_folder, tiny_overrides, monkeypatch):
    recorder = Recorder(stage1_mod.train_din)
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    folder = stage1_root(DATASET, [], tiny_overrides(codebook_size=8))
    assert folder != stage1_folder
    report = json.loads((folder / DATASET / "stage1.json").read_text())
    first = json.loads((stage1_folder / DATASET / "stage1.json").read_text())
    assert report["embeddings_from"] == str(stage1_folder / DATASET)
    assert report["embeddings_key"] == first["embeddings_key"]
    assert report["train_seconds"] == first["train_seconds"]  # the DIN's record travels with its embeddings
    emb = np.load(folder / DATASET / f"{DATASET}.emb.npy")
    np.testing.assert_array_equal(emb, np.load(stage1_folder / DATASET / f"{DATASET}.emb.npy"))
    codes = read_codes(folder)
    tokens = (folder / DATASET / f"{DATASET}.emb_items.txt").read_text().split()
    expected = quantize(emb, "hkmeans", 8, 2020).to_strings()
    assert [codes[t] for t in tokens] == expected
    assert read_codes(folder) != read_codes(stage1_folder)
    # what retraining would have given: the DIN is deterministic, so the same codes
    monkeypatch.setattr(stage1_mod, "train_din", recorder)
    assert stage1_root(DATASET, [], tiny_overrides(codebook_size=8, stage1_rerun=True)) == folder
    assert len(recorder.cka_weights) == 1
    assert "embeddings_from" not in json.loads((folder / DATASET / "stage1.json").read_text())
    assert read_codes(folder) == codes


def test_a_damaged_report_elsewhere_is_skipped_and_named(stage1_folder, tiny_overrides, monkeypatch, caplog):
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    damaged = stage1_folder.parent / f"{DATASET}-000000000000" / DATASET / "stage1.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("{not json")
    try:
        folder = stage1_root(DATASET, [], tiny_overrides(codebook_size=5))
    finally:
        shutil.rmtree(damaged.parent.parent)
    report = json.loads((folder / DATASET / "stage1.json").read_text())
    source = json.loads((Path(report["embeddings_from"]) / "stage1.json").read_text())
    assert source["embeddings_key"] == report["embeddings_key"]  # found past the damaged one, not retrained
    assert any(str(damaged) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_stage1_key_follows_stage1_settings(stage1_folder, tiny_overrides):
    key = stage1_key(stage1_config(DATASET, [], tiny_overrides()))
    assert stage1_folder.name == f"{DATASET}-{key}"
    # pinned: when this changes, every cached Stage-I artifact trains again; say so where it is meant
    assert key == "8fe03edba356"
    for changed in ({"codebook_size": 8}, {"fusion": "concat"}, {"cka_weight": 0.5}, {"stage1": {"epochs": 3}},
                    {"stage1": {"train_time_budget": 5}}, {"stage1": {"weight_decay": 0.1}},
                    {"stage1": {"stopping_step": 2}}, {"seed": 1}, {"MAX_ITEM_LIST_LENGTH": 10},
                    {"hkmeans_balanced": True}, {"drop_last_interactions": 1}, {"stage1": {"ema_decay": 0.99}}):
        other = stage1_key(stage1_config(DATASET, [], tiny_overrides(**changed)))
        assert other != key, f"{changed} does not change the Stage I key"
    # Stage II's keys (its budget among them) and keys that cannot change the output keep it
    for kept in ({"stage1_rerun": True, "semantic_batch_size": 3}, {"train_time_budget": 900},
                 {"hidden_size": 64, "beam_size": 30}, {"load_checkpoint": "x.pth", "state": "warning"},
                 # Stage II's training loop, as benchmarks/curves.py sets it
                 {"epochs": 7, "eval_step": 1, "stopping_step": 8, "weight_decay": 0.1, "learner": "adamw",
                  "lr_scheduler": "cosine", "warmup_steps": 100, "clip_grad_norm": {"max_norm": 1.0},
                  "lr_decay_steps": 1000, "lr_min_ratio": 0.1, "ema_decay": 0.999}):
        assert stage1_key(stage1_config(DATASET, [], tiny_overrides(**kept))) == key, kept


def test_stage1_key_follows_file_contents_not_paths_or_dates(tiny_root, tiny_overrides, tmp_path):
    key = stage1_key(stage1_config(DATASET, [], tiny_overrides()))
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_root, copy)  # another folder, new modification times
    os.utime(copy / DATASET / f"{DATASET}.inter", ns=(1, 1))
    assert stage1_key(stage1_config(DATASET, [], tiny_overrides(data_path=str(copy)))) == key
    inter = copy / DATASET / f"{DATASET}.inter"
    lines = inter.read_text(encoding="utf-8").splitlines()
    inter.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # one interaction fewer
    assert stage1_key(stage1_config(DATASET, [], tiny_overrides(data_path=str(copy)))) != key


def test_stage1_takes_its_own_budget_not_stage2s(tiny_overrides):
    assert stage1_config(DATASET, [], tiny_overrides(train_time_budget=900))["train_time_budget"] == 0
    block = tiny_overrides()["stage1"] | {"train_time_budget": 60}
    assert stage1_config(DATASET, [], tiny_overrides(stage1=block))["train_time_budget"] == 60


@pytest.fixture(scope="module")
def random_folder(tiny_overrides):
    """Stage I with the ``random`` quantizer (DIN still trained: its fusion is prorec)."""
    return stage1_root(DATASET, [], tiny_overrides(quantizer="random"))


def test_random_quantizer_end_to_end(random_folder, stage1_folder, tiny_overrides):
    assert random_folder != stage1_folder
    codes = read_codes(random_folder)
    assert len(codes) == N_ITEMS
    assert_unique_prefix_free(list(codes.values()))
    assert {len(c.split()) for c in codes.values()} == {3}  # ceil(log_4 40)
    config, _, (train, _, test) = build_recbole("PRORec", tiny_overrides(quantizer="random"), random_folder)
    model = PRORec(config, train._dataset).eval()
    items, scores = model.beam_search(next(iter(test))[0])
    assert (items > 0).all() and torch.isfinite(scores).all()


def test_stage1_rerun_retrains(random_folder, tiny_overrides, monkeypatch):
    report = random_folder / DATASET / "stage1.json"
    first = report.stat().st_mtime_ns
    codes = read_codes(random_folder)
    recorder = Recorder(stage1_mod.train_din)
    monkeypatch.setattr(stage1_mod, "train_din", recorder)
    assert stage1_root(DATASET, [], tiny_overrides(quantizer="random", stage1_rerun=True)) == random_folder
    assert len(recorder.cka_weights) == 1
    assert report.stat().st_mtime_ns != first
    assert read_codes(random_folder) == codes  # same seed, same codes
    assert not list(random_folder.glob(".*")), "temporary folders left behind"


# --------------------------------------------------------------------------- fusion variants


@pytest.fixture(scope="module")
def fusion_runs(tiny_overrides):
    """{fusion: (folder, recorded CKA weights of train_din calls)} for the three ablation inputs."""
    runs, real = {}, stage1_mod.train_din
    with pytest.MonkeyPatch.context() as mp:
        for fusion, variant in (("semantic_only", "PRORec-semantic"), ("collab_only", "PRORec-collab"),
                                ("concat", "PRORec-concat")):
            recorder = Recorder(real)
            mp.setattr(stage1_mod, "train_din", recorder)
            overrides = tiny_overrides(**resolve_model(variant).overrides)
            assert overrides["fusion"] == fusion
            runs[fusion] = (stage1_root(DATASET, [], overrides), recorder.cka_weights)
    return runs


@pytest.mark.parametrize("fusion, size, cka", [
    ("semantic_only", 16, None),  # PCA of the text embeddings to din_embedding_size, no DIN
    ("collab_only", 16, 0.0),     # DIN trained without CKA
    ("concat", 32, 0.0),          # PCA semantic ++ collaborative (no CKA)
])
def test_fusion_variants(fusion_runs, stage1_folder, fusion, size, cka):
    folder, cka_weights = fusion_runs[fusion]
    assert folder != stage1_folder
    emb = np.load(folder / DATASET / f"{DATASET}.emb.npy")
    assert emb.shape == (N_ITEMS, size) and np.isfinite(emb).all()
    assert cka_weights == ([] if cka is None else [cka])
    report = json.loads((folder / DATASET / "stage1.json").read_text(encoding="utf-8"))
    assert report["config"]["fusion"] == fusion
    if cka is not None:  # the recorded settings are the ones DIN was trained with
        assert report["config"]["cka_weight"] == cka
    codes = read_codes(folder)
    assert len(codes) == N_ITEMS
    assert_unique_prefix_free(list(codes.values()))


def test_concat_is_pca_semantic_then_collaborative(fusion_runs):
    emb = {f: np.load(folder / DATASET / f"{DATASET}.emb.npy") for f, (folder, _) in fusion_runs.items()}
    np.testing.assert_allclose(emb["concat"][:, :16], emb["semantic_only"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb["concat"][:, 16:], emb["collab_only"], rtol=1e-4, atol=1e-5)


def test_semantic_only_puts_topics_together(fusion_runs):
    """Sanity of the text side: items of one topic are nearer each other than to other topics."""
    folder, _ = fusion_runs["semantic_only"]
    emb = np.load(folder / DATASET / f"{DATASET}.emb.npy")
    order = (folder / DATASET / f"{DATASET}.emb_items.txt").read_text(encoding="utf-8").split()
    keep = [i for i, t in enumerate(order) if t not in ITEMS_WITHOUT_ROW]  # those have no text
    topic = np.array([(int(order[i][1:]) - 1) // 10 for i in keep])
    x = emb[keep] / np.linalg.norm(emb[keep], axis=1, keepdims=True)
    sim = x @ x.T
    same = topic[:, None] == topic[None]
    np.fill_diagonal(same, False)
    other = topic[:, None] != topic[None]
    assert sim[same].mean() > sim[other].mean() + 0.2


def test_rqvae_quantizer_end_to_end_as_tiger(tiny_overrides):
    spec = resolve_model("TIGER")  # semantic_only + rqvae + no IKD
    overrides = tiny_overrides()
    folder = stage1_root(DATASET, [], {**spec.overrides, **overrides})
    codes = read_codes(folder)
    assert len(codes) == N_ITEMS
    assert_unique_prefix_free(list(codes.values()))
    # 3 RQ levels + a disambiguating level (more than one digit where > K items share a prefix)
    assert min(len(c.split()) for c in codes.values()) == 4
    config, _, (train, _, test) = build_recbole("TIGER", tiny_overrides(), folder)
    assert config["ikd_weight"] == 0 and config["model_label"] == "TIGER"
    model = PRORec(config, train._dataset)
    assert not hasattr(model, "integrated") and not model.item_level  # TIGER's codes hold no item token
    *gen, ikd = model.calculate_loss(next(iter(train)))
    assert len(gen) == model.code_len and all(torch.isfinite(g) for g in gen) and ikd.item() == 0
    model.eval()
    full = model.full_sort_predict(next(iter(test))[0])
    assert (torch.isfinite(full).sum(1) == model.beam_size).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("inside", ["", "out"], ids=["equal", "inside"])
def test_output_in_the_source_folder_is_refused(tiny_root, tiny_overrides, monkeypatch, inside):
    source = tiny_root / DATASET
    before = snapshot(tiny_root)
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    target = source / inside if inside else source
    with pytest.raises(ValueError, match="unicode_dir"):
        stage1_root(DATASET, [], tiny_overrides(unicode_dir=str(target)))
    assert snapshot(tiny_root) == before


def test_missing_text_column_is_named(tiny_overrides, tiny_work):
    overrides = tiny_overrides(text_columns=["title", "colour"])
    out = Path(overrides["unicode_dir"]) / f"{DATASET}-{stage1_key(stage1_config(DATASET, [], overrides))}"
    with pytest.raises(ValueError, match="colour"):
        stage1_root(DATASET, [], overrides)
    assert not (out / DATASET).exists()


def test_unknown_fusion_is_refused(tiny_overrides, monkeypatch):
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    with pytest.raises(ValueError, match="fusion.*'magic'"):
        stage1_root(DATASET, [], tiny_overrides(fusion="magic"))


@pytest.mark.parametrize("fusion", ["collab_only", "concat"])
def test_fusion_without_cka_refuses_a_cka_weight(tiny_overrides, monkeypatch, fusion):
    monkeypatch.setattr(stage1_mod, "train_din", forbid_training)
    with pytest.raises(ValueError, match=f"fusion '{fusion}'.*cka_weight: 0"):
        stage1_root(DATASET, [], tiny_overrides(fusion=fusion))
    assert resolve_model({"collab_only": "PRORec-collab", "concat": "PRORec-concat"}[fusion]).overrides["cka_weight"] == 0


def test_codebook_size_below_two_is_refused(tiny_overrides):
    overrides = tiny_overrides(fusion="semantic_only", codebook_size=1)
    out = Path(overrides["unicode_dir"]) / f"{DATASET}-{stage1_key(stage1_config(DATASET, [], overrides))}"
    with pytest.raises(ValueError, match="codebook_size"):
        stage1_root(DATASET, [], overrides)
    assert not (out / DATASET).exists()


def test_source_that_already_has_unicodes_is_refused(stage1_folder, tiny_overrides, tmp_path):
    """Stage I pointed at a Stage I output (data_path mix-up): no second unicode column."""
    overrides = tiny_overrides(data_path=str(stage1_folder), fusion="semantic_only",
                               unicode_dir=str(tmp_path / "unicode"))
    before = snapshot(stage1_folder)
    with pytest.raises(ValueError, match="already has a 'unicode' column"):
        stage1_root(DATASET, [], overrides)
    assert snapshot(stage1_folder) == before
    assert not list((tmp_path / "unicode").rglob("stage1.json"))


def test_item_file_lines_split_as_recbole_reads_them(tmp_path):
    """A form feed or line separator inside a title, CRLF line ends and a blank line keep each
    code on its item's row, as RecBole's pandas reader sees the rows."""
    from recbole_prorec.artifact import write_item_file

    source, target = tmp_path / "s.item", tmp_path / "t.item"
    source.write_bytes("item_id:token\ttitle:token_seq\r\na\tone\x0cpage\r\n\r\nb\tline\u2028sep\r\n".encode())
    write_item_file(source, target, ["a", "b", "c"], ["1 2", "3 4", "5 6"], "item_id")
    table = pd.read_csv(target, sep="\t", dtype=str, keep_default_na=False, engine="python")
    assert table.values.tolist() == [["a", "one\x0cpage", "1 2"], ["b", "line\u2028sep", "3 4"], ["c", "", "5 6"]]


def test_stage1_block_values_are_type_checked(tiny_overrides):
    with pytest.raises(ValueError, match="config key 'epochs' from 'stage1' must be int"):
        stage1_config(DATASET, [], tiny_overrides(stage1={"epochs": "many"}))


def test_stage1_validated_on_sampled_negatives_keeps_its_best_epoch(tiny_overrides, tmp_path):
    """A cheap validation signal (100 sampled negatives) lets Stage I stop by itself; the codes are
    made from the best epoch's embeddings, which the report names."""
    block = {"epochs": 6, "train_batch_size": 32, "learning_rate": 0.005, "eval_step": 1, "stopping_step": 1,
             "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user",
                           "mode": {"valid": "uni100", "test": "full"}}}
    folder = stage1_root(DATASET, [], tiny_overrides(stage1=block, unicode_dir=str(tmp_path / "u"),
                                                        checkpoint_dir=str(tmp_path / "saved")))
    report = json.loads((folder / DATASET / "stage1.json").read_text(encoding="utf-8"))
    curve = report["curve"]
    assert report["epochs"] == len(curve) and 1 <= len(curve) <= 6
    scores = [entry["ndcg@10"] for entry in curve]
    assert report["best_epoch"] == curve[scores.index(max(scores))]["epoch"]
    assert report["valid"]["ndcg@10"] == pytest.approx(max(scores))
    assert len(curve) < 6 and report["best_epoch"] < curve[-1]["epoch"]  # stopped early, after its best
    # the embeddings written are the best epoch's: the saved checkpoint's item table
    from recbole_prorec.trainer import load_checkpoint

    (checkpoint,) = (tmp_path / "saved").glob("PRORecDIN-*.pth")
    state = load_checkpoint(str(checkpoint))
    assert state["epoch"] == report["best_epoch"]
    emb = np.load(folder / DATASET / f"{DATASET}.emb.npy")
    np.testing.assert_allclose(emb, state["state_dict"]["item_embedding.weight"][1:].numpy(), rtol=1e-6)
