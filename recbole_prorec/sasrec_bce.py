"""SASRec with its own paper's loss, a baseline RecBole lacks in the form PRORec's paper compares against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from recbole.model.sequential_recommender import SASRec
from recbole.utils import InputType


class SASRecBCE(SASRec):
    """SASRec trained with its own paper's loss, as in the PRORec paper's SASRec row.

    Binary cross-entropy on the next item against one sampled negative per training example
    (RecBole trains on every prefix of a sequence, as the paper's loss sums over positions):
    ``-log sigmoid(s_pos) - log(1 - sigmoid(s_neg))``. RecBole's SASRec offers only softmax (CE)
    and pairwise BPR (``-log sigmoid(s_pos - s_neg)``), which are different objectives.
    """

    input_type = InputType.PAIRWISE  # RecBole infers it from loss_type, which knows only BPR and CE

    def __init__(self, config, dataset):
        loss_type = config["loss_type"]
        if loss_type != "BCE":
            raise ValueError(f"SASRecBCE trains with loss_type 'BCE' only, got loss_type={loss_type!r}")
        # RecBole's SASRec builds only its BPR or CE loss; BCE reads the same sampled negative as BPR.
        config["loss_type"] = "BPR"
        try:
            super().__init__(config, dataset)
        finally:
            config["loss_type"] = loss_type
        self.loss_type = loss_type
        self.loss_fct = None

    def calculate_loss(self, interaction) -> torch.Tensor:
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        pos = (seq_output * self.item_embedding(interaction[self.POS_ITEM_ID])).sum(-1)
        neg = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(-1)
        # softplus(-x) = -log sigmoid(x); softplus(x) = -log(1 - sigmoid(x))
        return F.softplus(-pos).mean() + F.softplus(neg).mean()
