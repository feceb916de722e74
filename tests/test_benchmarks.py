"""Smoke tests of the benchmark scripts: each runs in --quick mode and prints well-formed tables.

Timings are never asserted, only that the tables have the expected rows and columns and hold
positive numbers. The merge of the dual-code baseline is checked exactly.
"""
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATASET
from recbole_prorec.trainer import load_checkpoint

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    """Quick mode sets torch to one thread; give the other tests their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table in ``text`` as (header, rows)."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            assert len(block) >= 2 and set("".join(block[1])) <= set("-"), block
            found.append((block[0], block[2:]))
            block = []
    return found


def table_with(text: str, column: str) -> tuple[list[str], list[list[str]]]:
    matches = [t for t in tables(text) if column in t[0]]
    assert len(matches) == 1, f"no single table with column {column!r} in:\n{text}"
    header, rows = matches[0]
    assert all(len(r) == len(header) for r in rows)
    return header, rows


def number(cell: str) -> float:
    """'1,234.5', '3.5 (est.)', '2.1x', '0.0693 ± 0.0010' -> the first number."""
    match = re.match(r"-?[\d,]*\.?\d+", cell)
    assert match, f"not a number: {cell!r}"
    return float(match.group().replace(",", ""))


def column(header, rows, name) -> list[float]:
    return [number(r[header.index(name)]) for r in rows]


def test_environment_line_names_cpu_cores_and_torch():
    common = load("common")
    line = common.environment_line()
    for key in ("cpu:", "cores:", "torch:", "gpu:"):
        assert key in line


def test_merge_by_confidence_keeps_best_score_of_each_item():
    decode = load("decode")
    items_a, scores_a = torch.tensor([[5, 3, 0]]), torch.tensor([[-1.0, -2.0, float("-inf")]])
    items_b, scores_b = torch.tensor([[3, 7, 5]]), torch.tensor([[-0.5, -3.0, -4.0]])
    items, scores = decode.merge_by_confidence(items_a, scores_a, items_b, scores_b, k=4)
    assert items.tolist() == [[3, 5, 7, 0]]  # 3 keeps its best score -0.5; 5 and 3 are not repeated
    assert scores[0, :3].tolist() == [-0.5, -1.0, -3.0] and scores[0, 3] == float("-inf")


def test_decode_quick(capsys, tmp_path):
    out = tmp_path / "decode.md"
    result = load("decode").main(["--quick", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert "environment: cpu:" in text and "torch:" in text
    header, rows = table_with(text, "PRORec ms/batch")
    assert [(r[0], r[1]) for r in rows] == [("1", "10"), ("1", "20"), ("64", "10"), ("64", "20")]
    for name in ("PRORec ms/batch", "PRORec users/s", "SASRec ms/batch", "SASRec users/s", "PRORec/SASRec time"):
        assert all(v > 0 for v in column(header, rows, name)), name
    header, rows = table_with(text, "dual/unified (ours)")
    assert len(rows) == 4 and all(v > 0 for v in column(header, rows, "dual/unified (ours)"))
    assert column(header, rows, "dual/unified (paper)") == [2.8] * 4
    assert len(result["results"]) == 4 and result["n_items"] == 2000
    assert "PRORec ms/batch" in out.read_text()


def test_train_speed_quick(capsys):
    result = load("train_speed").main(["--quick", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "environment: cpu:" in text
    header, rows = table_with(text, "texts/s")
    assert len(rows) == 1 and all(v > 0 for v in column(header, rows, "texts/s"))
    header, rows = table_with(text, "Stage II samples/s")
    assert [r[0] for r in rows] == ["1,000", "2,000"]
    for name in ("hkmeans s", "trie build ms", "trie MiB", "Stage I samples/s", "Stage I state MiB",
                 "Stage II samples/s", "Stage II state MiB", "beam search ms", "encode s"):
        assert all(v > 0 for v in column(header, rows, name)), name
    for name in ("Stage I step peak MiB", "Stage II step peak MiB"):  # RSS growth: may round to 0
        assert all(v >= 0 for v in column(header, rows, name)), name
    assert [r["items"] for r in result["sizes"]] == [1000, 2000]


def test_quality_quick(capsys):
    result = load("quality").main(["--quick", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "environment: cpu:" in text
    header, rows = table_with(text, "NDCG@10 / SASRec-CE")
    assert [r[0] for r in rows] == ["SASRec-CE", "PRORec"]
    for name in ("Recall@10", "Recall@20", "NDCG@10", "NDCG@20"):
        assert all(0 <= v <= 1 for v in column(header, rows, name)), name
    assert all(v > 0 for v in column(header, rows, "train s"))
    assert all(v > 0 for v in column(header, rows, "wall s"))
    assert column(header, rows, "NDCG@10 / SASRec-CE")[0] == 1.0
    assert [m["model"] for m in result["models"]] == ["SASRec-CE", "PRORec"]


def test_curves_quick_writes_table_plot_and_appends(capsys, tmp_path, monkeypatch):
    from recbole_prorec.trainer import SafeTrainer

    evaluated = []  # validation passes load_best_model=False; only the test split would load the best
    original = SafeTrainer.evaluate
    monkeypatch.setattr(SafeTrainer, "evaluate", lambda self, data, load_best_model=True, **kw: (
        evaluated.append(load_best_model), original(self, data, load_best_model, **kw))[1])
    out = tmp_path / "curves.md"
    records = load("curves").main(["--quick", "--device", "cpu", "--out", str(out), "--models", "SASRec-CE,PRORec"])
    assert evaluated == [False] * 4  # two validations per model, the test split never read
    text = capsys.readouterr().out
    header, rows = table_with(text, "valid ndcg@10")
    assert [(r[0], r[2]) for r in rows] == [("SASRec-CE", "0"), ("SASRec-CE", "1"), ("PRORec", "0"), ("PRORec", "1")]
    for name in ("valid recall@10", "valid ndcg@10"):
        assert all(0 <= v <= 1 for v in column(header, rows, name)), name
    elapsed = column(header, rows, "elapsed s")
    assert elapsed[1] > elapsed[0] > 0 and elapsed[3] > elapsed[2] > 0
    prorec = [r for r in rows if r[0] == "PRORec"]
    assert all(number(r[header.index("gen_l1")]) > 0 for r in prorec)
    assert all(0 <= number(r[header.index("first_code_in_beam")]) <= 1 for r in prorec)
    assert all(r[header.index("gen_l1")] == "" for r in rows if r[0] == "SASRec-CE")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(records) == 4 and json.loads(out.with_suffix(".json").read_text()) == records
    # --append keeps the earlier records: the "before" curve survives the "after" run
    more = load("curves").main(["--quick", "--device", "cpu", "--out", str(out), "--models", "SASRec-CE",
                                "--tag", "after", "--append", "--epochs", "1", "--pseudo-test"])
    assert [r["label"] for r in more] == ["SASRec-CE"] * 2 + ["PRORec"] * 2 + ["SASRec-CE (after)"]
    assert "SASRec-CE (after)" in out.read_text() and "PRORec" in out.read_text()
    # --pseudo-test: a nested split, its test split read after the epoch; the earlier runs have no such metrics
    assert 0 <= more[-1]["test_ndcg@10"] <= more[-1]["test_recall@10"] <= 1
    assert not any(k.startswith("test_") for r in more[:-1] for k in r)
    header, rows = table_with(out.read_text(), "selected by")
    assert {(r[0], r[header.index("epoch")]) for r in rows} == {("SASRec-CE (after)", "0")}


def test_frequency_quick_groups_users_and_matches_recbole(capsys, monkeypatch):
    import recbole_prorec.runner as runner

    results, real = {}, runner.run
    monkeypatch.setattr(runner, "run", lambda label, *a, **kw: results.setdefault(label, real(label, *a, **kw)))
    summary = load("frequency").main(["--quick", "--device", "cpu"])
    text = capsys.readouterr().out
    header, rows = table_with(text, "PRORec Recall@20")
    groups = ["0-4", "5-9", "10-19", "20-49", ">= 50"]
    assert len(rows) >= 3 and [r[0] for r in rows] == [g for g in groups if g in {r[0] for r in rows}]
    users = column(header, rows, "users")
    for label in ("PRORec", "SASRec-CE"):
        recall = column(header, rows, f"{label} Recall@20")
        assert all(0 <= v <= 1 for v in recall)
        # the groups' recalls, weighted by their users, are RecBole's own validation Recall@20
        overall = sum(u * r for u, r in zip(users, recall)) / sum(users)
        assert overall == pytest.approx(results[label].valid["recall@20"], abs=2e-3)
        for metric in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            assert summary[label][metric] == pytest.approx(results[label].valid[metric], abs=1e-4)
    # a target in the top 20 brings its first code along, so that share bounds the recall
    first = column(header, rows, "PRORec first code in top 20")
    assert all(f >= r for f, r in zip(first, column(header, rows, "PRORec Recall@20")))
    assert all(r[header.index("SASRec-CE first code in top 20")] == "" for r in rows)
    # the second run against the first, on the same users: both means are RecBole's figures
    header, rows = table_with(text, "95 % interval")
    assert [r[1] for r in rows] == ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20"]
    for run, metric, first, later, diff, interval, p in rows:
        assert run == "SASRec-CE - PRORec"
        assert float(first) == pytest.approx(summary["PRORec"][metric.lower()], abs=1e-4)
        assert float(later) == pytest.approx(summary["SASRec-CE"][metric.lower()], abs=1e-4)
        assert float(diff) == pytest.approx(float(later) - float(first), abs=2e-4)
        low, high = (float(v) for v in interval.strip("[]").split(","))
        assert low <= float(diff) <= high and 0 <= float(p) <= 1


def test_frequency_ranks_a_checkpoint_as_the_run_that_saved_it(trained_prorec):
    """Its own dataset folder, Stage-I codes (K=4, not the default) and weights, from the checkpoint
    alone: the mean NDCG@10 of the ranks is the validation score the checkpoint was kept for."""
    frequency = load("frequency")
    quiet = {"show_progress": False, "gpu_id": "", "state": "warning"}
    ((targets, ranks, first, counts),) = frequency.evaluate_run("PRORec", str(trained_prorec), DATASET, quiet,
                                                               "valid", torch.device("cpu"))
    assert len(targets) == len(ranks) == len(first) > 0 and counts.sum() > 0
    ndcg = frequency.user_metrics(ranks)["NDCG@10"].mean()
    assert ndcg == pytest.approx(load_checkpoint(str(trained_prorec))["best_valid_score"], abs=1e-4)
    with pytest.raises(ValueError, match=f"holds PRORec on {DATASET}, not SASRec-CE on {DATASET}"):
        frequency.evaluate_run("SASRec-CE", str(trained_prorec), DATASET, quiet, "valid", torch.device("cpu"))


def test_paired_rows_test_the_difference_user_by_user():
    frequency = load("frequency")
    targets = np.arange(400)
    rank_a = np.tile([0, 3, 12, 40], 100)  # Recall@10 .5, Recall@20 .75
    rank_b = rank_a.copy()
    rank_b[:40] = 0  # 10 users of each rank moved to the top: 20 more hits at 10, 10 more at 20
    same = frequency.paired_rows({"A": (targets, rank_a, None, None), "A again": (targets, rank_a.copy(), None, None)})
    assert {(r[4], r[5], r[6]) for r in same} == {("+0.0000", "[+0.0000, +0.0000]", "1")}
    rows = {r[1]: r for r in frequency.paired_rows({"A": (targets, rank_a, None, None), "B": (targets, rank_b, None, None)})}
    assert rows["Recall@10"][2:5] == ["0.5000", "0.5500", "+0.0500"]
    assert rows["Recall@20"][2:5] == ["0.7500", "0.7750", "+0.0250"]
    ndcg_gain = 10 * ((1 - 1 / np.log2(5)) + (1 - 1 / np.log2(14)) + 1) / 400  # ranks 3, 12, 40 -> 0
    assert float(rows["NDCG@20"][4]) == pytest.approx(ndcg_gain, abs=1e-4)
    low, high = (float(v) for v in rows["Recall@10"][5].strip("[]").split(","))
    assert 0 < low < 0.05 < high and float(rows["Recall@10"][6]) < 1e-4  # 20 of 400 users, all one way
    with pytest.raises(ValueError, match="'A' and 'C' rank different users"):
        frequency.paired_rows({"A": (targets, rank_a, None, None), "C": (targets[::-1], rank_a, None, None)})


def test_frequency_rerank_ranks_the_first_checkpoint_again_with_the_settings_changed(monkeypatch, tmp_path, capsys):
    frequency = load("frequency")
    calls, targets = [], np.arange(200)
    ranks = {None: np.tile([0, 15], 100), 0.0: np.tile([0, 5], 100)}  # the rerank lifts half the users to the top 10

    def fake_run(label, path, dataset, overrides, split, device, rerank=None):
        calls.append((label, path, overrides["show_progress"], split, rerank))
        settings = [overrides, {**overrides, **(rerank or {})}][:1 + bool(rerank)]
        return [(targets, ranks[s.get("item_id_shrinkage")], None, np.ones(200, dtype=int)) for s in settings]

    monkeypatch.setattr(frequency, "evaluate_run", fake_run)
    summary = frequency.main(["--run", "PRORec=saved/PRORec-a.pth", "--rerank", "item_id_shrinkage=0",
                              "--split", "test", "--out", str(tmp_path / "f.md")])
    assert calls == [("PRORec", "saved/PRORec-a.pth", False, "test", {"item_id_shrinkage": 0.0})]
    assert list(summary) == ["PRORec", "PRORec with item_id_shrinkage=0"]
    header, rows = table_with(capsys.readouterr().out, "95 % interval")
    recall10 = next(r for r in rows if r[1] == "Recall@10")
    assert recall10[0] == "PRORec with item_id_shrinkage=0 - PRORec"
    assert recall10[2:5] == ["0.5000", "1.0000", "+0.5000"]
    with pytest.raises(SystemExit):
        frequency.main(["--run", "PRORec=saved/PRORec-a.pth", "--rerank", "item_id_shrinkage"])
    assert "--rerank expects KEY=VALUE, got 'item_id_shrinkage'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a key that changes the data or the weights is not a second ranking
        frequency.main(["--run", "PRORec=saved/PRORec-a.pth", "--rerank", "hidden_size=64"])
    assert ("--rerank hidden_size: PRORec's ranking-only keys are beam_size, item_temperature, item_id_shrinkage"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        frequency.main(["--run", "SASRec-CE=saved/SASRec-a.pth", "--rerank", "beam_size=50"])
    assert "SASRec-CE's ranking-only keys are none" in capsys.readouterr().err
    assert len(calls) == 1


def test_frequency_rerank_builds_the_data_once_and_ranks_as_a_fresh_load(trained_prorec, monkeypatch):
    """The second ranking reuses the first's dataset and equals a run loaded afresh with the setting."""
    import recbole_prorec.quick_start as quick_start

    frequency = load("frequency")
    quiet, cpu = {"show_progress": False, "gpu_id": "", "state": "warning"}, torch.device("cpu")
    builds, real = [], quick_start.load_data
    monkeypatch.setattr(quick_start, "load_data", lambda *a: builds.append(a) or real(*a))
    first, again = frequency.evaluate_run("PRORec", str(trained_prorec), DATASET, quiet, "valid", cpu,
                                          rerank={"item_temperature": 5.0})
    assert len(builds) == 1
    (alone,) = frequency.evaluate_run("PRORec", str(trained_prorec), DATASET, {**quiet, "item_temperature": 5.0},
                                      "valid", cpu)
    assert len(builds) == 2
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[3], first[3])  # same users, same counts
    assert np.array_equal(again[1], alone[1]) and np.array_equal(again[2], alone[2])
    assert not np.array_equal(again[1], first[1])  # the setting did change the ranking


def test_two_checkpoints_of_one_model_keep_apart_in_the_tables():
    names = load("frequency").run_names([("PRORec", "saved/PRORec-a.pth"), ("SASRec-CE", "saved/SASRec-b.pth"),
                                         ("PRORec", "saved/PRORec-c.pth")])
    assert names == ["PRORec (PRORec-a)", "SASRec-CE", "PRORec (PRORec-c)"]


def test_memory_quick_traces_every_phase_once_in_order(tmp_path):
    out = tmp_path / "memory.md"
    rows = load("memory").main(["--quick", "--device", "cpu", "--out", str(out)])
    names = [r[0] for r in rows]
    assert names[0] == "start and imports" and names[1] == "Stage I (or its cached output)"
    assert names[-4:] == ["model", "training epoch 0", "validation after epoch 0", "test"]
    assert any(n.startswith("· training epoch") for n in names[2:-4])  # Stage I's DIN, nested under it
    for _, after, peak, seconds in rows:
        assert 100 < after <= peak < 64 * 1024 and seconds >= 0
    text = out.read_text()
    assert "| whole process (kernel's VmHWM) |  |" in text and text.count("| test |") == 1


def test_paper_balance_quick_writes_table_4_and_figure_5(tmp_path):
    result = load("paper").main(["balance", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert set(result["rows"]) == {"concat", "PRORec"}
    for row in result["rows"].values():
        assert all(math.isfinite(v) for v in row.values()) and row["KL to semantic"] > 0
        assert row["semantic share"] + row["collaborative share"] == pytest.approx(1.0)
        assert 0 < row["semantic share"] < 1
    text = (tmp_path / "balance_ml-100k_quick.md").read_text()
    assert "| concat |" in text and "| PRORec |" in text and "seed 2020" in text and "environment: cpu" in text
    assert result["png"].stat().st_size > 20_000  # four scatter panels, not an empty canvas


def test_balance_shares_favour_the_space_the_final_embeddings_copy():
    paper = load("paper")
    rng = np.random.default_rng(0)
    semantic, collab = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
    anchors = np.arange(60)
    near_semantic = paper.shares(semantic + 0.1 * rng.normal(size=(60, 8)), semantic, collab, anchors, 0.1)
    assert near_semantic["semantic share"] > 0.9
    near_collab = paper.shares(collab, semantic, collab, anchors, 0.1)
    assert near_collab["KL to collaborative"] == pytest.approx(0.0, abs=1e-9) and near_collab["collaborative share"] > 0.99


def _check_rows(rows: list[dict], names: list[str]) -> None:
    assert [r["row"] for r in rows] == names
    for r in rows:
        assert all(0 <= r[m] <= 1 for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")), r
        assert r["epochs"] == 1  # quick mode: one epoch per row


def test_paper_ablation_quick_trains_the_five_rows_of_tables_5_and_6(tmp_path):
    paper = load("paper")
    result = paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    _check_rows(result["rows"], [name for name, _ in paper.ABLATION])
    assert [r["model"] for r in result["rows"]] == [v for _, v in paper.ABLATION]
    text = result["md"].read_text()
    assert result["md"].name == "ablation_ml-100k_quick.md" and "| CKA + IKD (PRORec) | PRORec |" in text
    assert "paper recall@10" not in text  # the paper's numbers are Beauty's only
    artifacts = [r["artifact"] for r in result["rows"]]  # each setting reached Stage I: four distinct codes
    assert len(set(artifacts)) == 4 and artifacts[3] == artifacts[4]  # CKA and CKA + IKD share Stage I


def test_paper_rows_run_a_few_at_a_time_and_stored_rows_are_reused(tmp_path):
    paper = load("paper")
    first = paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "CKA"])["rows"]
    assert [r["run"] for r in first] == [False, False, False, True, False]
    assert all(math.isnan(r["ndcg@10"]) for r in first if not r["run"]) and 0 < first[3]["ndcg@10"] <= 1
    text = (tmp_path / "ablation_ml-100k_quick.md").read_text()
    assert "| Semantic Only | PRORec-semantic | not run yet |" in text and "Not run yet: Semantic Only, " in text
    second = paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "Semantic Only"])["rows"]
    assert [r["run"] for r in second] == [True, False, False, True, False]
    assert second[3] == first[3]  # reused as stored, not trained (and tested) again
    stored = json.loads((tmp_path / "ablation_ml-100k_quick.rows.json").read_text())
    assert set(stored) == {"CKA", "Semantic Only"} and stored["CKA"]["key"]["model"] == "PRORec-CKA"
    assert stored["CKA"]["hardware"].endswith(", GPU none") and "different machines" not in text
    curve = stored["CKA"]["curve"]  # per validated epoch, as the trainer measured it
    assert len(curve) >= 1 and all(0 <= entry["ndcg@10"] <= 1 and entry["gen_l1"] > 0 for entry in curve)
    stored["CKA"]["hardware"] = "another CPU, 2 cores, GPU none"  # as if trained elsewhere
    (tmp_path / "ablation_ml-100k_quick.rows.json").write_text(json.dumps(stored))
    paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "CKA"])  # all reused
    text = (tmp_path / "ablation_ml-100k_quick.md").read_text()
    assert "Rows were trained on different machines: Semantic Only: " in text and "CKA: another CPU, 2 cores" in text
    changed = paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "Semantic Only",
                          "--seed", "7"])["rows"]  # another key: the stored rows do not count
    assert [r["run"] for r in changed] == [True, False, False, False, False] and changed[0]["key"]["seed"] == 7
    with pytest.raises(ValueError, match=r"--row: \['CKA \+ IKD'\] not among"):
        paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "CKA + IKD"])
    ledger = tmp_path / "ablation_ml-100k_quick.rows.json"
    ledger.write_text('{"CKA": ')  # cut short: it is named, not overwritten
    with pytest.raises(ValueError, match=r"ablation_ml-100k_quick\.rows\.json: not a JSON rows ledger"):
        paper.main(["ablation", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--row", "CKA"])
    assert ledger.read_text() == '{"CKA": '


def test_paper_layers_quick_draws_ndcg_against_depth(tmp_path):
    result = load("paper").main(["layers", "--quick", "--device", "cpu", "--out-dir", str(tmp_path), "--depths", "1,2"])
    _check_rows(result["rows"], ["PRORec, 1 layers", "SASRec-CE, 1 layers", "PRORec, 2 layers", "SASRec-CE, 2 layers"])
    assert result["png"].stat().st_size > 10_000 and "layers_ml-100k_quick.png" in result["md"].read_text()
    depths = [r["settings"] for r in result["rows"]]  # as the checkpoints recorded them
    assert depths == [{"n_decoder_layers": 1}, {"n_layers": 1}, {"n_decoder_layers": 2}, {"n_layers": 2}]


def test_paper_sweep_quick_changes_one_setting_per_row(tmp_path):
    result = load("paper").main(["sweep", "--quick", "--device", "cpu", "--out-dir", str(tmp_path),
                                 "--sizes", "64,256", "--quantizers", "random,hkmeans"])
    _check_rows(result["rows"], ["K=64", "K=256", "quantizer random"])
    assert len({r["artifact"] for r in result["rows"]}) == 3  # one Stage I per setting
    assert result["png"].stat().st_size > 10_000
    assert "(PRORec's: K=512, hkmeans," in result["md"].read_text()  # the YAML's K, which the rows change from


def test_cold_start_quick_holds_items_out_and_adds_them_back(tmp_path):
    out = tmp_path / "cold.md"
    result = load("cold_start").main(["--quick", "--device", "cpu", "--out", str(out)])
    rows = {k: v for k, v in result.items() if k != "trained"}
    assert list(rows) == ["tree, ridge", "tree, mean", "random, ridge"]
    for row in rows.values():
        assert row["cold-target users"] > 0 and 0 < row["map R^2"] <= 1
        assert 0 <= row["Recall@10"] <= row["Recall@20"] <= 1 and 0 <= row["new items shown"] <= 1
        assert row["lists with a new item"] <= row["new items per list"]  # a list with one holds at least one
    text = out.read_text()
    assert "| tree | ridge |" in text and "held-out items (5%, seed 2020)" in text and "quick mode" in text


def test_curves_selection_picks_each_rules_best_epoch_first_on_ties():
    records = [{"label": "M", "seed": 1, "epoch": e, "elapsed_s": 10.0 * (e + 1), "ndcg@10": n, "recall@10": r,
                "recall@20": r20, "test_ndcg@10": tn, "test_recall@10": tr, "test_recall@20": 0.2, "test_ndcg@20": 0.1}
               for e, (n, r, r20, tn, tr) in enumerate([(.01, .05, .09, .03, .06), (.02, .07, .11, .02, .08),
                                                         (.03, .07, .10, .01, .05)])]
    records.append({"label": "valid only", "seed": 1, "epoch": 0, "elapsed_s": 1.0, "ndcg@10": .5, "recall@10": .5})
    header, rows = table_with(load("curves").selection_table(records), "selected by")
    picked = {r[header.index("selected by")]: int(r[header.index("epoch")]) for r in rows}
    assert picked == {"best valid ndcg@10": 2, "best valid recall@10": 1, "best valid recall@20": 1,
                      "ceiling: best pseudo-test ndcg@10": 0, "ceiling: best pseudo-test recall@10": 1}
    assert {r[0] for r in rows} == {"M"}  # a run without pseudo-test metrics has no selection rows
    assert load("curves").selection_table(records[-1:]) == ""


def test_last_item_text_scores_items_by_cosine_to_the_last_history_item():
    from recbole.data.interaction import Interaction

    table = np.array([[0, 0], [1, 0], [0, 2], [3, 3], [-1, 0]], dtype=np.float32)  # row 0: padding
    config = {"ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list", "ITEM_LIST_LENGTH_FIELD": "item_length"}
    model = load("text_signal").LastItemText(table, config)
    batch = Interaction({"item_id_list": torch.tensor([[1, 2, 0], [3, 0, 0]]), "item_length": torch.tensor([2, 1])})
    scores = model.full_sort_predict(batch)
    assert scores.shape == (2, 5) and torch.isinf(scores[:, 0]).all() and (scores[:, 0] < 0).all()
    # user 0's last item is 2 (direction (0, 1)); user 1's is 3 (direction (1, 1)); history items left out
    inf = float("-inf")
    expected = torch.tensor([[inf, inf, 2 ** -0.5, 0.0], [2 ** -0.5, 2 ** -0.5, inf, -(2 ** -0.5)]])
    assert torch.allclose(scores[:, 1:], expected, atol=1e-6)


def test_text_signal_quick_ranks_an_encoder_and_its_embedding_file_alike(capsys, tmp_path):
    from recbole_prorec.prorec_din import semantic_embeddings
    from recbole_prorec.semantic import read_item_table
    from recbole_prorec.stage1 import stage1_config

    config = stage1_config("ml-100k", [], {"semantic_cache_dir": str(tmp_path)})
    item_file = Path(config["data_path"]) / "ml-100k.item"
    rows = list(read_item_table(item_file)["item_id"])
    npy = tmp_path / "minilm.npy"  # the bundled encoder's embeddings, one row per .item row
    np.save(npy, semantic_embeddings(config, item_file, rows[::-1])[::-1])
    result = load("text_signal").main(["--quick", "--device", "cpu", "--encoders", f"all-MiniLM-L6-v2,{npy}"])
    text = capsys.readouterr().out
    header, table = table_with(text, "embed s")
    assert [r[0] for r in table] == ["all-MiniLM-L6-v2", str(npy)] and column(header, table, "dim") == [384, 384]
    first, second = (column(header, [r], "Recall@20")[0] for r in table)
    assert first == second and 0.02 < first < 1  # the text carries signal, read from either source
    assert table[0][3:] == table[1][3:]
    _, paired = table_with(text, "95 % interval")
    assert [r[1] for r in paired] == ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20"]
    assert all(float(r[4]) == 0 and float(r[6]) == 1 for r in paired)
    targets, ranks, _, _ = result["results"]["all-MiniLM-L6-v2"]
    assert len(targets) == len(ranks) > 100 and ranks.min() >= 0 and (targets > 0).all()


def test_encoder_settings_read_files_names_and_poolings():
    settings = load("paper").encoder_settings  # one parser, shared by paper.py sweep and text_signal.py
    assert settings("emb.npy") == {"semantic_embedding_file": "emb.npy"}
    assert settings("meta-llama/Llama-2-7b-hf:last") == {"semantic_encoder": "meta-llama/Llama-2-7b-hf", "semantic_pooling": "last"}
    assert settings("/models/all-mpnet-base-v2") == {"semantic_encoder": "/models/all-mpnet-base-v2"}
    assert settings("C:/models/e5") == {"semantic_encoder": "C:/models/e5"}  # a colon that is not a pooling
