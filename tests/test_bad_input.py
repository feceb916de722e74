"""The bad-input matrix: each mistake in a user's files or settings ends the command line with one
message naming the file, line or key and exit code 2, and leaves the source files byte-identical
and no Stage-I output behind."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DATASET, base_overrides, write_tiny_dataset
from recbole_prorec.cli import main
from recbole_prorec.runner import run


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


INTER, ITEM = f"{DATASET}.inter", f"{DATASET}.item"

# name -> (how the dataset folder is broken, what the message must say)
DATA_CASES = {
    "inter missing": (lambda f: (f / INTER).unlink(),
                      rf"dataset '{DATASET}' not found: no {INTER} in"),
    "inter header only": (lambda f: write_lines(f / INTER, lines_of(f / INTER)[:1]),
                          rf"{INTER} has a header but no rows"),
    "inter cut mid-line": (lambda f: (f / INTER).write_text((f / INTER).read_text()[:-9], encoding="utf-8"),
                           rf"{INTER}, line \d+: 2 fields where the header has 3"),
    "inter type typo": (lambda f: write_lines(f / INTER, [lines_of(f / INTER)[0].replace("float", "flaot")]
                                              + lines_of(f / INTER)[1:]),
                        rf"{INTER}, line 1: column 'timestamp:flaot' needs one of RecBole's types"),
    "inter duplicate rows": (lambda f: write_lines(f / INTER, lines_of(f / INTER) + lines_of(f / INTER)[5:6]),
                             rf"{INTER}, line \d+: repeats the row \(line 6\)"),
    "users under 3 interactions": (lambda f: write_lines(f / INTER, lines_of(f / INTER) + ["u900\ti01\t5"]),
                                   r"1 users of .* have fewer than 3 interactions \(u900: 1\).*"
                                   r"user_inter_num_interval"),
    "item text column missing": (lambda f: write_lines(f / ITEM, [lines_of(f / ITEM)[0].replace("title:", "name:")]
                                                       + lines_of(f / ITEM)[1:]),
                                 rf"{ITEM} lacks the column\(s\) \['title'\] named in load_col\['item'\]"),
    "item text all empty": (lambda f: write_lines(f / ITEM, lines_of(f / ITEM)[:1] + [
                                l.split("\t")[0] + "\t\t\t" for l in lines_of(f / ITEM)[1:]]),
                            rf"All 40 items have empty text in .*{ITEM}"),
    "item binary garbage": (lambda f: (f / ITEM).write_bytes(bytes(range(256)) * 8),
                            rf"{ITEM}, line 1: not a header of tab-separated column names"),
    "item not UTF-8": (lambda f: (f / ITEM).write_bytes((f / ITEM).read_bytes().replace(b"stove", b"st\xf6ve", 1)),
                       rf"{ITEM}, line \d+: not UTF-8 text"),
    "item duplicate ids": (lambda f: write_lines(f / ITEM, lines_of(f / ITEM) + lines_of(f / ITEM)[3:4]),
                           rf"{ITEM}, line 40: '\w+' has a row already \(line 4\)"),
}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def command(root: Path, work: Path, model: str = "PRORec", **extra) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    config_file = work / "tiny.yaml"
    config_file.write_text(yaml.safe_dump({**base_overrides(root, work), **extra}), encoding="utf-8")
    return [f"--model={model}", f"--dataset={DATASET}", f"--config_files={config_file}",
            f"--results_file={work / 'table.md'}"]


def fails_with(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert re.search(message, line), err


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_ends_with_a_message_and_changes_nothing(case, tmp_path, capsys):
    root = write_tiny_dataset(tmp_path / "data")
    break_it, message = DATA_CASES[case]
    break_it(root / DATASET)
    before = digests(root / DATASET)
    fails_with(command(root, tmp_path / "work"), message, capsys)
    assert digests(root / DATASET) == before
    assert not list((tmp_path / "work" / "unicode").glob("*/*")) and not (tmp_path / "work" / "table.md").exists()


@pytest.mark.parametrize("setting, message", [
    ({"beam_size": 5}, r"beam_size 5 must be >= max\(topk\) = 20"),
    ({"n_heads": 3}, r"hidden_size 32 is not divisible by n_heads 3"),
    ({"codebook_size": 1}, r"codebook_size \(K\) must be >= 2, got 1"),
    ({"item_temperature": 0.0}, r"item_temperature must be > 0, got 0.0"),
    ({"item_id_shrinkage": -1}, r"item_id_shrinkage must be >= 0, got -1"),
    ({"ema_decay": 1.0}, r"ema_decay must lie in \[0, 1\), or be ~ \(off\), got 1.0"),
    ({"lr_scheduler": "linear"}, r"lr_scheduler must be one of \('constant', 'inverse_sqrt', 'cosine'\), got 'linear'"),
    ({"semantic_encoder": "/no/such/encoder", "semantic_cache_dir": "elsewhere"},
     r"semantic_encoder='/no/such/encoder': local path does not exist"),
    ({"epochs": "three"}, r"config key 'epochs' from .*tiny.yaml must be int \(default 300\), got str 'three'"),
    ({"checkpoint_dir": "FILE/saved"}, r"config key 'checkpoint_dir': .*tiny.yaml/saved is not a folder this run can write to"),
])
def test_bad_settings_end_with_a_message_naming_the_key(setting, message, tiny_root, tmp_path, capsys):
    work = tmp_path / "work"
    if setting.get("checkpoint_dir") == "FILE/saved":  # a path under a file: no user may write there
        setting = {"checkpoint_dir": str(work / "tiny.yaml" / "saved")}
    if "semantic_cache_dir" in setting:
        setting["semantic_cache_dir"] = str(work / "cache")
    fails_with(command(tiny_root, work, **setting), message, capsys)
    assert not list((work / "unicode").glob("*/*/stage1.json"))  # refused before Stage I trained


def test_an_unknown_model_ends_with_a_message_and_debug_shows_the_traceback(tiny_root, tmp_path, capsys):
    argv = command(tiny_root, tmp_path, model="PRORec,PRORecc")
    fails_with(argv, r"unknown model 'PRORecc'", capsys)
    with pytest.raises(ValueError, match="unknown model 'PRORecc'"):
        main([*argv, "--debug"])


def copied_stage1(stage1_folder: Path, work: Path) -> Path:
    """A private copy of the session's Stage-I output, found by a run with ``unicode_dir=work``."""
    target = work / stage1_folder.name
    shutil.copytree(stage1_folder, target)
    return target / DATASET


def test_embeddings_of_too_few_items_are_named(stage1_folder, tiny_root, tmp_path, capsys):
    """(Duplicate and missing codes: tests/test_prorec.py.)"""
    folder = copied_stage1(stage1_folder, tmp_path / "unicode")
    np.save(folder / f"{DATASET}.emb.npy", np.load(folder / f"{DATASET}.emb.npy")[:-3])
    fails_with(command(tiny_root, tmp_path, unicode_dir=str(tmp_path / "unicode")),
               rf"{folder}/tiny.emb.npy is not the Stage-I output of this dataset: no embedding for", capsys)


def test_a_half_written_stage1_output_is_rebuilt_not_reused(stage1_folder, tiny_overrides, tmp_path):
    folder = copied_stage1(stage1_folder, tmp_path / "unicode")
    (folder / "stage1.json").unlink()  # written last: a killed Stage I never wrote it
    (folder / ITEM).write_text(lines_of(folder / ITEM)[0] + "\n", encoding="utf-8")
    result = run("PRORec", DATASET, [], tiny_overrides(unicode_dir=str(tmp_path / "unicode"),
                                                        checkpoint_dir=str(tmp_path / "saved")))
    assert (folder / "stage1.json").is_file() and len(lines_of(folder / ITEM)) == 41
    assert 0 < result.test["recall@20"] <= 1


def test_a_diverging_loss_stops_naming_epoch_and_batch_and_keeps_the_best_checkpoint(tiny_overrides, tmp_path,
                                                                                      monkeypatch):
    from recbole_prorec.trainer import SafeTrainer, load_checkpoint

    original = SafeTrainer._train_epoch

    def poisoned(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == 1:
            loss = self.model.calculate_loss
            self.model.calculate_loss = lambda batch: tuple(part * float("nan") for part in loss(batch)) \
                if self.batch == 2 else loss(batch)
        return original(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(SafeTrainer, "_train_epoch", poisoned)
    with pytest.raises(FloatingPointError, match=r"training loss is nan in epoch 1, batch 2: stopping "
                                                 r"\(the best checkpoint so far is (.*\.pth)\)") as error:
        run("PRORec", DATASET, [], tiny_overrides(epochs=3, checkpoint_dir=str(tmp_path)))
    best = re.search(r"is (\S+\.pth)\)", str(error.value)).group(1)
    state = load_checkpoint(best)
    assert state["epoch"] == 0 and all(np.isfinite(v.numpy()).all() for v in state["state_dict"].values())


def test_a_dataset_without_a_yaml_of_its_own_loads_the_columns_its_files_have(tiny_root, tmp_path):
    """RecBole's default load_col (user and item ids only) would fail on the protocol's timestamp."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for suffix in ("inter", "item"):
        shutil.copyfile(tiny_root / DATASET / f"{DATASET}.{suffix}", folder / f"mine.{suffix}")
    overrides = {k: v for k, v in base_overrides(tmp_path, tmp_path / "work").items() if k != "load_col"}
    result = run("SASRec-CE", "mine", [], {**overrides, "hidden_size": 16, "n_layers": 1, "n_heads": 1,
                                            "inner_size": 32})
    assert result.epochs_run == 1 and 0 < result.test["recall@20"] <= 1
