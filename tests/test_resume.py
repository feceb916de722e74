"""Resumable runs: a run stopped by SIGTERM and resumed ends exactly where an uninterrupted one does."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import yaml

from conftest import signal_during
from recbole_prorec.cli import main
from recbole_prorec.runner import run
from recbole_prorec.trainer import RESUME_SUFFIX, RunInterrupted, load_checkpoint

EPOCHS = 3


def overrides_for(tiny_overrides, tmp_path, **extra) -> dict:
    # inverse-sqrt decay and dropout make the schedule and the RNG states matter
    return tiny_overrides(checkpoint_dir=str(tmp_path / "saved"), epochs=EPOCHS, eval_step=1, stopping_step=10,
                          warmup_steps=3, lr_scheduler="inverse_sqrt", **extra)


def comparable(result) -> tuple:
    curve = [{k: v for k, v in entry.items() if not k.endswith("_s")} for entry in result.curve]
    return result.valid, result.test, result.best_epoch, result.epochs_run, curve


@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9}], ids=["weights", "weight average"])
def test_run_stopped_by_sigterm_and_resumed_ends_as_the_uninterrupted_run(tiny_overrides, tmp_path, monkeypatch, extra):
    whole = run("PRORec", "tiny", [], overrides_for(tiny_overrides, tmp_path / "whole", **extra))
    assert not list((tmp_path / "whole" / "saved").glob(f"*{RESUME_SUFFIX}"))  # a finished run leaves none

    overrides = overrides_for(tiny_overrides, tmp_path / "cut", **extra)
    with monkeypatch.context() as patch:
        signal_during(patch, epoch=2, batch=2)
        with pytest.raises(RunInterrupted) as stopped:
            run("PRORec", "tiny", [], overrides)
    assert stopped.value.signal_name == "SIGTERM" and stopped.value.epoch == 2
    assert stopped.value.resume_file.endswith(RESUME_SUFFIX)
    state = load_checkpoint(stopped.value.resume_file)
    assert state["epoch"] == 1 and state["epochs_run"] == 2 and len(state["curve"]) == 2
    if extra:  # the raw weights to train on and the average to validate, both
        average = state["parameter_average"]
        assert state["average_steps"] > 0 and set(average) <= set(state["state_dict"])
        assert any(not torch.equal(state["state_dict"][name], tensor) for name, tensor in average.items())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with fit

    resumed = run("PRORec", "tiny", [], overrides, resume="latest")
    assert comparable(resumed) == comparable(whole)
    assert resumed.checkpoint == state["best_checkpoint"]
    assert not os.path.exists(stopped.value.resume_file)


def test_a_stop_in_the_first_epoch_leaves_nothing_to_resume(tiny_overrides, tmp_path, monkeypatch):
    signal_during(monkeypatch, epoch=0, batch=1, sig=signal.SIGINT)
    with pytest.raises(RunInterrupted, match="SIGINT received: training stopped during epoch 0; no epoch had completed"):
        run("PRORec", "tiny", [], overrides_for(tiny_overrides, tmp_path))
    with pytest.raises(FileNotFoundError, match="no resume state .* of model PRORec"):
        run("PRORec", "tiny", [], overrides_for(tiny_overrides, tmp_path), resume="latest")


def test_command_line_exits_with_the_signal_and_prints_the_resume_command(tiny_overrides, tmp_path, monkeypatch, capsys):
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides_for(tiny_overrides, tmp_path)), encoding="utf-8")
    argv = ["--model=PRORec", "--dataset=tiny", f"--config_files={config_file}", f"--results_file={tmp_path / 't.md'}"]
    signal_during(monkeypatch, epoch=1, batch=1)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    (resume_file,) = (tmp_path / "saved").glob(f"*{RESUME_SUFFIX}")
    assert f"the state after epoch 0 is in {resume_file}" in err
    assert f"resume with: python run_recbole_prorec.py --model=PRORec {' '.join(argv[1:])} --resume={resume_file}" in err
    assert not (tmp_path / "t.md").exists()


def test_resume_refuses_a_best_epoch_checkpoint_and_another_dataset(tiny_overrides, tmp_path, monkeypatch):
    overrides = overrides_for(tiny_overrides, tmp_path)
    signal_during(monkeypatch, epoch=1, batch=1)
    with pytest.raises(RunInterrupted) as stopped:
        run("PRORec", "tiny", [], overrides)
    state = load_checkpoint(stopped.value.resume_file)
    with pytest.raises(ValueError, match="holds one epoch's weights, not a resume state"):
        run("PRORec", "tiny", [], overrides, resume=state["best_checkpoint"])
    state["config"]["dataset"] = "other"
    moved = tmp_path / f"other{RESUME_SUFFIX}"
    torch.save(state, moved)
    with pytest.raises(ValueError, match="checkpoint was trained with dataset='other', this run has dataset='tiny'"):
        run("PRORec", "tiny", [], overrides, resume=str(moved))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tiny_overrides, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo owned > " + str(tmp_path / "owned"),))

    crafted = tmp_path / f"crafted{RESUME_SUFFIX}"
    torch.save({"config": {}, "rng": Payload()}, crafted)
    with pytest.raises(Exception, match="Weights only load failed"):
        run("PRORec", "tiny", [], overrides_for(tiny_overrides, tmp_path), resume=str(crafted))
    assert not (tmp_path / "owned").exists()


def test_two_runs_with_one_seed_give_identical_codes_and_metrics(tiny_overrides, tmp_path):
    """Determinism: Stage I twice from scratch (text encoding, DIN, k-means) writes the same bytes;
    Stage II twice on it gives the same curve and metrics."""
    from recbole_prorec.stage1 import run_stage1

    outputs = []
    for name in ("first", "second"):
        overrides = tiny_overrides(unicode_dir=str(tmp_path / name / "unicode"),
                                   semantic_cache_dir=str(tmp_path / name / "cache"))
        folder = run_stage1("tiny", [], overrides).artifact.folder
        outputs.append({p.name: p.read_bytes() for p in folder.iterdir() if p.name != "stage1.json"})
    assert outputs[0] == outputs[1] and {"tiny.item", "tiny.emb.npy"} <= set(outputs[0])
    first, second = (run("PRORec", "tiny", [], overrides_for(tiny_overrides, tmp_path / name)) for name in ("a", "b"))
    assert comparable(first) == comparable(second) and first.test["ndcg@10"] > 0
