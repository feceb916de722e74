"""Per-epoch validation curves: PRORec against SASRec-CE (or any models), epoch by epoch and in seconds.

Every model trains for exactly ``--epochs`` epochs (no early stop), validated after each one with
the full-ranking protocol of ``properties/overall.yaml``; the test split is never read, so these
curves are what defaults are tuned on. Writes ``--out`` (Markdown: per model and seed, each epoch's
training losses per part, validation Recall/NDCG@10 and @20, PRORec's beam diagnostics and seconds), the
same name with ``.png`` (validation NDCG@10 against epoch and against seconds) and ``.json`` (the
records). ``--append`` adds to the records of an earlier ``.json``, so the "before" and "after"
curves of separate invocations share one table and one plot; ``--tag`` names a configuration.

``--pseudo-test`` trains on a nested leave-one-out (``drop_last_interactions: 1``: every user's
real test item is dropped, the real validation item becomes the test target) and evaluates that
pseudo-test split after every epoch too. It shows how validation scores carry over to a split
that lies two steps past the training data, as the real test split does, and which epoch each
selection rule (best validation NDCG@10, Recall@10, Recall@20) would pick, without reading the
real test split.

    python benchmarks/curves.py --dataset ml-100k --models PRORec,SASRec-CE --epochs 3 --seeds 2020,2021 --out docs/curves/ml-100k.md
    python benchmarks/curves.py --dataset Amazon_Beauty --models PRORec --epochs 10 --tag before \\
        --set last_code_token=shared --out docs/curves/Amazon_Beauty.md --append
    python benchmarks/curves.py --dataset Amazon_Beauty --models PRORec,SASRec-CE --epochs 30 --pseudo-test \\
        --out docs/curves/Amazon_Beauty_nested.md
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
from recbole_prorec.runner import CURVE_METRICS, curve_table  # noqa: E402

METRICS = ("recall@10", "ndcg@10")
RULES = ("ndcg@10", "recall@10", "recall@20")  # validation metrics an epoch can be selected by


def train_curves(labels: Sequence[str], seeds: Sequence[int], dataset: str, files: Sequence[str],
                 overrides: dict, tag: str, command: str, records: list[dict], save: Path | None,
                 pseudo_test: bool = False) -> list[dict]:
    """Add one record per model, seed and validated epoch to ``records``, each naming the command
    that made it; ``save`` (a .json) is rewritten after every run, so a crash loses no finished run.
    ``pseudo_test``: the (nested) test split's metrics too, after every epoch."""
    from recbole_prorec.runner import run

    for label in labels:
        name = f"{label} ({tag})" if tag else label
        for seed in seeds:
            result = run(label, dataset, files, {**overrides, "seed": seed}, evaluate_test=False,
                         test_every_epoch=pseudo_test)
            for entry in result.curve:
                records.append({"label": name, "seed": seed, "command": command, **entry})
                print(f"  {name} seed {seed} epoch {entry['epoch']}: ndcg@10 {entry.get('ndcg@10', float('nan')):.4f}, "
                      f"recall@10 {entry.get('recall@10', float('nan')):.4f}, {entry['elapsed_s']:.0f}s", flush=True)
            if save:
                with atomic_file(save) as f:  # a crash while writing keeps the earlier runs
                    f.write(json.dumps(records, indent=1))
    return records


def selection_table(records: Sequence[dict]) -> str:
    """Per model and seed, the epoch each rule selects and the pseudo-test metrics there: the best
    validation score by each metric of ``RULES`` (ties: the earlier epoch, as RecBole keeps the
    first best), and, as the ceiling no rule can beat, the best pseudo-test NDCG@10 and Recall@10."""
    rows = []
    for label, seed in dict.fromkeys((r["label"], r["seed"]) for r in records if "test_ndcg@10" in r):
        run = [r for r in records if r["label"] == label and r["seed"] == seed and "test_ndcg@10" in r]
        picks = [(f"best valid {m}", max(run, key=lambda r, m=m: r.get(m, float("-inf")))) for m in RULES]
        picks += [(f"ceiling: best pseudo-test {m}", max(run, key=lambda r, m=m: r[f"test_{m}"]))
                  for m in ("ndcg@10", "recall@10")]
        rows += [[label, seed, rule, r["epoch"], f"{r['elapsed_s']:.0f}", *[f"{r[m]:.4f}" for m in METRICS],
                  *[f"{r[f'test_{m}']:.4f}" for m in CURVE_METRICS]] for rule, r in picks]
    header = ["model", "seed", "selected by", "epoch", "elapsed s", *[f"valid {m}" for m in METRICS],
              *[f"pseudo-test {m}" for m in CURVE_METRICS]]
    return markdown_table(header, rows) if rows else ""


def plot(records: Sequence[dict], path: Path, dataset: str) -> None:
    """Validation NDCG@10 against epoch (left) and against seconds of training + validation (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (label, seed) in dict.fromkeys((r["label"], r["seed"]) for r in records):
        rows = [r for r in records if r["label"] == label and r["seed"] == seed]
        ndcg = [r.get("ndcg@10", float("nan")) for r in rows]
        line, = axes[0].plot([r["epoch"] + 1 for r in rows], ndcg, marker="o", label=f"{label}, seed {seed}")
        axes[1].plot([r["elapsed_s"] for r in rows], ndcg, marker="o")
        if any("test_ndcg@10" in r for r in rows):  # same colour, dashed: the nested split's test
            test = [r.get("test_ndcg@10", float("nan")) for r in rows]
            axes[0].plot([r["epoch"] + 1 for r in rows], test, ls="--", color=line.get_color(),
                         label=f"{label}, seed {seed}, pseudo-test")
            axes[1].plot([r["elapsed_s"] for r in rows], test, ls="--", color=line.get_color())
    axes[0].set(xlabel="epochs trained", ylabel="NDCG@10 (solid: validation)", title=dataset)
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
    parser.add_argument("--pseudo-test", action="store_true",
                        help="nested leave-one-out (drop_last_interactions=1), its test split evaluated every epoch")
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
    if args.pseudo_test:
        overrides["drop_last_interactions"] = max(1, overrides.get("drop_last_interactions") or 0)
    out = Path(args.out) if args.out else None
    save = out.with_suffix(".json") if out else None
    records = json.loads(save.read_text()) if args.append and save.is_file() else []
    try:
        train_curves(labels, seeds, args.dataset, files, overrides, args.tag, "python " + shlex.join(command),
                     records, save, args.pseudo_test)
    finally:
        if tmp is not None:
            tmp.cleanup()
    nested = ("; the runs with pseudo-test metrics trained on a nested leave-one-out (each user's real test "
              "item dropped): their validation target is the item before the real validation item, their "
              "pseudo-test target the real validation item, and the real test split is never read")
    nested = nested if any("test_ndcg@10" in r for r in records) else ""
    report.add(
        f"Dataset {args.dataset}{' (quick subset)' if args.quick else ''}; validation after every epoch (test split "
        f"not read){nested}; train s: seconds in training epochs so far; elapsed s: training and validation so far. "
        "Loss columns are that epoch's mean training losses per batch (PRORec: generation loss per code level, IKD). "
        "first_code_in_beam / item_in_beam: share of validation users whose target's first code / the "
        "target itself is among the final beam's items.\n\n" + curve_table(records)
    )
    selection = selection_table(records)
    if selection:
        report.add("Which epoch each rule selects, and its pseudo-test metrics (nested runs; best over the epochs run)."
                   "\n\n" + selection)
    commands = dict.fromkeys(f"- `{r['command']}`" for r in records if "command" in r)
    report.add("Commands behind these rows:\n\n" + "\n".join(commands))
    report.save(args.out)
    if out:
        plot(records, out.with_suffix(".png"), args.dataset)
        print(f"curves written to {out.with_suffix('.png')} and {save}")
    return records


if __name__ == "__main__":
    main()
