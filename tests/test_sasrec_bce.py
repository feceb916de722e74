"""SASRec-BCE: the paper's SASRec row trains with binary cross-entropy, not RecBole's BPR or CE."""
import pytest
import torch
import torch.nn.functional as F

from conftest import build_recbole, project_config
from recbole_prorec.sasrec_bce import SASRecBCE
from recbole_prorec.registry import resolve_model


def test_sasrec_bce_variant_has_sasrec_defaults_and_one_negative(tiny_overrides):
    assert resolve_model("SASRec-BCE").model_class is SASRecBCE
    config = project_config("SASRec-BCE", {"data_path": tiny_overrides()["data_path"]})
    # architecture keys from RecBole's SASRec.yaml, which RecBole itself only finds by class name
    assert (config["hidden_size"], config["n_layers"], config["inner_size"]) == (64, 2, 256)
    assert config["loss_type"] == "BCE"
    assert config["train_neg_sample_args"]["distribution"] == "uniform"
    assert config["train_neg_sample_args"]["sample_num"] == 1


@pytest.fixture(scope="module")
def sasrec_bce(tiny_overrides):
    config, _, (train, _, _) = build_recbole("SASRec-BCE", tiny_overrides())
    torch.manual_seed(0)
    return config, SASRecBCE(config, train._dataset), next(iter(train))


def test_loss_is_binary_cross_entropy_on_positive_and_sampled_negative(sasrec_bce):
    _, model, batch = sasrec_bce
    model.eval()  # no dropout, so the hand-computed scores match
    user = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    pos = (user * model.item_embedding(batch[model.POS_ITEM_ID])).sum(-1)
    neg = (user * model.item_embedding(batch[model.NEG_ITEM_ID])).sum(-1)
    expected = F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + \
        F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
    loss = model.calculate_loss(batch)
    assert loss.shape == () and torch.isclose(loss, expected, atol=1e-6)
    bpr = -F.logsigmoid(pos - neg).mean()  # RecBole's BPR: a different objective
    assert not torch.isclose(loss, bpr, atol=1e-3)


def test_loss_falls_with_training(sasrec_bce):
    config, model, batch = sasrec_bce
    model.train()
    torch.manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = model.calculate_loss(batch).item()
    for _ in range(20):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model.calculate_loss(batch).item()
    assert after < 0.5 * before


def test_other_loss_type_is_refused(tiny_overrides):
    config, _, (train, _, _) = build_recbole("SASRec-BCE", tiny_overrides(loss_type="CE"))
    with pytest.raises(ValueError, match="SASRecBCE trains with loss_type 'BCE' only, got loss_type='CE'"):
        SASRecBCE(config, train._dataset)
