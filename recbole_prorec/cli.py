"""The command line, ``python run_recbole_prorec.py``: train and compare models (``runner``),
recommend from a checkpoint (``recommend``), add new items to one (``cold_start``).

Errors in what the user gave end with one ``error:`` line and exit code 2 (``--debug`` shows the
traceback); a signal that stops training prints the command that resumes it.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

from recbole_prorec import PROJECT_ROOT
from recbole_prorec import distributed as ddp
from recbole_prorec.registry import resolve_model
from recbole_prorec.runner import (LATEST, RunResult, curve_table, results_table, run, run_distributed,
                                   stage1_folder)
from recbole_prorec.trainer import RunInterrupted

# what our checks raise on bad files and settings, and a diverged loss: a message, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


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
    parser.add_argument("--item_weights", choices=["ridge", "mean"], default="ridge",
                        help="with --add_items: each new item's own token and bias predicted from its integrated "
                        "embedding (ridge) or the warm items' mean (measured alike on Beauty: docs/RESULTS.md)")
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
    result = add_items(overrides["load_checkpoint"], args.add_items, args.placement, item_weights=args.item_weights)
    print(f"\n{len(result.items)} new items placed ({args.placement}, {args.item_weights} item weights; "
          f"text -> integrated map R^2 {result.map_r2:.3f})")
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
            results = _main(argv)
            ddp.leave_group()  # torchrun's workers, whatever they ran (a no-op outside a group)
            return results
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
            for r in results:
                if r.curve:
                    f.write(f"\n{r.label}, every validated epoch (seed {r.seed}):\n\n{curve_table(r.curve)}\n")
        print(table)
        print(f"results written to {out}")
        for r in results:
            where = [f"checkpoint {r.checkpoint or '(not saved)'}", f"log {r.log_file or '(none)'}"]
            where += [f"unicode dataset {r.data_folder}"] if r.data_folder else []
            print(f"{r.label}: " + ", ".join(where))
    return results
