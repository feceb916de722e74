"""Per-epoch validation curves: PRORec against SASRec-CE (or any models), epoch by epoch and in seconds.

Every model trains for exactly ``--epochs`` epochs (no early stop), validated after each one with
the full-ranking protocol of ``properties/overall.yaml``; the test split is never read, so these
curves are what defaults are tuned on. Writes ``--out`` (Markdown: per model and seed, each epoch's
training losses per part, validation Recall/NDCG@10, PRORec's beam diagnostics and seconds), the
same name with ``.png`` (validation NDCG@10 against epoch and against seconds) and ``.json`` (the
records). ``--append`` adds to the records of an earlier ``.json``, so the "before" and "after"
curves of separate invocations share one table and one plot; ``--tag`` names a configuration.

    python benchmarks/curves.py --dataset ml-100k --models PRORec,SASRec-CE --epochs 3 --seeds 2020,2021 --out docs/curves/ml-100k.md
    python benchmarks/curves.py --dataset Amazon_Beauty --models PRORec --epochs 10 --tag before \\
        --set last_code_token=shared --out docs/curves/Amazon_Beauty.md --append
    python benchmarks/curves.py --quick
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, add_run_arguments, base_parser, markdown_table, run_overrides, setup  # noqa: E402
from recbole_prorec.files import atomic_file  # noqa: E402

METRICS = ("recall@10", "ndcg@10")
DIAGNOSTICS = ("first_code_in_beam", "item_in_beam")
SKIP = {"epoch", "train_s", "elapsed_s", "label", "seed", "command", *DIAGNOSTICS}


def train_curves(labels: Sequence[str], seeds: Sequence[int], dataset: str, files: Sequence[str],
                 overrides: dict, tag: str, command: str, records: list[dict], save: Path | None) -> list[dict]:
    """Add one record per model, seed and validated epoch to ``records``, each naming the command
    that made it; ``save`` (a .json) is rewritten after every run, so a crash loses no finished run."""
    from recbole_prorec.runner import run

    for label in labels:
        name = f"{label} ({tag})" if tag else label
        for seed in seeds:
            result = run(label, dataset, files, {**overrides, "seed": seed}, evaluate_test=False)
            for entry in result.curve:
                records.append({"label": name, "seed": seed, "command": command, **entry})
                print(f"  {name} seed {seed} epoch {entry['epoch']}: ndcg@10 {entry.get('ndcg@10', float('nan')):.4f}, "
                      f"recall@10 {entry.get('recall@10', float('nan')):.4f}, {entry['elapsed_s']:.0f}s", flush=True)
            if save:
                with atomic_file(save) as f:  # a crash while writing keeps the earlier runs
                    f.write(json.dumps(records, indent=1))
    return records


def curve_table(records: Sequence[dict]) -> str:
    """Every record as a row; loss parts are the union over models (blank where a model has none)."""
    losses = list(dict.fromkeys(k for r in records for k in r if k not in SKIP and "@" not in k))
    header = ["model", "seed", "epoch", "train s", "elapsed s", *[f"valid {m}" for m in METRICS], *losses, *DIAGNOSTICS]
    rows = []
    for r in records:
        cell = lambda key, digits=4: f"{r[key]:.{digits}f}" if key in r else ""  # noqa: E731
        rows.append([r["label"], r["seed"], r["epoch"], cell("train_s", 1), cell("elapsed_s", 1),
                     *[cell(m) for m in METRICS], *[cell(k) for k in losses], *[cell(k, 3) for k in DIAGNOSTICS]])
    return markdown_table(header, rows)


def plot(records: Sequence[dict], path: Path, dataset: str) -> None:
    """Validation NDCG@10 against epoch (left) and against seconds of training + validation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (label, seed) in dict.fromkeys((r["label"], r["seed"]) for r in records):
        rows = [r for r in records if r["label"] == label and r["seed"] == seed]
        ndcg = [r.get("ndcg@10", float("nan")) for r in rows]
        axes[0].plot([r["epoch"] + 1 for r in rows], ndcg, marker="o", label=f"{label}, seed {seed}")
        axes[1].plot([r["elapsed_s"] for r in rows], ndcg, marker="o")
    axes[0].set(xlabel="epochs trained", ylabel="validation NDCG@10", title=dataset)
    axes[1].set(xlabel="seconds (training + validation)", title="same runs against time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default="PRORec,SASRec-CE", help="comma-separated models/variants")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per model and seed (default 10; quick 2)")
    parser.add_argument("--seeds", default="2020", help="comma-separated seeds")
    parser.add_argument("--tag", default="", help="appended to the model names, e.g. 'before'")
    parser.add_argument("--append", action="store_true", help="add to the records of an existing --out .json")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.append and not args.out:
        parser.error("--append needs --out")
    device = setup(args)
    command = ["benchmarks/curves.py", *(argv if argv is not None else sys.argv[1:])]
    report = Report("Validation curves", command)

    from recbole_prorec.registry import resolve_model

    labels = [m.strip() for m in args.models.split(",") if m.strip()]
    for label in labels:  # fail on a typo before hours of training
        resolve_model(label)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    files = [f for f in args.config_files.split(",") if f]
    overrides, tmp = run_overrides(args, parser, device)
    epochs = args.epochs or (2 if args.quick else 10)
    # exactly `epochs` validated epochs: no budget, no early stop
    overrides.update(epochs=epochs, eval_step=1, stopping_step=epochs + 1, train_time_budget=0.0)
    out = Path(args.out) if args.out else None
    save = out.with_suffix(".json") if out else None
    records = json.loads(save.read_text()) if args.append and save.is_file() else []
    try:
        train_curves(labels, seeds, args.dataset, files, overrides, args.tag, "python " + shlex.join(command),
                     records, save)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report.add(
        f"Dataset {args.dataset}{' (quick subset)' if args.quick else ''}; validation after every epoch (test split "
        "not read); train s: seconds in training epochs so far; elapsed s: training and validation so far. "
        "Loss columns are that epoch's mean training losses per batch (PRORec: generation loss per code level, IKD). "
        "first_code_in_beam / item_in_beam: share of validation users whose target's first code / the "
        "target itself is among the final beam's items.\n\n" + curve_table(records)
    )
    commands = dict.fromkeys(f"- `{r['command']}`" for r in records if "command" in r)
    report.add("Commands behind these rows:\n\n" + "\n".join(commands))
    report.save(args.out)
    if out:
        plot(records, out.with_suffix(".png"), args.dataset)
        print(f"curves written to {out.with_suffix('.png')} and {save}")
    return records


if __name__ == "__main__":
    main()
