"""Shared fixtures: a tiny synthetic atomic dataset, its Stage I output and a tiny Stage II model.

The ``tiny`` dataset has 40 items in 4 topics (10 items each, titles such as "red running shoe 3")
and 60 users whose histories mostly walk through one topic in order (item k is usually followed
by item k+1 of the same topic), so both the item texts and the co-occurrences carry signal.
Two items appear in ``.inter`` but not in ``.item``; the ``.item`` rows are shuffled so that
their order differs from RecBole's internal id order.

Every size is tiny (16-d DIN, 32-d Transformer, K = 4 so codes are 2-3 levels deep) to keep the
whole suite fast on a busy 2-core CPU.
"""
from __future__ import annotations

import copy
import os
import random
import signal
from pathlib import Path

import pytest
import torch

DATASET = "tiny"
N_USERS = 60
TOPICS = [
    # (title words, brand, categories)
    ("red running shoe", "Acme", "Sports Running_Shoes"),
    ("matte lipstick", "Glow", "Beauty Makeup"),
    ("camping stove", "Trail", "Outdoors Camping"),
    ("strategy board game", "Meeple", "Toys Board_Games"),
]
PER_TOPIC = 10
N_ITEMS = len(TOPICS) * PER_TOPIC
# items that occur in .inter but have no row in .item
ITEMS_WITHOUT_ROW = ("i17", "i34")
ITEM_COLUMNS = ["item_id", "title", "brand", "categories"]


def item_token(topic: int, k: int) -> str:
    return f"i{topic * PER_TOPIC + k + 1:02d}"


def write_tiny_dataset(root: Path, seed: int = 7) -> Path:
    """Write ``root/tiny/tiny.{inter,item}``; returns ``root`` (RecBole's ``data_path`` parent)."""
    rng = random.Random(seed)
    folder = root / DATASET
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    t = 1_000_000
    for u in range(N_USERS):
        topic = u % len(TOPICS)
        length = rng.randint(6, 12)
        k = rng.randrange(PER_TOPIC)
        for _ in range(length):
            if rng.random() < 0.15:  # occasional excursion to another topic
                other = rng.randrange(len(TOPICS))
                token = item_token(other, rng.randrange(PER_TOPIC))
            else:
                token = item_token(topic, k)
                k = (k + 1) % PER_TOPIC
            t += rng.randint(1, 100)
            inter.append(f"u{u:03d}\t{token}\t{t}")
    (folder / f"{DATASET}.inter").write_text("\n".join(inter) + "\n", encoding="utf-8")

    rows = []
    for topic, (words, brand, cats) in enumerate(TOPICS):
        for k in range(PER_TOPIC):
            token = item_token(topic, k)
            if token in ITEMS_WITHOUT_ROW:
                continue
            rows.append(f"{token}\t{words} {k + 1}\t{brand}\t{cats}")
    rng.shuffle(rows)
    header = "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq"
    (folder / f"{DATASET}.item").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return root


def base_overrides(root: Path, work: Path) -> dict:
    """Tiny sizes; every output (checkpoints, caches, unicodes) under ``work``."""
    return {
        "data_path": str(root),
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": list(ITEM_COLUMNS)},
        "text_columns": ["title", "brand", "categories"],
        "semantic_cache_dir": str(work / "semantic_cache"),
        "checkpoint_dir": str(work / "saved"),
        "unicode_dir": str(work / "unicode"),
        "din_embedding_size": 16,
        "din_attention_layers": [8],
        "din_neg_samples": 8,
        "codebook_size": 4,
        "hidden_size": 32,
        "n_heads": 2,
        "inner_size": 64,
        "n_encoder_layers": 1,
        "n_decoder_layers": 2,
        "beam_size": 20,
        "topk": [5, 10, 20],
        "epochs": 1,
        "stage1": {"epochs": 2, "train_batch_size": 32, "learning_rate": 0.005, "eval_step": 0},
        "train_batch_size": 32,
        "eval_batch_size": 32,
        "warmup_steps": 0,
        "show_progress": False,
        "rqvae_epochs": 5,
        # keep interactions of items without an .item row (RecBole drops them by default)
        "filter_inter_by_user_or_item": False,
    }


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The suite shares 2 cores with other work: one intra-op thread avoids spin-waiting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Folder holding ``tiny/tiny.inter`` and ``tiny/tiny.item`` (treat as read-only)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="session")
def tiny_overrides(tiny_root, tiny_work):
    """A factory: fresh (deep-copied) overrides for the tiny dataset, with extra keys on top."""

    def make(**extra) -> dict:
        return {**copy.deepcopy(base_overrides(tiny_root, tiny_work)), **copy.deepcopy(extra)}

    return make


def project_config(label: str, overrides: dict, data_folder: Path | None = None):
    from recbole_prorec.config import ProjectConfig
    from recbole_prorec.registry import resolve_model

    return ProjectConfig(resolve_model(label), DATASET, [], overrides, data_folder=data_folder)


def build_recbole(label: str, overrides: dict, data_folder: Path | None = None):
    """(config, dataset, (train, valid, test)) built the way the runner builds them."""
    from recbole_prorec.build import build
    from recbole_prorec.registry import resolve_model

    run = build(resolve_model(label), DATASET, [], overrides, data_folder)
    return run.config, run.dataset, (run.train, run.valid, run.test)


@pytest.fixture(scope="session")
def stage1_folder(tiny_overrides) -> Path:
    """Stage I (DIN + MAL + CKA, hkmeans K=4) run once on ``tiny``; the unicode dataset's root."""
    from recbole_prorec.stage1 import run_stage1

    return run_stage1(DATASET, [], tiny_overrides()).artifact.root


@pytest.fixture(scope="session")
def stage2(stage1_folder, tiny_overrides):
    """(config, dataset, (train, valid, test)) of PRORec on the Stage I output."""
    return build_recbole("PRORec", tiny_overrides(), stage1_folder)


def make_prorec(stage2, seed: int = 2020, **extra):
    """A fresh PRORec on the Stage I output, with ``extra`` config keys set for its construction."""
    from recbole.utils import init_seed

    from recbole_prorec.prorec import PRORec

    config, _, (train, _, _) = stage2
    saved = {key: config[key] for key in extra}
    for key, value in extra.items():
        config[key] = value
    try:
        init_seed(seed, True)
        return PRORec(config, train._dataset)
    finally:
        for key, value in saved.items():  # the session config is shared: restore it
            config[key] = value


def signal_during(monkeypatch, epoch: int, batch: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process from inside training batch ``batch`` (from 1) of ``epoch``."""
    from recbole_prorec.trainer import SafeTrainer

    original = SafeTrainer._train_epoch

    def train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        if epoch_idx == epoch:
            loss, calls = self.model.calculate_loss, []

            def counted(interaction):
                calls.append(1)
                if len(calls) == batch:
                    os.kill(os.getpid(), sig)
                return loss(interaction)

            self.model.calculate_loss = counted
        try:
            return original(self, train_data, epoch_idx, *args, **kwargs)
        finally:
            self.model.__dict__.pop("calculate_loss", None)

    monkeypatch.setattr(SafeTrainer, "_train_epoch", train_epoch)


@pytest.fixture(scope="session")
def trained_prorec(tiny_overrides, tmp_path_factory) -> Path:
    """A PRORec checkpoint trained on the tiny set through the public API, shared by the tests of
    recommending and of adding items (they only read it and write beside it)."""
    from recbole_prorec import run

    saved = tmp_path_factory.mktemp("rec")
    run("PRORec", DATASET, config_dict=tiny_overrides(checkpoint_dir=str(saved)))
    (checkpoint,) = saved.glob("PRORec-*.pth")
    return checkpoint
