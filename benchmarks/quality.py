"""Quality at equal budget: PRORec vs RecBole baselines on one dataset, one protocol, several seeds.

Every model runs through ``recbole_prorec.runner.run`` (the same leave-one-out full-ranking
protocol of ``properties/overall.yaml``) with the same seeds and either the same wall-clock
budget (``--budget`` -> ``train_time_budget``: no epoch starts after it; it counts training and
per-epoch validation, not PRORec's Stage I or the final test) or the same epoch cap
(``--epochs``). The Markdown table gives Recall/NDCG@10/20 as mean ± std over seeds, best epoch,
training seconds, wall seconds per run (everything, Stage I included) and each model's NDCG@10
relative to SASRec-CE's (per-seed ratio).

    python benchmarks/quality.py --dataset Amazon_Beauty --budget 3600 --seeds 2020,2021
    python benchmarks/quality.py --models SASRec-CE,PRORec --epochs 50 --set hidden_size=64
    python benchmarks/quality.py --quick        # ml-100k subset, SASRec-CE and PRORec, 1 epoch, tiny
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, add_run_arguments, base_parser, fmt, markdown_table, run_overrides, setup  # noqa: E402

DEFAULT_MODELS = "SASRec-CE,SASRec-BCE,GRU4Rec,BERT4Rec,TIGER,PRORec"
REFERENCE = "SASRec-CE"
# overrides that do not change results, left out of the table's caption
HIDDEN_KEYS = ("show_progress", "state", "gpu_id", "unicode_dir", "checkpoint_dir", "semantic_cache_dir")
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(results: dict[str, list]) -> tuple[list[str], list[list[str]], list[dict]]:
    """Table header, rows and plain per-model aggregates from {label: [(seed, RunResult, wall)]}."""
    reference = {seed: r.test.get("ndcg@10", float("nan")) for seed, r, _ in results.get(REFERENCE, [])}
    header = ["model", "Recall@10", "Recall@20", "NDCG@10", "NDCG@20", "best epoch", "epochs run",
              "train s", "wall s", f"NDCG@10 / {REFERENCE}"]
    rows, plain = [], []
    for label, runs in results.items():
        metric = {m: [r.test.get(m, float("nan")) for _, r, _ in runs] for m in METRICS}
        ratios = [r.test.get("ndcg@10", float("nan")) / reference[seed]
                  for seed, r, _ in runs if reference.get(seed)]
        row = [label] + [mean_std(metric[m]) for m in METRICS]
        row += [",".join(str(r.best_epoch) for _, r, _ in runs), ",".join(str(r.epochs_run) for _, r, _ in runs),
                mean_std([r.train_time for _, r, _ in runs], 1), mean_std([w for _, _, w in runs], 1),
                mean_std(ratios, 3) if ratios else "n/a"]
        rows.append(row)
        plain.append({"model": label, **{m: statistics.mean(v) for m, v in metric.items()},
                      "train_s": statistics.mean(r.train_time for _, r, _ in runs),
                      "wall_s": statistics.mean(w for _, _, w in runs),
                      "ndcg10_ratio": statistics.mean(ratios) if ratios else float("nan"), "runs": len(runs)})
    return header, rows, plain


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default=None, help=f"comma-separated models/variants (default {DEFAULT_MODELS})")
    parser.add_argument("--budget", type=float, default=None,
                        help="training seconds per model and seed (train_time_budget)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap per model and seed")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 2020,2021; quick 2020)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device = setup(args)
    report = Report("Quality at equal budget", ["benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])

    from recbole_prorec.registry import resolve_model
    from recbole_prorec.runner import run

    labels = [m.strip() for m in (args.models or (f"{REFERENCE},PRORec" if args.quick else DEFAULT_MODELS)).split(",")
              if m.strip()]
    for label in labels:  # fail on a typo before hours of training
        resolve_model(label)
    seeds = [int(s) for s in (args.seeds or ("2020" if args.quick else "2020,2021")).split(",") if s.strip()]
    files = [f for f in args.config_files.split(",") if f]
    overrides, tmp = run_overrides(args, parser, device)
    if args.budget is not None:
        overrides["train_time_budget"] = args.budget
    if args.epochs is not None:
        overrides["epochs"] = args.epochs

    results: dict[str, list] = {}
    try:
        for label in labels:
            for seed in seeds:
                start = time.perf_counter()
                result = run(label, args.dataset, files, {**overrides, "seed": seed})
                wall = time.perf_counter() - start
                results.setdefault(label, []).append((seed, result, wall))
                print(f"  {label} seed {seed}: " + ", ".join(f"{m}={result.test.get(m, float('nan')):.4f}"
                                                           for m in METRICS)
                      + f", best epoch {result.best_epoch}, train {result.train_time:.1f}s, wall {wall:.1f}s",
                      flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    header, rows, plain = summarise(results)
    budget = []
    if "train_time_budget" in overrides and overrides["train_time_budget"]:
        budget.append(f"train_time_budget {fmt(float(overrides['train_time_budget']), 0)} s")
    if "epochs" in overrides:
        budget.append(f"at most {overrides['epochs']} epochs")
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in HIDDEN_KEYS)
    report.add(
        f"Dataset {args.dataset}{' (quick subset: users with at most 40 ratings)' if args.quick else ''}; "
        f"seeds {','.join(map(str, seeds))}; "
        f"budget per model and seed: {' and '.join(budget) or 'none (early stopping)'}; "
        f"protocol properties/overall.yaml (leave-one-out, full ranking); overrides: {settings or 'none'}. "
        "Metrics are test scores at the best validation epoch, mean ± std over seeds; train s excludes evaluation "
        "and Stage I; wall s is the whole run.\n\n" + markdown_table(header, rows)
    )
    report.save(args.out)
    return {"dataset": args.dataset, "seeds": seeds, "models": plain}


if __name__ == "__main__":
    main()
