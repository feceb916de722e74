"""End-to-end runner on the bundled ml-100k, and weights_only-safe checkpoints."""
import math
from pathlib import Path

import pytest
import torch

from recbole_prorec.cli import main
from recbole_prorec.runner import results_table
from recbole_prorec.trainer import load_checkpoint

SMALL_SASREC = [
    "--hidden_size=16", "--inner_size=32", "--n_layers=1", "--n_heads=1",
    "--train_batch_size=2048", "--eval_batch_size=2048", "--epochs=1", "--show_progress=False",
]


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    results = main(
        ["--model=SASRec", "--dataset=ml-100k", f"--results_file={tmp / 'table.md'}",
         f"--checkpoint_dir={tmp / 'saved'}", *SMALL_SASREC]
    )
    return tmp, results


def test_runner_trains_and_tests_builtin_model(sasrec_run):
    tmp, (result,) = sasrec_run
    assert result.label == "SASRec" and result.epochs_run == 1 and result.best_epoch == 0
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert 0.0 <= result.test[key] <= 1.0
    assert result.test["recall@20"] >= result.test["recall@10"] > 0.0
    assert result.train_time > 0 and result.seed == 2020


def test_results_table_is_written_and_appended(sasrec_run):
    tmp, (result,) = sasrec_run
    text = (tmp / "table.md").read_text()
    assert "| model | Recall@10 | Recall@20 | NDCG@10 | NDCG@20 | best epoch | train s | seed |" in text
    assert f"| SASRec | {result.test['recall@10']:.4f} |" in text
    assert "python run_recbole_prorec.py --model=SASRec" in text
    row = results_table([result]).splitlines()[-1]
    assert row.count("|") == 9
    # and every validated epoch, under the table: seconds, the loss, the validation metrics
    curve = text.split("SASRec, every validated epoch (seed 2020):\n\n", 1)[1].splitlines()
    header = [c.strip() for c in curve[0].strip("|").split("|")]
    assert header[:3] == ["epoch", "train s", "elapsed s"] and "loss" in header
    (entry,) = result.curve
    cells = dict(zip(header, (c.strip() for c in curve[2].strip("|").split("|"))))
    assert cells["epoch"] == "0"
    assert cells["valid recall@10"] == f"{result.valid['recall@10']:.4f}"
    assert float(cells["train s"]) == pytest.approx(entry["train_s"], abs=0.05)
    assert len(curve) == 3  # header, rule, the one epoch


def test_checkpoint_reloads_with_weights_only(sasrec_run):
    tmp, _ = sasrec_run
    (ckpt,) = (tmp / "saved").glob("SASRec-*.pth")
    state = load_checkpoint(str(ckpt))
    assert state["config"]["model"] == "SASRec" and state["epoch"] == 0
    assert isinstance(state["best_valid_score"], float) and not math.isinf(state["best_valid_score"])
    assert "item_embedding.weight" in state["state_dict"]
    # the file holds nothing that needs full unpickling
    torch.load(ckpt, weights_only=True)


def test_recbole_checkpoints_would_fail_weights_only(tmp_path):
    """Guards the reason for our trainer: RecBole's pickled Config is refused by weights_only."""
    from recbole.config import Config

    path = tmp_path / "c.pth"
    torch.save({"config": Config.__new__(Config)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)


def test_unknown_model_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--model=SASRec,SASRecc", "--dataset=ml-100k", f"--results_file={tmp_path / 't.md'}"])
    assert exit_.value.code == 2 and "error: unknown model 'SASRecc'" in capsys.readouterr().err
    assert not (tmp_path / "t.md").exists()


def test_load_checkpoint_evaluates_without_training(sasrec_run):
    tmp, (trained,) = sasrec_run
    (ckpt,) = (tmp / "saved").glob("SASRec-*.pth")
    (result,) = main(
        ["--model=SASRec", "--dataset=ml-100k", f"--results_file={tmp / 'eval.md'}",
         f"--checkpoint_dir={tmp / 'saved2'}", f"--load_checkpoint={ckpt}", *SMALL_SASREC]
    )
    assert result.epochs_run == 0 and result.train_time == 0.0
    assert result.test == trained.test  # same weights, same protocol, same numbers


def test_checkpoint_of_another_dataset_is_refused(sasrec_run, tiny_overrides):
    from recbole_prorec.runner import run

    tmp, _ = sasrec_run
    (ckpt,) = (tmp / "saved").glob("SASRec-*.pth")
    with pytest.raises(ValueError, match="checkpoint was trained with dataset='ml-100k', this run has dataset='tiny'"):
        run("SASRec", "tiny", [], tiny_overrides(load_checkpoint=str(ckpt), checkpoint_dir=str(tmp / "saved3")))


def test_ddp_on_cpu_with_two_processes(tmp_path):
    """RecBole hard-codes NCCL/CUDA for DDP; ours trains with gloo on CPU."""
    (result,) = main(
        ["--model=SASRec", "--dataset=ml-100k", "--nproc=2", f"--results_file={tmp_path / 't.md'}",
         f"--checkpoint_dir={tmp_path / 'saved'}", *SMALL_SASREC]
    )
    assert result.epochs_run == 1 and 0.0 < result.test["recall@20"] <= 1.0


def test_s3rec_pretrains_then_finetunes_from_its_weights(tiny_overrides, tiny_work):
    """S3Rec's default train_stage is pretrain: the runner pre-trains, then fine-tunes from it."""
    from recbole_prorec.runner import run

    saved = tiny_work / "s3rec"
    result = run("S3Rec", "tiny", [], tiny_overrides(
        item_attribute="categories", pretrain_epochs=2, checkpoint_dir=str(saved), train_time_budget=1000))
    (pretrained,) = saved.glob("S3Rec-*-pretrained.pth")
    (finetuned,) = set(saved.glob("S3Rec-*.pth")) - {pretrained}
    pre, fine = load_checkpoint(str(pretrained)), load_checkpoint(str(finetuned))
    assert pre["config"]["train_stage"] == "pretrain" and pre["epoch"] == 1
    assert fine["config"]["train_stage"] == "finetune" and fine["config"]["pre_model_path"] == str(pretrained)
    # fine-tuning gets what pre-training left of the one budget
    assert 1000 - result.train_time - 5 < fine["config"]["train_time_budget"] < 1000
    # the pre-training heads get no gradient when fine-tuning: equal weights prove the reload
    for key in ("aap_norm.weight", "sp_norm.bias"):
        assert torch.equal(pre["state_dict"][key], fine["state_dict"][key])
    assert not torch.equal(pre["state_dict"]["item_embedding.weight"], fine["state_dict"]["item_embedding.weight"])
    assert result.epochs_run == 1 and 0.0 <= result.test["ndcg@10"] <= 1.0


def test_s3rec_pretraining_hands_on_its_weight_average(tiny_overrides, tiny_work, monkeypatch):
    """With ema_decay, the pre-trained weights fine-tuning starts from are the average, not the last step's."""
    from recbole_prorec.runner import run
    from recbole_prorec.trainer import ParameterAverage

    states, real = [], ParameterAverage.averaged_state
    monkeypatch.setattr(ParameterAverage, "averaged_state", lambda self: states.append(real(self)) or states[-1])
    saved = tiny_work / "s3rec_ema"
    run("S3Rec", "tiny", [], tiny_overrides(item_attribute="categories", pretrain_epochs=2, epochs=1,
                                            checkpoint_dir=str(saved), ema_decay=0.9))
    (pretrained,) = saved.glob("S3Rec-*-pretrained.pth")
    weights = load_checkpoint(str(pretrained))["state_dict"]
    assert states, "pre-training saved no average"
    assert weights.keys() == states[0].keys()
    assert all(torch.equal(weights[k], states[0][k]) for k in weights)  # the first average taken is the one saved


def test_each_model_of_a_multi_model_run_gets_its_own_log_file(tiny_root, tmp_path, monkeypatch):
    import logging

    monkeypatch.chdir(tmp_path)  # RecBole writes ./log/<model>/...
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh CLI process
    main(["--model=SASRec,GRU4Rec", "--dataset=tiny", f"--data_path={tiny_root}",
          f"--results_file={tmp_path / 't.md'}", f"--checkpoint_dir={tmp_path / 'saved'}",
          "--load_col={'inter': ['user_id', 'item_id', 'timestamp']}", *SMALL_SASREC])
    logs = {model: list((tmp_path / "log" / model).glob("*.log")) for model in ("SASRec", "GRU4Rec")}
    assert all(len(files) == 1 for files in logs.values()), logs
    assert "GRU4Rec(" in logs["GRU4Rec"][0].read_text() and "GRU4Rec(" not in logs["SASRec"][0].read_text()



def test_prorec_logs_stage1_and_stage2_to_their_own_files(tiny_overrides, tmp_path, monkeypatch):
    import logging

    from recbole_prorec.runner import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh CLI process
    run("PRORec", "tiny", [], tiny_overrides())
    (din_log,) = (tmp_path / "log" / "PRORecDIN").glob("*.log")
    (gen_log,) = (tmp_path / "log" / "PRORec").glob("*.log")
    assert "Stage I" in din_log.read_text() and "PRORec(" not in din_log.read_text()
    assert "PRORec(" in gen_log.read_text() and "Stage I" not in gen_log.read_text()


def test_ddp_prorec_trains_stage1_once_then_stage2_on_two_processes(tiny_overrides, tmp_path):
    """Stage I runs in the parent; each worker reuses it and only Stage II joins the process group."""
    from recbole_prorec.runner import run_distributed

    overrides = tiny_overrides(unicode_dir=str(tmp_path / "unicode"), checkpoint_dir=str(tmp_path / "saved"))
    result = run_distributed("PRORec", "tiny", [], overrides, 2)
    assert len(list((tmp_path / "unicode").glob("tiny-*/tiny/stage1.json"))) == 1
    assert result.label == "PRORec" and result.epochs_run == 1 and 0.0 < result.test["recall@20"] <= 1.0


def test_stage_unicode_writes_only_the_artifact(tiny_overrides, tmp_path, capsys):
    import yaml

    overrides = tiny_overrides(unicode_dir=str(tmp_path / "unicode"), checkpoint_dir=str(tmp_path / "saved"))
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides), encoding="utf-8")
    base = ["--dataset=tiny", "--stage=unicode", f"--config_files={config_file}", f"--results_file={tmp_path / 't.md'}"]
    # every model is checked before any Stage I starts
    with pytest.raises(ValueError, match="--stage=unicode needs a model with a Stage I.*SASRec"):
        main(["--model=PRORec,SASRec", *base, "--debug"])
    assert not (tmp_path / "unicode").exists()
    assert main(["--model=PRORec", *base]) == []
    reports = list((tmp_path / "unicode").glob("tiny-*/tiny/stage1.json"))
    assert len(reports) == 1 and f"unicode dataset written to {reports[0].parent.parent}" in capsys.readouterr().out
    assert not (tmp_path / "t.md").exists() and not list((tmp_path / "saved").glob("PRORec-*.pth"))  # no Stage II


def test_command_line_silences_recboles_future_warnings_and_says_where_outputs_are(tiny_overrides, tmp_path, capsys):
    import warnings

    import yaml

    from recbole_prorec.cli import _main

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_overrides(checkpoint_dir=str(tmp_path / "saved"))), encoding="utf-8")
    argv = ["--model=PRORec", "--dataset=tiny", f"--config_files={config_file}", f"--results_file={tmp_path / 't.md'}"]

    def recbole_future_warnings(entry) -> list:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            results = entry(argv)
        return results, [w for w in seen if issubclass(w.category, FutureWarning) and "recbole" in w.filename]

    _, raw = recbole_future_warnings(_main)
    assert raw, "RecBole no longer warns: the filter in main() can go"
    (result,), silenced = recbole_future_warnings(main)
    assert silenced == []
    out = capsys.readouterr().out
    # under pytest RecBole writes no log file (its basicConfig is a no-op beside pytest's handler)
    log = result.log_file or "(none)"
    assert f"PRORec: checkpoint {result.checkpoint}, log {log}, unicode dataset {result.data_folder}" in out
    assert Path(result.checkpoint).is_file() and (not result.log_file or Path(result.log_file).is_file())
    assert (Path(result.data_folder) / "stage1.json").is_file()


def _targets(loader) -> dict[int, int]:
    """Each user's target item in an evaluation loader (RecBole's full-sort batches)."""
    targets = {}
    for interaction, *_ in loader:
        targets.update(zip(interaction["user_id"].tolist(), interaction["item_id"].tolist()))
    return targets


def test_dropping_each_users_last_interaction_makes_the_validation_item_the_test_target(tiny_overrides):
    from conftest import build_recbole

    _, full, (_, valid, _) = build_recbole("SASRec", tiny_overrides())
    _, nested, (_, nested_valid, nested_test) = build_recbole("SASRec", tiny_overrides(drop_last_interactions=1))
    assert nested.inter_num == full.inter_num - (full.user_num - 1)  # one interaction per user
    assert nested.item_num == full.item_num and nested.user_num == full.user_num  # the same ids
    assert _targets(nested_test) == _targets(valid)  # the nested test targets are the real validation items
    assert len(_targets(nested_valid)) == full.user_num - 1
    with pytest.raises(ValueError, match="drop_last_interactions must be >= 0, got -1"):
        build_recbole("SASRec", tiny_overrides(drop_last_interactions=-1))


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.5}], ids=["weights", "weight average"])
def test_test_metrics_every_epoch_only_on_a_nested_split(tiny_overrides, extra):
    """The pseudo-test after an epoch scores the weights its validation scored: with ``ema_decay``
    the average, not the last step's weights (which it scored before session 23's fix)."""
    from conftest import DATASET
    from recbole_prorec.runner import run

    overrides = tiny_overrides(epochs=2, **extra)
    with pytest.raises(ValueError, match="only with drop_last_interactions >= 1"):
        run("SASRec-CE", DATASET, [], overrides, test_every_epoch=True)
    result = run("SASRec-CE", DATASET, [], {**overrides, "drop_last_interactions": 1}, saved=False,
                 test_every_epoch=True)
    assert [entry["epoch"] for entry in result.curve] == [0, 1]
    for entry in result.curve:
        assert 0 <= entry["test_ndcg@10"] <= entry["test_recall@10"] <= entry["test_recall@20"] <= 1
        assert 0 <= entry["ndcg@10"] <= 1  # validation metrics stay under their own names
    # saved=False tests the weights fit ends with (the last validated ones): the last epoch's pseudo-test
    assert {k: result.curve[-1][f"test_{k}"] for k in result.test} == pytest.approx(result.test)
