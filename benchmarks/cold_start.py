"""New items from text alone, measured: hold items out of training entirely, add them afterwards.

A share (``--holdout``, 5 %) of the dataset's items is drawn at random and removed: their rows of
the ``.item`` file and every interaction with them. Both stages train on what is left (RecBole's
filters of the dataset YAML apply, so users left with too few interactions drop out). Then the
held-out items are added to the trained model from their text with ``cold_start.add_items``: placed
in Stage I's k-means tree with per-item weights predicted from their integrated embeddings (the
method), with the warm items' mean weights instead, and in random leaf clusters (the baselines);
each is scored:

* **cold-target users**: users whose last interaction was a held-out item; their history is their
  earlier interactions without held-out items. Recall@10/20 and NDCG@20 of that item in the
  top 20 of ``recommend`` (the beam search, nothing excluded);
* **exposure**: over every user of the trained data (their whole history), the share of top-20
  lists holding at least one new item, new items per list, and the share of new items recommended
  to anyone. A new item's share of the catalogue is the scale: 5 % of the items.

    python benchmarks/cold_start.py --dataset Amazon_Beauty --budget 900 --out docs/cold_start_Amazon_Beauty.md
    python benchmarks/cold_start.py --quick
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, add_run_arguments, base_parser, markdown_table, run_overrides, setup  # noqa: E402

K = 20


def hold_out(source: Path, name: str, config, share: float, seed: int, target: Path) -> tuple[Path, dict, set[str]]:
    """Write ``target/<name>/`` without a random ``share`` of the items and ``target/new.item`` with
    their rows; returns that item file, each cold-target user's (history, held-out item) and the
    held-out items."""
    user, item, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    inter = pd.read_csv(source / f"{name}.inter", sep="\t", dtype=str, keep_default_na=False)
    items = pd.read_csv(source / f"{name}.item", sep="\t", dtype=str, keep_default_na=False)
    field = {c.split(":", 1)[0]: c for c in inter.columns}
    item_col, user_col = field[item], field[user]
    row_id = items[{c.split(":", 1)[0]: c for c in items.columns}[item]]
    pool = np.array(sorted(set(inter[item_col]) & set(row_id)))
    rng = np.random.default_rng(seed)
    held = set(pool[rng.permutation(len(pool))[: max(1, round(share * len(pool)))]])
    order = inter.assign(_t=inter[field[time]].astype(float)).sort_values([user_col, "_t"], kind="stable")
    cold_users = {}
    for u, rows in order.groupby(user_col, sort=False):
        seq = rows[item_col].tolist()
        history = [i for i in seq[:-1] if i not in held]
        if seq[-1] in held and history:
            cold_users[u] = (history, seq[-1])
    folder = target / name
    folder.mkdir(parents=True, exist_ok=True)
    inter[~inter[item_col].isin(held)].to_csv(folder / f"{name}.inter", sep="\t", index=False)
    is_held = row_id.isin(held)
    items[~is_held].to_csv(folder / f"{name}.item", sep="\t", index=False)
    items[is_held].to_csv(target / "new.item", sep="\t", index=False)
    return target / "new.item", cold_users, held


def scores(checkpoint: Path, cold_users: dict, new_items: set[str]) -> dict:
    """Cold-target recall/NDCG and the new items' exposure, from ``recommend``'s top K."""
    from recbole_prorec import load_data_and_model
    from recbole_prorec.recommend import recommend_loaded

    config, model, dataset, *_ = load_data_and_model(checkpoint)
    known = dataset.field2token_id[dataset.iid_field]
    # RecBole's filters may have dropped some history items along with the held-out ones
    users = {u: ([i for i in h if i in known], t) for u, (h, t) in cold_users.items()}
    users = {u: (h, t) for u, (h, t) in users.items() if h}
    recs = recommend_loaded(config, model, dataset, history=[h for h, _ in users.values()], k=K)
    ranks = [rec.items.index(t) + 1 if t in rec.items else None for rec, (_, t) in zip(recs, users.values())]
    everyone = recommend_loaded(config, model, dataset, user_ids=list(dataset.field2id_token[dataset.uid_field][1:]), k=K)
    per_list = [len(new_items & set(rec.items)) for rec in everyone]
    shown = set().union(*(new_items & set(rec.items) for rec in everyone))
    return {
        "cold-target users": len(users),
        "Recall@10": np.mean([r is not None and r <= 10 for r in ranks]),
        "Recall@20": np.mean([r is not None for r in ranks]),
        "NDCG@20": np.mean([1 / math.log2(r + 1) if r else 0.0 for r in ranks]),
        "lists with a new item": np.mean([n > 0 for n in per_list]),
        "new items per list": np.mean(per_list),
        "new items shown": len(shown) / len(new_items),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    from recbole_prorec.cold_start import add_items
    from recbole_prorec.config import ProjectConfig
    from recbole_prorec.registry import resolve_model
    from recbole_prorec.runner import run

    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--holdout", type=float, default=0.05, help="share of the items held out of training")
    parser.add_argument("--budget", type=float, default=900, help="Stage II training budget in seconds")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work", default="saved/cold_start", help="folder for the held-out data and runs")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device = setup(args)
    overrides, tmp = run_overrides(args, parser, device)
    files = [f for f in args.config_files.split(",") if f]
    work = Path(tmp.name if tmp else args.work) / f"{args.dataset}-{args.seed}"
    report = Report(f"Cold start: {args.holdout:.0%} of {args.dataset}'s items added from text after training",
                    ["benchmarks/cold_start.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        config = ProjectConfig(resolve_model("PRORec"), args.dataset, files, overrides)
        new_file, cold_users, new_items = hold_out(Path(config["data_path"]), args.dataset, config,
                                        args.holdout, args.seed, work / "data")
        overrides = {**overrides, "data_path": str(work / "data"), "seed": args.seed,
                     "checkpoint_dir": str(work / "saved"), "unicode_dir": str(work / "unicode")}
        if not args.quick:
            overrides["train_time_budget"] = args.budget
        trained = run("PRORec", args.dataset, files, overrides)
        rows, out = [], {"trained": {"test": trained.test, "epochs": trained.epochs_run}}
        for placement, weights in (("tree", "ridge"), ("tree", "mean"), ("random", "ridge")):
            added = add_items(trained.checkpoint, new_file, placement, args.seed, weights)
            key = f"{placement}, {weights}"
            out[key] = {**scores(added.checkpoint, cold_users, new_items), "map R^2": added.map_r2}
            rows.append([placement, weights, *(f"{v:.4f}" if isinstance(v, float) else v for v in out[key].values())])
        report.add(
            f"{len(new_items)} held-out items ({args.holdout:.0%}, seed {args.seed}); PRORec trained without them "
            f"({trained.epochs_run} epochs, {'quick mode' if args.quick else f'Stage II budget {args.budget:.0f} s'}; "
            f"its test Recall@20 on the "
            f"remaining data {trained.test.get('recall@20', float('nan')):.4f}), then given them by placement. "
            f"Top {K} of the beam search, nothing excluded. Placement: Stage I's k-means tree or random leaf "
            f"clusters; item weights (each new item's own token embedding and bias): predicted from its "
            f"integrated embedding (ridge, fitted on the warm items) or the warm items' mean. "
            f"{len(cold_users)} users' last item was held out.\n\n"
            + markdown_table(["placement", "item weights", *out["tree, ridge"].keys()], rows))
        report.save(args.out)
        return out
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
