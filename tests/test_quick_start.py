"""The RecBole-style API: run, load_data_and_model, Config and the exported model classes."""
from pathlib import Path

import pytest
import torch

from conftest import DATASET, ITEMS_WITHOUT_ROW


@pytest.mark.parametrize("model", ["SASRec-CE", "PRORec"])
def test_run_returns_recboles_dict_and_the_checkpoint_reloads_to_the_same_test_result(model, tiny_overrides, tmp_path):
    from recbole_prorec import load_data_and_model, run
    from recbole_prorec.trainer import SafeTrainer

    overrides = tiny_overrides(checkpoint_dir=str(tmp_path / "saved"))
    result = run(model, DATASET, config_dict=overrides)
    assert set(result) == {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    assert result["valid_score_bigger"] is True
    assert result["best_valid_score"] == pytest.approx(result["best_valid_result"]["ndcg@10"])
    (checkpoint,) = [p for p in (tmp_path / "saved").glob("*.pth") if "DIN" not in p.name]
    config, loaded, dataset, train, valid, test = load_data_and_model(checkpoint)
    assert config["model_label"] == model and type(loaded).__name__ == config["model"]
    assert config["hidden_size"] == overrides["hidden_size"]  # the run's settings are replayed
    again = SafeTrainer(config, loaded).evaluate(test, load_best_model=False)
    assert dict(again) == pytest.approx(dict(result["test_result"]), abs=1e-4)


def test_a_recbole_style_script_trains_prorec(tiny_overrides, tmp_path):
    """What a RecBole user writes, with our imports: Config -> create_dataset -> data_preparation
    -> model -> trainer. Config runs (here: reuses) Stage I and points data_path at its artifact."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_prorec import PRORec, Config
    from recbole_prorec.trainer import SafeTrainer

    config = Config(model=PRORec, dataset=DATASET, config_dict=tiny_overrides(checkpoint_dir=str(tmp_path)))
    assert Path(config["data_path"]).parent.name.startswith(f"{DATASET}-")  # the Stage-I artifact
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = PRORec(config, train._dataset).to(config["device"])
    trainer = SafeTrainer(config, model)
    best_score, _ = trainer.fit(train, valid, saved=True)
    result = trainer.evaluate(test)
    assert 0 <= best_score <= 1 and 0 <= result["recall@20"] <= 1
    assert torch.isfinite(torch.tensor(list(result.values()))).all()


def test_package_exports_the_api():
    import recbole_prorec

    assert set(recbole_prorec.__all__) == {"Config", "PRORec", "PRORecDIN", "SASRecBCE", "load_data_and_model", "run"}
    assert recbole_prorec.PRORec.needs_stage1 and not getattr(recbole_prorec.SASRecBCE, "needs_stage1", False)


def test_load_data_and_model_names_a_missing_stage1_artifact(tiny_overrides, tmp_path):
    from recbole_prorec import load_data_and_model, run
    from recbole_prorec.trainer import load_checkpoint

    run("PRORec", DATASET, config_dict=tiny_overrides(checkpoint_dir=str(tmp_path / "saved")))
    (src,) = (tmp_path / "saved").glob("PRORec-*.pth")
    state = load_checkpoint(str(src))
    state["config"]["data_path"] = str(tmp_path / "gone-123" / DATASET)
    moved = tmp_path / "moved.pth"
    torch.save(state, moved)
    with pytest.raises(FileNotFoundError, match="gone-123.*run Stage I again"):
        load_data_and_model(moved)


def test_recommend_equals_the_evaluators_beam_search(trained_prorec):
    from recbole_prorec import load_data_and_model
    from recbole_prorec.recommend import recommend

    _, model, dataset, _, _, test = load_data_and_model(trained_prorec)
    batch = next(iter(test))[0]
    items, scores = model.eval().beam_search(batch)
    for row in range(3):
        length = int(batch[model.ITEM_SEQ_LEN][row])
        history = dataset.id2token(dataset.iid_field, batch[model.ITEM_SEQ][row, :length].numpy()).tolist()
        (rec,) = recommend(trained_prorec, history=[history], k=10)
        assert rec.items == dataset.id2token(dataset.iid_field, items[row, :10].numpy()).tolist()
        assert rec.scores == pytest.approx(scores[row, :10].tolist(), abs=1e-5)
        # titles come from the .item file; items without a row there have none
        assert [bool(t) for t in rec.titles] == [i not in ITEMS_WITHOUT_ROW for i in rec.items]


def test_recommend_for_users_reads_their_whole_history(trained_prorec, capsys):
    from recbole_prorec import load_data_and_model
    from recbole_prorec.recommend import recommend
    from recbole_prorec.cli import main

    _, _, dataset, _, _, test = load_data_and_model(trained_prorec)
    user = dataset.id2token(dataset.uid_field, [1])[0]
    target = test.dataset.inter_feat  # the test split's rows: each user's last interaction
    last = target[dataset.iid_field][target[dataset.uid_field] == 1]
    (rec,) = recommend(trained_prorec, user_ids=[user], k=5, exclude_history=True)
    assert rec.user == user and rec.history[-1] == dataset.id2token(dataset.iid_field, last.numpy())[-1]
    assert len(rec.items) == 5 and not set(rec.items) & set(rec.history)  # nothing already seen
    assert rec.scores == sorted(rec.scores, reverse=True)
    main(["--recommend", f"--load_checkpoint={trained_prorec}", f"--user={user}", "--k=3"])
    out = capsys.readouterr().out
    assert f"user {user}" in out and out.count("\n| ") == 1 + 3  # header row, then 3 items


def test_recommend_names_unknown_users_and_items(trained_prorec):
    from recbole_prorec.recommend import recommend

    with pytest.raises(ValueError, match=r"unknown user id\(s\) \['nobody'\]"):
        recommend(trained_prorec, user_ids=["nobody"])
    with pytest.raises(ValueError, match=r"unknown item id\(s\) \['no-such-item'\]"):
        recommend(trained_prorec, history=[["no-such-item"]])
    with pytest.raises(ValueError, match="either user_ids or history"):
        recommend(trained_prorec)


def test_recommend_scores_many_users_in_batches_as_one_by_one(trained_prorec):
    """More users than eval_batch_size (32 here) are scored in chunks: the same lists as alone."""
    from recbole_prorec import load_data_and_model
    from recbole_prorec.recommend import recommend

    _, _, dataset, *_ = load_data_and_model(trained_prorec)
    users = list(dataset.field2id_token[dataset.uid_field][1:41])
    together = recommend(trained_prorec, user_ids=users, k=5)
    assert [r.user for r in together] == users
    for row in (0, 31, 32, 39):
        (alone,) = recommend(trained_prorec, user_ids=[users[row]], k=5)
        assert alone.items == together[row].items
        assert alone.scores == pytest.approx(together[row].scores, abs=1e-5)
    with pytest.raises(ValueError, match="no user ids or histories given"):
        recommend(trained_prorec, user_ids=[])


def test_a_checkpoint_older_than_an_architecture_key_reloads_in_the_form_it_was_trained_in(tiny_overrides, tmp_path):
    """history_tokens came after checkpoints read histories as code tokens (today's default is one
    token per item): such a checkpoint, without the key, must reload with history_tokens='codes'
    and give its run's test result, not be refused or rebuilt in today's form."""
    from recbole_prorec import load_data_and_model, run
    from recbole_prorec.trainer import SafeTrainer, load_checkpoint

    result = run("PRORec", DATASET, config_dict=tiny_overrides(checkpoint_dir=str(tmp_path / "saved"), history_tokens="codes"))
    (src,) = (tmp_path / "saved").glob("PRORec-*.pth")
    state = load_checkpoint(str(src))
    del state["config"]["history_tokens"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    config, model, *_, test = load_data_and_model(old)
    assert config["history_tokens"] == "codes" and not model.history_per_item
    again = SafeTrainer(config, model).evaluate(test, load_best_model=False)
    assert dict(again) == pytest.approx(dict(result["test_result"]), abs=1e-4)
