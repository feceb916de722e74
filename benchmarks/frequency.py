"""Where trained models win and lose: Recall@20 by how often the target item occurs in training,
and whether their overall differences are larger than chance (paired, user by user).

For each ``--run LABEL=CHECKPOINT`` (a model or variant and a checkpoint the runner saved for it)
the script rebuilds the run from the settings the checkpoint records (PRORec: on the Stage-I artifact
it was trained on, so checkpoints of different codes can be set side by side; ``--set`` changes
ranking settings on top), loads the weights and ranks every user's target of ``--split``
with the full-ranking protocol. Users are grouped by how often their target is a training target
(RecBole's training examples, one per history prefix); per group it reports Recall@20 of each
run and, for models of codes, the share of users whose target's first code is among the top 20's.
That separates items the model cannot rank (rare ones) from clusters it cannot find. With two
runs or more, every later run is set against the first on the same users: Recall and NDCG at
10 and 20, their difference, its 95 % interval and p-value (paired t-test), so that a row's
lead or lag can be told from the noise of one split. ``valid`` is the default; ``--split test``
reads the test split, for explaining a reported row only. ``--rerank KEY=VALUE`` ranks the first
checkpoint once more with a ranking setting changed (``item_id_shrinkage``, ``item_temperature``,
``beam_size``; other keys are refused) and sets that ranking against the first: what a ranking-only
change does to one trained model, user by user, on the dataset loaded once. A checkpoint of a
nested run (``drop_last_interactions``, as ``curves.py --pseudo-test`` saves at its
validation-selected epoch) is rebuilt on its nested split, so ``--split test`` there ranks the
pseudo-test split and sets two such runs against each other without reading the real test split.

    python benchmarks/frequency.py --dataset Amazon_Beauty --run PRORec=saved/PRORec-X.pth \\
        --run SASRec-CE=saved/SASRec-Y.pth --split valid --out docs/frequency_Amazon_Beauty.md
    python benchmarks/frequency.py --dataset Amazon_Beauty --run PRORec=saved/PRORec-X.pth \\
        --set item_id_shrinkage=0 --rerank item_id_shrinkage=3
    python benchmarks/frequency.py --quick
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Report, add_run_arguments, base_parser, markdown_table, parse_settings,  # noqa: E402
                    run_overrides, setup)

BUCKETS = (0, 5, 10, 20, 50)  # lower edges of the target-frequency groups
TOP = 20
CUTOFFS = (10, 20)  # of the paired comparison
PAIRED_HEADER = ["runs", "metric", "first run", "later run", "difference", "95 % interval", "p"]  # of paired_rows


def ranks(model, loader, device) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per user: target item, its 0-based rank among all items, and whether its first code is
    among the top ``TOP`` items' first codes (None for a model without codes)."""
    targets, positions, first = [], [], []
    codes = getattr(model, "codes", None)
    with torch.no_grad():
        for interaction, history, _, _ in loader:
            interaction = interaction.to(device)
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            if history is not None:  # RecBole masks the history of non-sequential models only
                scores[history[0], history[1]] = float("-inf")
            target = interaction[model.ITEM_ID]
            own = scores.gather(1, target[:, None])
            rank = (scores > own).sum(1).masked_fill(~torch.isfinite(own[:, 0]), scores.shape[1])
            targets.append(target.cpu())
            positions.append(rank.cpu())
            if codes is not None:
                top = scores.topk(TOP, dim=1).indices
                first.append((codes[top, 0] == codes[target, 0][:, None]).any(1).cpu())
    return torch.cat(targets).numpy(), torch.cat(positions).numpy(), torch.cat(first).numpy() if first else None


def evaluate_run(label: str, checkpoint: str, dataset: str, overrides: dict, split: str, device,
                 rerank: dict | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(targets, ranks, first-code hits, training frequency of every item) of one trained run, and
    with ``rerank`` a second such tuple: the same weights ranked with those ranking keys changed.

    The run is rebuilt from the settings its checkpoint records (PRORec: its own Stage-I artifact,
    so checkpoints of other codes or quantizer settings are ranked on their own codes), with
    ``overrides`` (``--set``: ranking settings) on top. The dataset is built once for both
    rankings: ``rerank`` holds ranking keys only, which change the model, not the data."""
    from recbole_prorec.quick_start import checkpoint_config, load_checkpoint_data, load_model

    data = load_checkpoint_data(checkpoint, overrides)
    config = data.config
    if (config["model_label"], config["dataset"]) != (label, dataset):
        raise ValueError(f"{checkpoint} holds {config['model_label']} on {config['dataset']}, not {label} on {dataset}")
    items = data.train._dataset.inter_feat[config["ITEM_ID_FIELD"]].numpy()
    frequency = np.bincount(items, minlength=data.dataset.item_num)
    configs = [config] + ([checkpoint_config(checkpoint, extra={**overrides, **rerank})[1]] if rerank else [])
    results = []
    for ranking in configs:
        model = load_model(checkpoint, replace(data, config=ranking))
        model.eval()
        results.append((*ranks(model, data.valid if split == "valid" else data.test, device), frequency))
    return results


def ranking_settings(label: str, items: Sequence[str], parser) -> dict:
    """``--rerank``'s settings, refused unless each is one of ``label``'s ranking-only keys: any
    other key would change the data or the weights, which a second ranking of one checkpoint keeps."""
    from recbole_prorec.registry import resolve_model

    settings = parse_settings(items, parser, "--rerank")
    allowed = getattr(resolve_model(label).model_class, "RANKING_KEYS", ())
    wrong = sorted(set(settings) - set(allowed))
    if wrong:
        parser.error(f"--rerank {', '.join(wrong)}: {label}'s ranking-only keys are {', '.join(allowed) or 'none'}; "
                     "compare two checkpoints with --run for anything else")
    return settings


def bucket_rows(results: dict[str, tuple]) -> list[list]:
    """One row per non-empty target-frequency group: users, then Recall@20 (and first-code share) per run."""
    edges = [*BUCKETS, np.inf]
    first_label = next(iter(results))
    targets0, _, _, frequency0 = results[first_label]
    rows = []
    for lo, hi in zip(edges, edges[1:]):
        group = (frequency0[targets0] >= lo) & (frequency0[targets0] < hi)
        if not group.any():
            continue
        name = f"{lo}-{int(hi) - 1}" if np.isfinite(hi) else f">= {lo}"
        row = [name, int(group.sum())]
        for targets, rank, first, _ in results.values():
            row.append(f"{(rank[group] < TOP).mean():.3f}")
            row.append("" if first is None else f"{first[group].mean():.3f}")
        rows.append(row)
    return rows


def user_metrics(rank: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's Recall@k and NDCG@k from the 0-based rank of its one target (leave-one-out:
    RecBole's figures are their means)."""
    metrics = {}
    for k in CUTOFFS:
        metrics[f"Recall@{k}"] = (rank < k).astype(float)
        metrics[f"NDCG@{k}"] = np.where(rank < k, 1 / np.log2(rank + 2.0), 0.0)
    return metrics


def paired_rows(results: dict[str, tuple]) -> list[list]:
    """Every later run against the first, metric by metric, on the same users: both means, the
    difference, its 95 % interval and the p-value of a paired t-test (scipy's ``ttest_rel``).
    Pairing removes what the users share (a hard target is hard for both models), so a
    difference far smaller than either metric's own spread can still be told from chance."""
    from scipy.stats import ttest_rel

    (first_label, (targets0, rank0, _, _)), *others = results.items()
    base = user_metrics(rank0)
    rows = []
    for label, (targets, rank, _, _) in others:
        if not np.array_equal(targets, targets0):
            raise ValueError(f"runs {first_label!r} and {label!r} rank different users or targets: "
                             "compare runs of the same dataset, split and settings")
        for name, values in user_metrics(rank).items():
            diff = values - base[name]
            if not diff.any():  # identical rankings: no spread to test against
                low = high = 0.0
                p = 1.0
            else:
                test = ttest_rel(values, base[name])
                low, high = test.confidence_interval(0.95)
                p = float(test.pvalue)
            rows.append([f"{label} - {first_label}", name, f"{base[name].mean():.4f}", f"{values.mean():.4f}",
                         f"{diff.mean():+.4f}", f"[{low:+.4f}, {high:+.4f}]", f"{p:.3g}"])
    return rows


def run_names(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """A name per ``(label, checkpoint)`` for the tables: the label, or where two runs share it
    (two checkpoints of one model, before and after a change) the label and checkpoint's stem."""
    labels = [label for label, _ in pairs]
    return [label if labels.count(label) == 1 else f"{label} ({Path(path).stem})" for label, path in pairs]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=CHECKPOINT",
                        help="a model or variant and its checkpoint (repeatable); quick mode trains its own")
    parser.add_argument("--split", choices=["valid", "test"], default="valid")
    parser.add_argument("--rerank", action="append", default=[], metavar="KEY=VALUE",
                        help="rank the first run's checkpoint again with this setting (repeatable; ranking keys "
                             "such as item_id_shrinkage or item_temperature), set against it user by user")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device = setup(args)
    overrides, tmp = run_overrides(args, parser, device)
    files = [f for f in args.config_files.split(",") if f]
    if files and args.run:
        parser.error("each --run is rebuilt from its checkpoint's own settings: change ranking settings with --set")
    pairs = [r.partition("=")[::2] for r in args.run]
    if args.quick and not pairs:  # one epoch of each, checkpoints in the temporary folder
        from recbole_prorec.runner import run

        pairs = [(label, run(label, args.dataset, files, overrides, evaluate_test=False).checkpoint)
                 for label in ("PRORec", "SASRec-CE")]
    if not pairs or any(not label or not path for label, path in pairs):
        parser.error("give at least one --run LABEL=CHECKPOINT")
    names = run_names(pairs)
    rerank = ranking_settings(pairs[0][0], args.rerank, parser) if args.rerank else None
    try:
        evaluated = [evaluate_run(label, path, args.dataset, overrides, args.split, device, rerank if i == 0 else None)
                     for i, (label, path) in enumerate(pairs)]
        results = {name: rankings[0] for name, rankings in zip(names, evaluated)}
        if rerank:  # the first checkpoint once more, ranked with the settings changed
            results[f"{names[0]} with {', '.join(args.rerank)}"] = evaluated[0][1]
    finally:
        if tmp:
            tmp.cleanup()
    report = Report(f"Recall@{TOP} by target frequency ({args.dataset}, {args.split})",
                    ["benchmarks/frequency.py", *(sys.argv[1:] if argv is None else argv)])
    header = ["times the target is a training target", "users"]
    for name in results:
        header += [f"{name} Recall@{TOP}", f"{name} first code in top {TOP}"]
    checkpoints = ", ".join(f"{name} = `{path}`" for name, (_, path) in zip(names, pairs))
    report.add(f"Checkpoints: {checkpoints}. First code: the share of users whose target's first code is among "
               f"the top {TOP} items' (models of codes only).\n\n"
               + markdown_table(header, bucket_rows(results)))
    if len(results) > 1:
        users = len(next(iter(results.values()))[0])
        report.add(f"Paired differences on the same {users:,} users (difference: later run minus first; "
                   "95 % interval and p of a paired t-test):\n\n"
                   + markdown_table(PAIRED_HEADER, paired_rows(results)))
    report.save(args.out)
    return {label: {name.lower(): float(values.mean()) for name, values in user_metrics(r[1]).items()}
            for label, r in results.items()}


if __name__ == "__main__":
    main()
