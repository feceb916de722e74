"""Configuration layers, model resolution and bad-input messages."""
from pathlib import Path

import pytest

from recbole_prorec.config import ProjectConfig, check_types
from recbole_prorec.registry import resolve_model
from recbole_prorec.data import DatasetNotFoundError, check_columns, find_dataset
from recbole_prorec.cli import parse_args


def test_variant_resolves_to_model_and_overrides():
    spec = resolve_model("SASRec-BPR")
    assert spec.name == "SASRec" and spec.label == "SASRec-BPR"
    assert spec.overrides["loss_type"] == "BPR"
    tiger = resolve_model("TIGER")
    assert tiger.name == "PRORec" and tiger.overrides["quantizer"] == "rqvae"


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'NoSuchRec'"):
        resolve_model("NoSuchRec")


def test_protocol_layers_and_ce_negatives():
    config = ProjectConfig(resolve_model("SASRec-CE"), "ml-100k", overrides={"hidden_size": 32})
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["eval_args"]["order"] == "TO" and config["eval_args"]["mode"]["test"] == "full"
    assert config["MAX_ITEM_LIST_LENGTH"] == 20 and config["topk"] == [5, 10, 20]
    assert config["valid_metric"] == "NDCG@10"
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE: no sampled negatives
    assert config["hidden_size"] == 32 and config["model_label"] == "SASRec-CE"
    bpr = ProjectConfig(resolve_model("SASRec-BPR"), "ml-100k")
    assert bpr["train_neg_sample_args"]["sample_num"] == 1


def test_config_runs_without_numpy1_aliases(monkeypatch):
    """NumPy 2 removed np.float_ and friends, which RecBole's own compatibility step reads."""
    import numpy as np

    for removed in ("float_", "complex_", "unicode_"):
        monkeypatch.delattr(np, removed, raising=False)
    ProjectConfig(resolve_model("SASRec-CE"), "ml-100k")
    assert np.float is np.float64 and np.long is np.int_ and np.unicode is np.str_  # RecBole's metrics read them


def test_dataset_yaml_overrides_model_defaults():
    config = ProjectConfig(resolve_model("PRORec"), "ml-100k")
    assert config["text_columns"] == ["movie_title", "release_year", "class"]
    assert "unicode" in config["load_col"]["item"]  # PRORec asks RecBole to load its codes
    everything = ProjectConfig(resolve_model("PRORec"), "ml-100k", overrides={"load_col": None})
    assert everything["load_col"] is None  # RecBole then loads every column, the codes among them
    assert config["n_decoder_layers"] == 4 and config["codebook_size"] == 512


def test_wrong_type_from_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: ten\n")
    with pytest.raises(ValueError, match=r"'epochs' from .*bad.yaml must be int"):
        ProjectConfig(resolve_model("SASRec"), "ml-100k", config_files=[bad])


def test_wrong_type_from_command_line():
    with pytest.raises(ValueError, match="'show_progress' from the command line must be bool"):
        ProjectConfig(resolve_model("SASRec"), "ml-100k", overrides={"show_progress": "3"})


def test_check_types_accepts_int_for_float():
    check_types({"learning_rate": 0.001}, {"learning_rate": 1}, "x")
    with pytest.raises(ValueError, match="must be list"):
        check_types({"topk": [10]}, {"topk": "ten"}, "x")


def test_missing_config_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        ProjectConfig(resolve_model("SASRec"), "ml-100k", config_files=[tmp_path / "nope.yaml"])


def test_missing_dataset_names_folders_and_remedies(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        find_dataset("Amazon_Nothing", [tmp_path / "a", tmp_path / "b"])
    message = str(err.value)
    assert str(tmp_path / "a" / "Amazon_Nothing") in message and str(tmp_path / "b" / "Amazon_Nothing") in message
    assert "recbole_prorec.convert" in message and "--data_path" in message


def test_missing_dataset_through_config_does_not_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("asked on stdin"))
    with pytest.raises(DatasetNotFoundError, match="Amazon_Nothing"):
        ProjectConfig(resolve_model("SASRec"), "Amazon_Nothing", overrides={"data_path": str(tmp_path)})


def test_folder_without_inter_is_reported(tmp_path):
    (tmp_path / "Half").mkdir()
    (tmp_path / "Half" / "Half.item").write_text("item_id:token\ttitle:token_seq\n1\tx\n")
    with pytest.raises(DatasetNotFoundError, match="exists but has no Half.inter"):
        find_dataset("Half", [tmp_path])


def test_item_file_without_text_columns(tmp_path):
    folder = tmp_path / "D"
    folder.mkdir()
    (folder / "D.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n")
    (folder / "D.item").write_text("item_id:token\tprice:float\ni\t1.0\n")
    with pytest.raises(ValueError, match=r"D\.item lacks the column\(s\) \['title'\]"):
        check_columns(tmp_path, "D", {"inter": ["user_id"], "item": ["item_id", "title"]})


def test_cli_parses_config_keys_and_rejects_bare_words():
    args, overrides = parse_args(["--model=SASRec,GRU4Rec", "--dataset=ml-100k", "--epochs=3", "--nproc=1"])
    assert args.model == "SASRec,GRU4Rec" and overrides == {"epochs": "3"}
    with pytest.raises(SystemExit):
        parse_args(["--model=SASRec", "stray"])


def test_shipped_yaml_files_parse():
    from recbole_prorec.config import PROPERTIES, load_yaml

    files = list(Path(PROPERTIES).rglob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        assert isinstance(load_yaml(f), dict)


def test_recbole_models_leave_autograd_anomaly_detection_off():
    """RecBole's SINE module turns anomaly detection on at import, doubling backward time; the
    registry, which imports RecBole's models, turns it off once."""
    import subprocess
    import sys

    probe = "import torch, recbole.model.sequential_recommender; print(torch.is_anomaly_enabled())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("True")  # the reason for the reset: still true of recbole 1.2.1
    # in a fresh interpreter, whichever model is resolved first, and RecBole's SINE itself
    for first in ("SASRecBCE", "SASRec", "SINE"):
        probe = ("import torch; from recbole_prorec.registry import model_class; "
                 f"print(model_class({first!r}).__name__, model_class('SINE').__name__, torch.is_anomaly_enabled())")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
        assert out.strip().splitlines()[-1] == f"{first} SINE False"


def test_time_budget_takes_whole_and_fractional_seconds():
    """benchmarks/quality.py passes ``--budget`` as a float, the runner's command line an int."""
    for budget in (180.0, 1200):
        config = ProjectConfig(resolve_model("SASRec-CE"), "ml-100k", overrides={"train_time_budget": budget})
        assert config["train_time_budget"] == budget
    with pytest.raises(ValueError, match="config key 'train_time_budget' from the command line must be float"):
        ProjectConfig(resolve_model("SASRec-CE"), "ml-100k", overrides={"train_time_budget": "soon"})


def test_config_files_amend_a_variant(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("ikd_weight: 0.5\ntext_template: 'Title: {movie_title}.'\n", encoding="utf-8")
    config = ProjectConfig(resolve_model("PRORec-CKA"), "ml-100k", [mine])
    assert config["ikd_weight"] == 0.5  # the variant says 0.0; the user's file comes later
    assert config["text_template"] == "Title: {movie_title}."
    assert ProjectConfig(resolve_model("PRORec-CKA"), "ml-100k")["ikd_weight"] == 0.0
    assert ProjectConfig(resolve_model("PRORec-CKA"), "ml-100k", [mine], {"ikd_weight": 2.0})["ikd_weight"] == 2.0


def test_stage1_block_is_amended_key_by_key(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("stage1: {train_batch_size: 64}\n", encoding="utf-8")
    config = ProjectConfig(resolve_model("PRORec"), "ml-100k", [mine], {"stage1": "{'epochs': 5}"})
    # epochs from the command line, batch size from the file, the rest from the dataset's and model's YAML
    assert config["stage1"] == {"epochs": 5, "train_batch_size": 64, "learning_rate": 0.005, "eval_step": 0,
                                "stopping_step": 10, "learner": "adam", "weight_decay": 0.0, "warmup_steps": 0,
                                "lr_scheduler": "constant", "lr_decay_steps": 0, "lr_min_ratio": 0.0,
                                "clip_grad_norm": None, "ema_decay": None, "train_time_budget": 0.0}


def test_misspelt_keys_are_reported(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("beam_szie: 30\nikd_weight: 0.5\n", encoding="utf-8")
    config = ProjectConfig(resolve_model("PRORec"), "ml-100k", [mine], {"ikd_wieght": 0, "hidden_size": 64})
    assert config.unknown_keys() == ["beam_szie", "ikd_wieght"]
    documented = {"n_layers": 1, "gpu_id": "", "show_progress": False, "train_time_budget": 60}
    assert ProjectConfig(resolve_model("SASRec"), "ml-100k", overrides=documented).unknown_keys() == []
