"""Command-line runner: any RecBole sequential model or PRORec, one protocol, one results table.

Deliberately avoids ``recbole.quick_start`` (it imports ray at import time and can only find
RecBole's own models); runs are built by ``build.py`` and trained by ``trainer.SafeTrainer``.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from datetime import datetime
from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path
from time import monotonic
from typing import Any, Mapping, Sequence

from recbole_prorec import PROJECT_ROOT
from recbole_prorec import distributed as ddp
from recbole_prorec.build import Run, load_data
from recbole_prorec.config import ProjectConfig
from recbole_prorec.data import statistics, statistics_table
from recbole_prorec.logs import start_log
from recbole_prorec.registry import ModelSpec, resolve_model
from recbole_prorec.stage1 import run_stage1
from recbole_prorec.trainer import RunInterrupted, SafePretrainer, SafeTrainer, latest_resume_file

TABLE_METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
LATEST = "latest"  # --resume without a path: this model's newest resume state on this data
# what our checks raise on bad files and settings, and a diverged loss: a message, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


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
) -> RunResult:
    """Train and test one model on one dataset (PRORec: Stage I first, or its cached artifact);
    ``evaluate_test=False`` leaves the test split unread, for tuning on validation curves;
    ``saved=False`` (RecBole's flag) writes no checkpoint and tests the last epoch's weights;
    ``resume`` continues an interrupted run from its resume state (a path, or ``"latest"``: the
    newest of this model on this data). A signal stops training with ``RunInterrupted``."""
    overrides = dict(overrides or {})
    spec = resolve_model(label)
    if hasattr(spec.model_class, "check_config"):  # before a Stage I of minutes, not after it
        plain = {k: v for k, v in overrides.items() if k not in ddp.DDP_KEYS}  # joins no process group
        spec.model_class.check_config(ProjectConfig(spec, dataset, config_files, plain))
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
        trainer.fit(data.train, data.valid, saved=saved, show_progress=show)
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


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(
        description="Train and evaluate RecBole sequential models and PRORec under one protocol. "
        "Any other RecBole or PRORec config key is accepted as --key=value.",
    )
    parser.add_argument("--model", default="PRORec", help="model or variant; comma-separated to compare")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config_files", default="", help="comma-separated YAML files")
    parser.add_argument("--nproc", type=int, default=1, help="processes for RecBole's DDP")
    parser.add_argument("--stage", choices=["all", "unicode"], default="all")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not just its message")
    parser.add_argument("--resume", nargs="?", const=LATEST, default=None, metavar="PATH",
                        help="continue an interrupted run from its .resume.pth file (no PATH: the newest one "
                        "of the same model, dataset and Stage-I output in checkpoint_dir)")
    parser.add_argument("--results_file", default=None, help="Markdown table (default results/<dataset>.md)")
    parser.add_argument("--recommend", action="store_true",
                        help="print top-k items of a trained model (--load_checkpoint=FILE) for --user or --history")
    parser.add_argument("--user", default=None, help="with --recommend: comma-separated user ids")
    parser.add_argument("--history", default=None, help="with --recommend: comma-separated item ids, oldest first")
    parser.add_argument("--k", type=int, default=10, help="with --recommend: items per user")
    parser.add_argument("--exclude_history", action="store_true", help="with --recommend: drop items already seen")
    parser.add_argument("--add_items", default=None, metavar="FILE",
                        help="give the new items of an atomic .item FILE (text only) codes and weights in a copy of "
                        "a trained PRORec (--load_checkpoint=FILE), without retraining")
    parser.add_argument("--placement", choices=["tree", "random"], default="tree",
                        help="with --add_items: nearest k-means clusters (tree) or random leaf clusters (a baseline)")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for arg in rest:
        key, sep, value = arg.partition("=")
        if not (key.startswith("--") and sep and len(key) > 2):
            parser.error(f"unrecognised argument {arg!r}: config keys are given as --key=value")
        overrides[key[2:]] = value
    return args, overrides


def print_recommendations(args, overrides: Mapping[str, str]) -> None:
    from recbole_prorec.recommend import recommend

    if not overrides.get("load_checkpoint"):
        raise ValueError("--recommend needs --load_checkpoint=FILE (a checkpoint the runner saved)")
    users = args.user.split(",") if args.user else None
    history = [args.history.split(",")] if args.history else None
    for rec in recommend(overrides["load_checkpoint"], users, history, args.k, args.exclude_history):
        print(f"\n{'user ' + rec.user if rec.user else 'history'} (last items: {', '.join(rec.history[-5:])})")
        print("| rank | item | score | title |\n|---|---|---|---|")
        for rank, (item, value, title) in enumerate(zip(rec.items, rec.scores, rec.titles), 1):
            print(f"| {rank} | {item} | {value:.4f} | {title} |")


def print_added_items(args, overrides: Mapping[str, str]) -> None:
    from recbole_prorec.cold_start import add_items

    if not overrides.get("load_checkpoint"):
        raise ValueError("--add_items needs --load_checkpoint=FILE (a trained PRORec checkpoint)")
    result = add_items(overrides["load_checkpoint"], args.add_items, args.placement)
    print(f"\n{len(result.items)} new items placed ({args.placement}; text -> integrated map R^2 {result.map_r2:.3f})")
    print("| item | code |\n|---|---|")
    for item, code in zip(result.items, result.codes):
        print(f"| {item} | {' '.join(map(str, code))} |")
    print(f"\nStage-I artifact with the new items: {result.artifact}\ncheckpoint: {result.checkpoint}\n"
          f"recommend with: python run_recbole_prorec.py --recommend --load_checkpoint={result.checkpoint} --user=ID")


def main(argv: Sequence[str] | None = None) -> list[RunResult]:
    """The command line; RecBole's third-party FutureWarnings (pandas, torch.cuda.amp), which it
    raises on every run and the user cannot act on, are silenced here, not in library code.

    Errors in what the user gave (files, settings: ``USER_ERRORS``) end with one line and exit
    code 2, a signal with the resume command and 128 + its number; ``--debug`` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole(\.|$)")
        try:
            return _main(argv)
        except RunInterrupted as stop:
            print(f"\n{stop}\n{resume_hint(stop, argv)}", file=sys.stderr)
            raise SystemExit(128 + signal.Signals[stop.signal_name].value) from None
        except USER_ERRORS as error:
            if "--debug" in argv:
                raise
            print(f"error: {error}\n(--debug shows the traceback)", file=sys.stderr)
            raise SystemExit(2) from None


def resume_hint(stop: RunInterrupted, argv: Sequence[str]) -> str:
    """The command that continues an interrupted run: the same arguments, the interrupted model only."""
    if not stop.resume_file:
        return "nothing to resume: run the command again"
    kept = [a for a in argv if not a.startswith(("--model=", "--resume"))]
    return "resume with: " + " ".join(["python run_recbole_prorec.py", f"--model={stop.label}", *kept,
                                       f"--resume={stop.resume_file}"])


def _main(argv: Sequence[str] | None) -> list[RunResult]:
    args, overrides = parse_args(argv)
    torchrun = ddp.torchrun_overrides()
    if torchrun:  # one of torchrun's workers, on this machine or another
        if args.nproc > 1:
            raise ValueError("under torchrun, give the processes per machine to torchrun (--nproc_per_node), not --nproc")
        ddp.join_torchrun_group()
        overrides.update(torchrun)
    if args.recommend:
        print_recommendations(args, overrides)
        return []
    if args.add_items:
        print_added_items(args, overrides)
        return []
    files = [f for f in args.config_files.split(",") if f]
    labels = [m.strip() for m in args.model.split(",") if m.strip()]
    specs = [resolve_model(label) for label in labels]  # fail fast on a typo before hours of training
    if args.stage == "unicode":
        for spec in specs:
            if not spec.needs_stage1:
                raise ValueError(f"--stage=unicode needs a model with a Stage I (PRORec), not {spec.label}")
        for spec in specs:
            print(f"unicode dataset written to {stage1_folder(spec, args.dataset, files, overrides)}")
        return []
    if args.resume and (args.nproc > 1 or (len(labels) > 1 and args.resume != LATEST)):
        raise ValueError("--resume=PATH continues one model's run in one process: give one --model and --nproc=1")
    results = []
    for label in labels:
        try:
            if args.nproc > 1:
                results.append(run_distributed(label, args.dataset, files, overrides, args.nproc))
            else:
                results.append(run(label, args.dataset, files, overrides, resume=args.resume))
        except RunInterrupted as stop:
            stop.label = label
            raise
    if results and ddp.global_rank() == 0:  # one table, written by one process
        table = results_table(results)
        out = Path(args.results_file or PROJECT_ROOT / "results" / f"{args.dataset}.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(["python run_recbole_prorec.py", *(argv if argv is not None else sys.argv[1:])])
        with open(out, "a", encoding="utf-8") as f:  # append: earlier results are never lost
            f.write(f"\n## {args.dataset}, {datetime.now():%Y-%m-%d %H:%M}\n\n`{command}`\n\n{table}\n")
        print(table)
        print(f"results written to {out}")
        for r in results:
            where = [f"checkpoint {r.checkpoint or '(not saved)'}", f"log {r.log_file or '(none)'}"]
            where += [f"unicode dataset {r.data_folder}"] if r.data_folder else []
            print(f"{r.label}: " + ", ".join(where))
    return results
