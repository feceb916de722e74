"""Runs: any RecBole sequential model or PRORec (Stage I first), one protocol, one results-table row
each (``cli.py`` is the command line around it).

Deliberately avoids ``recbole.quick_start`` (it imports ray at import time and can only find
RecBole's own models); runs are built by ``build.py`` and trained by ``trainer.SafeTrainer``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path
from time import monotonic
from typing import Any, Mapping, Sequence

from recbole_prorec import distributed as ddp
from recbole_prorec.build import Run, load_data
from recbole_prorec.config import ProjectConfig
from recbole_prorec.data import statistics, statistics_table
from recbole_prorec.logs import start_log
from recbole_prorec.registry import ModelSpec, resolve_model
from recbole_prorec.stage1 import run_stage1
from recbole_prorec.trainer import SafePretrainer, SafeTrainer, latest_resume_file

TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
LATEST = "latest"  # --resume without a path: this model's newest resume state on this data


@dataclass
class RunResult:
    """What one training run produced, enough for a results-table row."""

    label: str
    dataset: str
    seed: int
    best_epoch: int
    epochs_run: int
    train_time: float
    valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)  # per validated epoch: losses, metrics, seconds
    checkpoint: str = ""  # the best epoch's weights
    log_file: str = ""
    data_folder: str = ""  # PRORec: its Stage-I artifact (the unicode dataset folder)
    best_valid_score: float = float("nan")  # the valid_metric at the best epoch
    valid_score_bigger: bool = True

    def row(self) -> str:
        cells = [self.label] + [f"{self.test.get(m, float('nan')):.4f}" for m in TABLE_METRICS]
        cells += [str(self.best_epoch), f"{self.train_time:.1f}", str(self.seed)]
        return "| " + " | ".join(cells) + " |"


def results_table(results: Sequence[RunResult]) -> str:
    head = ["model", "Recall@10", "Recall@20", "NDCG@10", "NDCG@20", "best epoch", "train s", "seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + [r.row() for r in results])


CURVE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")  # validation (and pseudo-test) columns
DIAGNOSTICS = ("first_code_in_beam", "item_in_beam")  # PRORec's beam statistics of each validation


def curve_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One row per validated epoch: each record is an entry of a run's ``curve``, with the run's
    ``label`` and ``seed`` where records of several runs share the table. Cumulative seconds (training, all of fit), validation metrics, pseudo-test
    metrics where a run evaluated them, training losses per batch (the union over models, blank where
    a model has none) and beam diagnostics; the runner's results file and ``benchmarks/curves.py``
    both write it, so a run's whole curve is kept beside its test row."""
    skip = {"epoch", "train_s", "elapsed_s", "label", "seed", "command", *DIAGNOSTICS}
    losses = list(dict.fromkeys(k for r in records for k in r if k not in skip and "@" not in k))
    tests = [m for m in CURVE_METRICS if any(f"test_{m}" in r for r in records)]
    runs = [k for k in ("label", "seed") if any(k in r for r in records)]
    header = [*[{"label": "model"}.get(k, k) for k in runs], "epoch", "train s", "elapsed s",
              *[f"valid {m}" for m in CURVE_METRICS],
              *[f"pseudo-test {m}" for m in tests], *losses, *DIAGNOSTICS]

    def cell(record: Mapping[str, Any], key: str, digits: int = 4) -> str:
        return f"{record[key]:.{digits}f}" if key in record else ""

    rows = [[*[r.get(k, "") for k in runs], r["epoch"], cell(r, "train_s", 1), cell(r, "elapsed_s", 1),
             *[cell(r, m) for m in CURVE_METRICS], *[cell(r, f"test_{m}") for m in tests],
             *[cell(r, k) for k in losses], *[cell(r, k, 3) for k in DIAGNOSTICS]] for r in records]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def stage1_folder(spec: ModelSpec, dataset: str, config_files: Sequence[str], overrides: Mapping) -> Path | None:
    """The data folder of the model's Stage-I artifact (Stage I runs if it is not there yet), or
    None for a model that reads the dataset as it is."""
    if not spec.needs_stage1:
        return None
    overrides = {**spec.overrides, **overrides}
    if ddp.global_rank() != 0:  # torchrun: rank 0 trains Stage I while the others wait, then reuse it
        ddp.wait_for_all()
        return run_stage1(dataset, config_files, {**overrides, "stage1_rerun": False}).artifact.root
    folder = run_stage1(dataset, config_files, overrides).artifact.root
    ddp.wait_for_all()
    return folder


def run(
    label: str,
    dataset: str,
    config_files: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    evaluate_test: bool = True,
    saved: bool = True,
    resume: str | None = None,
    test_every_epoch: bool = False,
) -> RunResult:
    """Train and test one model on one dataset (PRORec: Stage I first, or its cached artifact);
    ``evaluate_test=False`` leaves the test split unread, for tuning on validation curves;
    ``saved=False`` (RecBole's flag) writes no checkpoint and tests the last epoch's weights;
    ``resume`` continues an interrupted run from its resume state (a path, or ``"latest"``: the
    newest of this model on this data). A signal stops training with ``RunInterrupted``.
    ``test_every_epoch`` adds the test split's metrics (``test_recall@10``, ...) to every validated
    epoch of the curve: only where ``drop_last_interactions`` > 0, whose test targets are the real
    validation items, so the real test split is still read once at most."""
    overrides = dict(overrides or {})
    spec = resolve_model(label)
    # checks before a Stage I of minutes, not after it, on a config that joins no process group
    early = ProjectConfig(spec, dataset, config_files, {k: v for k, v in overrides.items() if k not in ddp.DDP_KEYS})
    if test_every_epoch and not early["drop_last_interactions"]:
        raise ValueError("test_every_epoch reads the test split after every epoch: only with drop_last_interactions "
                         ">= 1 (a nested split, whose test targets are validation items), never on the real test split")
    SafeTrainer.check_config(early)
    if hasattr(spec.model_class, "check_config"):
        spec.model_class.check_config(early)
    folder = stage1_folder(spec, dataset, config_files, overrides)
    config = ProjectConfig(spec, dataset, config_files, overrides, data_folder=folder)
    config.check_output_folders(["checkpoint_dir"])
    log_file = start_log(config)
    logger = getLogger()
    logger.info(config)
    for key in config.unknown_keys():
        logger.warning(f"config key '{key}' has no default in RecBole or properties/ and may be misspelt; "
                       f"{spec.name} ignores it unless it reads it by that name")
    data = load_data(spec, config)
    logger.info(data.dataset)
    logger.info("dataset statistics\n" + statistics_table(dataset, statistics(data.dataset)))
    show = config["show_progress"]
    pretrain_time = pretrain(data) if config["train_stage"] == "pretrain" and not config["load_checkpoint"] else 0.0
    model = data.model()
    logger.info(model)
    trainer = SafeTrainer(config, model)
    if config["load_checkpoint"]:  # test a trained model instead of training one
        trainer.saved_model_file = config["load_checkpoint"]
    else:
        if resume:
            trainer.resume_checkpoint(latest_resume_file(config) if resume == LATEST else resume)
        also_test = (lambda *_: trainer.curve[-1].update(test_metrics(trainer, data.test))) if test_every_epoch else None
        trainer.fit(data.train, data.valid, saved=saved, show_progress=show, callback_fn=also_test)
    test_result = trainer.evaluate(data.test, load_best_model=saved, show_progress=show) if evaluate_test else {}
    logger.info(f"best valid: {trainer.best_valid_result}")
    if evaluate_test:
        logger.info(f"test result: {test_result}")
    return RunResult(
        label=label,
        dataset=dataset,
        seed=config["seed"],
        best_epoch=trainer.best_epoch,
        epochs_run=trainer.epochs_run,
        train_time=pretrain_time + trainer.train_time,
        valid=dict(trainer.best_valid_result or {}),
        test=dict(test_result or {}),
        curve=trainer.curve,
        checkpoint=trainer.saved_model_file if saved else "",
        log_file=log_file,
        data_folder=config["data_path"] if folder else "",
        best_valid_score=float(trainer.best_valid_score),
        valid_score_bigger=bool(config["valid_metric_bigger"]),
    )


def test_metrics(trainer: SafeTrainer, test) -> dict[str, float]:
    """``test``'s metrics of the weights just validated, named ``test_<metric>``."""
    return {f"test_{k}": float(v) for k, v in trainer.evaluate_validated(test).items()}


def pretrain(data: Run) -> float:
    """Self-supervised pre-training (S3Rec's ``train_stage: pretrain``); switches the config to
    fine-tuning from the pre-trained weights, with what is left of ``train_time_budget``, and
    returns the pre-training time in seconds."""
    config = data.config
    trainer = SafePretrainer(config, data.model())
    trainer.saved_model_file = trainer.saved_model_file.replace(".pth", "-pretrained.pth")
    start = monotonic()
    path = trainer.pretrain(data.train, show_progress=config["show_progress"])
    ddp.wait_for_all()  # the file is written by rank 0 only
    config["train_stage"] = "finetune"
    config["pre_model_path"] = path
    if config["train_time_budget"]:  # one budget for both phases; a spent one still fine-tunes an epoch
        config["train_time_budget"] = max(config["train_time_budget"] - (monotonic() - start), 1e-9)
    return trainer.train_time


def run_distributed(label: str, dataset: str, config_files: Sequence[str], overrides: Mapping, nproc: int) -> RunResult:
    """RecBole's multi-process DDP (gloo on CPU, NCCL on GPU); rank 0's result is returned.
    PRORec's Stage I runs here first, in one process; the workers then find its artifact."""
    stage1_folder(resolve_model(label), dataset, config_files, overrides)
    # the workers reuse that artifact: one Stage I, not one more per rank
    return ddp.launch(run, (label, dataset, config_files), {**overrides, "stage1_rerun": False}, nproc)
