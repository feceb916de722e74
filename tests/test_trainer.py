"""SafeTrainer: the learning-rate schedule, its errors, and the per-epoch curve it records."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_prorec, signal_during
from recbole_prorec.trainer import ParameterAverage, RunInterrupted, SafeTrainer, lr_factor


def test_warmup_is_linear_then_each_schedule_has_its_shape():
    warmup, total = 100, 1100
    assert [lr_factor(s, warmup, "constant", total) for s in (0, 49, 99)] == pytest.approx([0.01, 0.5, 1.0])
    assert lr_factor(5000, warmup, "constant", total) == 1.0
    # inverse square root: 1 at the end of warmup, halves when the step count quadruples
    assert lr_factor(warmup - 1, warmup, "inverse_sqrt", total) == pytest.approx(1.0)
    assert lr_factor(4 * warmup - 1, warmup, "inverse_sqrt", total) == pytest.approx(0.5)
    # cosine: 1 after warmup, halfway between 1 and the floor midway, the floor at the end and after
    assert lr_factor(warmup, warmup, "cosine", total, 0.1) == pytest.approx(1.0)
    assert lr_factor(600, warmup, "cosine", total, 0.1) == pytest.approx(0.55)
    assert lr_factor(total, warmup, "cosine", total, 0.1) == pytest.approx(0.1)
    assert lr_factor(10 * total, warmup, "cosine", total, 0.1) == pytest.approx(0.1)
    falling = [lr_factor(s, warmup, "cosine", total) for s in range(warmup, total, 100)]
    assert falling == sorted(falling, reverse=True) and len(set(falling)) == len(falling)


def test_unknown_schedule_is_refused(stage2):
    config, _, _ = stage2
    saved = config["lr_scheduler"]
    config["lr_scheduler"] = "linear"
    try:
        with pytest.raises(ValueError, match="lr_scheduler must be one of"):
            SafeTrainer(config, make_prorec(stage2))
    finally:
        config["lr_scheduler"] = saved


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "cosine"])
def test_fit_follows_the_schedule_and_records_a_curve(stage2, tmp_path, schedule):
    config, _, (train, valid, _) = stage2
    changes = {"lr_scheduler": schedule, "warmup_steps": 3, "epochs": 2, "eval_step": 1,
               "checkpoint_dir": str(tmp_path), "lr_min_ratio": 0.2, "lr_decay_steps": 0}
    saved = {k: config[k] for k in changes}
    config.final_config_dict.update(changes)
    try:
        model = make_prorec(stage2)
        trainer = SafeTrainer(config, model)
        rates, epochs_set = [], []
        trainer.optimizer.register_step_pre_hook(lambda opt, *_: rates.append(opt.param_groups[0]["lr"]))
        model.set_epoch = epochs_set.append
        trainer.fit(train, valid, saved=True)
    finally:
        config.final_config_dict.update(saved)
    assert epochs_set == [0, 1]  # before each training epoch
    steps = 2 * len(train)
    base = config["learning_rate"]
    assert rates == pytest.approx([base * lr_factor(k, 3, schedule, steps, 0.2) for k in range(steps)])
    assert rates[0] == pytest.approx(base / 3) and max(rates) == pytest.approx(base)
    assert trainer.lr_step == steps
    if schedule == "cosine":  # decays over exactly the run's epochs
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * base)
    assert [entry["epoch"] for entry in trainer.curve] == [0, 1]
    for entry in trainer.curve:
        assert set(model.loss_names) <= set(entry) and all(math.isfinite(entry[n]) for n in model.loss_names)
        assert 0 <= entry["ndcg@10"] <= entry["recall@10"] <= 1
        assert 0 <= entry["item_in_beam"] <= 1 and 0 <= entry["first_code_in_beam"] <= 1
        assert entry["elapsed_s"] >= entry["train_s"] > 0
    assert trainer.curve[1]["train_s"] > trainer.curve[0]["train_s"]


def test_resumed_run_goes_on_with_the_schedule(stage2, tmp_path, monkeypatch):
    """A run resumed after a stop in epoch 1 continues the learning-rate schedule where epoch 0 left it."""
    config, _, (train, valid, _) = stage2
    changes = {"lr_scheduler": "inverse_sqrt", "warmup_steps": 2, "epochs": 2, "eval_step": 1,
               "checkpoint_dir": str(tmp_path)}
    saved = {k: config[k] for k in changes}
    config.final_config_dict.update(changes)
    try:
        first = SafeTrainer(config, make_prorec(stage2))
        with monkeypatch.context() as patch:
            signal_during(patch, epoch=1, batch=3)
            with pytest.raises(RunInterrupted) as stopped:
                first.fit(train, valid, saved=True)
        second = SafeTrainer(config, make_prorec(stage2))
        second.resume_checkpoint(stopped.value.resume_file)
        rates, epochs_set = [], []
        second.optimizer.register_step_pre_hook(lambda opt, *_: rates.append(opt.param_groups[0]["lr"]))
        second.model.set_epoch = epochs_set.append  # the model's per-epoch schedules go on too
        second.fit(train, valid, saved=True)
    finally:
        config.final_config_dict.update(saved)
    n = len(train)
    assert second.lr_step == 2 * n and [e["epoch"] for e in second.curve] == [0, 1] and epochs_set == [1]
    base = config["learning_rate"]
    assert rates == pytest.approx([base * lr_factor(n + k, 2, "inverse_sqrt", 2 * n) for k in range(n)])


def test_checkpoint_of_the_other_last_code_form_is_named(stage2, tmp_path):
    config, _, (train, valid, _) = stage2
    changes = {"epochs": 1, "checkpoint_dir": str(tmp_path)}
    saved = {k: config[k] for k in changes}
    config.final_config_dict.update(changes)
    try:
        trainer = SafeTrainer(config, make_prorec(stage2))
        trainer.fit(train, valid, saved=True)
        config["last_code_token"] = "shared"
        other = SafeTrainer(config, make_prorec(stage2, last_code_token="shared"))
        with pytest.raises(ValueError, match="last_code_token='item'"):
            other.evaluate(valid, load_best_model=True, model_file=trainer.saved_model_file)
    finally:
        config["last_code_token"] = "item"
        config.final_config_dict.update(saved)


def test_tensorboard_holds_each_loss_part_by_name(tiny_overrides, tmp_path, monkeypatch):
    """RecBole's SummaryWriter (log_tensorboard/ under the working directory) gets one scalar per
    loss part and epoch, named as in the training log, with the log's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recbole_prorec.runner import run

    monkeypatch.chdir(tmp_path)
    result = run("PRORec", "tiny", [], tiny_overrides(checkpoint_dir=str(tmp_path / "saved"), epochs=2))
    # the run's own folder (add_hparams writes a sub-folder of its own)
    (events,) = {p.parent for p in (tmp_path / "log_tensorboard").glob("*/events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    parts = [f"Loss/Train/{name}" for name in ("gen_l1", "gen_l2", "ikd")]
    assert set(parts) <= set(acc.Tags()["scalars"])
    assert not any(tag.startswith("Loss/Train0") for tag in acc.Tags()["scalars"])
    for part in parts:
        values = [(e.step, e.value) for e in acc.Scalars(part)]
        name = part.rsplit("/", 1)[1]
        assert values == [(entry["epoch"], pytest.approx(entry[name], rel=1e-5)) for entry in result.curve]


def test_freed_memory_goes_back_every_few_batches_and_after_each_epoch(stage2, tmp_path, monkeypatch):
    import recbole_prorec.trainer as trainer_module

    config, _, (train, valid, _) = stage2
    calls = []
    monkeypatch.setattr(trainer_module, "release_freed_memory", lambda: calls.append(1))
    changes = {"epochs": 2, "eval_step": 1, "release_memory_every": 3, "checkpoint_dir": str(tmp_path)}
    saved = {k: config[k] for k in changes}
    config.final_config_dict.update(changes)
    try:
        SafeTrainer(config, make_prorec(stage2)).fit(train, valid, saved=False)
    finally:
        config.final_config_dict.update(saved)
    per_epoch = (len(train) - 1) // 3 + 2  # batches 3, 6, ...; then after training and after validation
    assert len(train) > 3 and len(calls) == 2 * per_epoch


@pytest.mark.parametrize("learner,fused", [("adam", True), ("adamw", True), ("sgd", None)])
def test_adam_and_adamw_are_fused_and_keep_their_settings(stage2, learner, fused):
    """The trainer's Adam / AdamW are torch's fused kernels with RecBole's lr and weight decay over
    every parameter; other learners are RecBole's, untouched."""
    config, _, _ = stage2
    saved = config["learner"], config["weight_decay"]
    config["learner"], config["weight_decay"] = learner, 0.01
    try:
        model = make_prorec(stage2)
        optimizer = SafeTrainer(config, model).optimizer
    finally:
        config["learner"], config["weight_decay"] = saved
    assert type(optimizer).__name__.lower() == learner
    group, = optimizer.param_groups
    assert group.get("fused") is fused
    assert group["lr"] == config["learning_rate"] and group["weight_decay"] == 0.01
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_parameter_average_follows_its_decay_and_swaps_the_weights_in_and_out():
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    average = ParameterAverage(layer, decay=0.5)
    for value in (1.0, 2.0, 4.0):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update()
    # decays min(0.5, (1 + t) / (10 + t)) = 2/11, 3/12, 4/13: 0 -> 9/11 -> 9/11 + 3/4 (2 - 9/11) -> ...
    first = 9 / 11
    second = first + 0.75 * (2 - first)
    third = second + (9 / 13) * (4 - second)
    assert average.average[0] == pytest.approx(torch.full((1, 2), third)) and average.steps == 3
    for _ in range(20):  # later the decay is capped: each step moves the average halfway
        average.update()
    assert average.average[0] == pytest.approx(torch.full((1, 2), 4.0), abs=1e-5)
    with torch.no_grad():
        layer.weight.fill_(8.0)
    before = average.average[0].clone()
    with average.applied():
        assert torch.equal(layer.weight, before)
    assert torch.equal(layer.weight, torch.full((1, 2), 8.0))
    assert torch.equal(average.averaged_state()["weight"], before)


def test_ema_decay_validates_and_saves_the_average_and_training_goes_on_from_the_raw_weights(stage2, tmp_path):
    config, _, (train, valid, _) = stage2
    changes = {"epochs": 2, "eval_step": 1, "checkpoint_dir": str(tmp_path), "ema_decay": 0.9}
    saved = {k: config[k] for k in changes}
    config.final_config_dict.update(changes)
    try:
        model = make_prorec(stage2)
        trainer = SafeTrainer(config, model)
        raw = {}
        trainer.optimizer.register_step_post_hook(
            lambda *_: raw.update({n: p.detach().clone() for n, p in model.named_parameters()}))
        trainer.fit(train, valid, saved=True)
        after_fit = {n: p.detach().clone() for n, p in model.named_parameters()}
        best = trainer.curve[trainer.best_epoch]
        result = trainer.evaluate(valid, load_best_model=True)
    finally:
        config.final_config_dict.update(saved)
    assert trainer.average.steps == 2 * len(train)
    # the model leaves fit with the average, not with the last step's weights
    assert all(torch.equal(after_fit[n], a) for n, a in zip(trainer.average.names, trainer.average.average))
    assert any(not torch.equal(after_fit[n], raw[n]) for n in trainer.average.names)
    # the checkpoint holds the weights that were validated: they score what the curve recorded
    assert result["ndcg@10"] == pytest.approx(best["ndcg@10"]) and result["recall@10"] == pytest.approx(best["recall@10"])


def test_parameter_average_reaches_every_name_of_a_tied_parameter():
    model = torch.nn.Module()
    model.encoder = torch.nn.Linear(2, 2)
    model.decoder = model.encoder  # tied: two names in the state dict, one parameter
    average = ParameterAverage(model, decay=0.9)
    with torch.no_grad():
        model.encoder.weight.add_(1.0)
    average.update()
    state = average.averaged_state()
    assert set(state) == {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}
    assert torch.equal(state["decoder.weight"], state["encoder.weight"])
    assert torch.equal(state["encoder.weight"], average.tensors()["encoder.weight"])
    assert not torch.equal(state["encoder.weight"], model.encoder.weight)


def test_a_saved_average_of_other_parameters_is_refused_by_name():
    average = ParameterAverage(torch.nn.Linear(2, 1, bias=False), decay=0.9)
    with pytest.raises(ValueError, match=r"has parameters \['bias'\] that this model lacks"):
        average.load({"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}, steps=5)
    average.load({"weight": torch.ones(1, 2)}, steps=5)
    assert average.steps == 5 and torch.equal(average.tensors()["weight"], torch.ones(1, 2))
