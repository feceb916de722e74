"""The paper's analyses as commands, on any dataset: each writes a Markdown table and, where the
paper has a figure, a PNG into ``docs/analysis/`` with the command, seed, hardware and date.

    python benchmarks/paper.py balance --dataset Amazon_Beauty     # Table 4 and Figure 5 (Stage I only)
    python benchmarks/paper.py balance --quick                     # ml-100k, tiny settings, < 3 min
    python benchmarks/paper.py ablation --dataset Amazon_Beauty --budget 900   # Tables 5 and 6
    python benchmarks/paper.py layers --dataset Amazon_Beauty --budget 900     # Figure 6
    python benchmarks/paper.py sweep --dataset Amazon_Beauty --budget 900      # Figure 9
    python benchmarks/paper.py ablation --dataset Amazon_Beauty --row CKA      # one row now, the rest later

``balance`` (Table 4, Figure 5): how much of the semantic and of the collaborative space the final
item embeddings keep, for concatenation and for PRORec. It trains (or reuses) two Stage-I DINs,
one with CKA (PRORec's integrated embeddings) and one without (the collaborative embeddings, as
the PRORec-collab and -concat variants use them); the semantic embeddings are the text encoder's.
Concatenation is PCA(semantic) to the DIN's width, then the collaborative embeddings, as in the
paper and in Stage I's ``fusion: concat``.

The paper does not say how its distributions (eq. 9-10) are formed; ours, per space X: for a
sample of anchor items i, P_X(i) = softmax over all other items j of cos(x_i, x_j) / tau. Then
KL_s = mean over anchors of KL(P_F(i) || P_S(i)) for final embeddings F and semantic S (KL_c
likewise with the collaborative C), and the shares are share_s = (1/KL_s) / (1/KL_s + 1/KL_c),
share_c = 1 - share_s: the closer F's neighbourhoods are to a space's, the larger its share.
"""
from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (QUICK, ROOT, Report, add_run_arguments, base_parser, encoder_settings, environment,  # noqa: E402
                    markdown_table, run_overrides, setup)
from recbole_prorec.files import atomic_file  # noqa: E402

OUT_DIR = ROOT / "docs" / "analysis"


def stage1_embeddings(dataset: str, files: Sequence[str], overrides: dict, variant: str) -> tuple[list[str], np.ndarray, dict]:
    """Item tokens, embeddings and Stage-I config of ``variant``'s Stage I (run now or reused)."""
    from recbole_prorec.artifact import embedding_files
    from recbole_prorec.registry import resolve_model
    from recbole_prorec.stage1 import run_stage1

    result = run_stage1(dataset, files, {**resolve_model(variant).overrides, **overrides})
    emb_file, items_file = embedding_files(result.artifact.folder, dataset)
    tokens = items_file.read_text(encoding="utf-8").split("\n")[: len(np.load(emb_file))]
    return tokens, np.load(emb_file), result.config


def text_embeddings(dataset: str, files: Sequence[str], overrides: dict, tokens: list[str]) -> np.ndarray:
    """The text encoder's embeddings of ``tokens`` (from Stage I's cache when it has them)."""
    from recbole_prorec.prorec_din import semantic_embeddings
    from recbole_prorec.stage1 import stage1_config

    config = stage1_config(dataset, files, overrides)
    return semantic_embeddings(config, Path(config["data_path"]) / f"{dataset}.item", tokens)


def neighbour_distributions(x: np.ndarray, anchors: np.ndarray, tau: float) -> np.ndarray:
    """Row a: softmax over every item j != anchors[a] of cos(x_a, x_j) / tau."""
    x = x.astype(np.float64)  # float32 underflows the far neighbours' probabilities to 0
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    logits = unit[anchors] @ unit.T / tau
    logits[np.arange(len(anchors)), anchors] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def mean_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of KL(p || q) (zero-probability entries of p contribute nothing)."""
    ratio = np.where(p > 0, p / np.maximum(q, 1e-300), 1.0)
    return float((p * np.log(ratio)).sum(axis=1).mean())


def shares(final: np.ndarray, semantic: np.ndarray, collab: np.ndarray, anchors: np.ndarray, tau: float) -> dict:
    p = {name: neighbour_distributions(x, anchors, tau) for name, x in
         (("final", final), ("semantic", semantic), ("collab", collab))}
    kl_s, kl_c = mean_kl(p["final"], p["semantic"]), mean_kl(p["final"], p["collab"])
    inverse_s, inverse_c = 1 / max(kl_s, 1e-12), 1 / max(kl_c, 1e-12)  # a KL of 0: that space is all of F
    share_s = inverse_s / (inverse_s + inverse_c)
    return {"KL to semantic": kl_s, "KL to collaborative": kl_c, "semantic share": share_s, "collaborative share": 1 - share_s}


def tsne_panels(spaces: dict[str, np.ndarray], clusters: int, seed: int, out: Path) -> None:
    """Figure 5: one t-SNE panel per space, points coloured by k-means cluster in that space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(spaces), figsize=(4 * len(spaces), 4))
    for ax, (name, x) in zip(axes, spaces.items()):
        labels = KMeans(clusters, n_init=4, random_state=seed).fit_predict(x)
        xy = TSNE(2, init="pca", perplexity=min(30, len(x) // 4), random_state=seed).fit_transform(x)
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, s=3, cmap="tab10")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def balance(args, files: Sequence[str], overrides: dict) -> dict:
    from recbole_prorec.stage1 import pca

    tokens, integrated, config = stage1_embeddings(args.dataset, files, overrides, "PRORec")
    collab_tokens, collab, _ = stage1_embeddings(args.dataset, files, overrides, "PRORec-collab")
    row = {t: i for i, t in enumerate(collab_tokens)}
    collab = collab[[row[t] for t in tokens]]  # both artifacts' rows in one item order
    semantic = text_embeddings(args.dataset, files, overrides, tokens)
    concat = np.hstack([pca(semantic, collab.shape[1], args.seed), collab])
    rng = np.random.default_rng(args.seed)
    anchors = np.sort(rng.choice(len(tokens), size=min(args.anchors, len(tokens)), replace=False))
    rows = {name: shares(final, semantic, collab, anchors, args.tau) for name, final in
            (("concat", concat), ("PRORec", integrated))}
    sample = np.sort(rng.choice(len(tokens), size=min(args.tsne_items, len(tokens)), replace=False))
    stem = f"balance_{args.dataset}" + ("_quick" if args.quick else "")  # a smoke run never replaces a real one
    png = Path(args.out_dir) / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    tsne_panels({"semantic": semantic[sample], "collaborative": collab[sample], "concat": concat[sample],
                 "PRORec": integrated[sample]}, args.clusters, args.seed, png)
    report = Report(f"Modality balance on {args.dataset} (paper Table 4, Figure 5)",
                    ["benchmarks/paper.py", *args.argv])
    header = ["embeddings", "KL to semantic", "KL to collaborative", "semantic share", "collaborative share"]
    table = [[name] + [f"{r[h]:.4f}" for h in header[1:]] for name, r in rows.items()]
    report.add(f"{date.today()}, seed {args.seed}; {len(tokens):,} items, {len(anchors):,} anchor items, "
               f"tau {args.tau}; text encoder {config['semantic_encoder']}; DIN width {collab.shape[1]}. "
               f"Definitions: the docstring of `benchmarks/paper.py`.\n\n" + markdown_table(header, table)
               + f"\n\nFigure 5: `{png.name}`, t-SNE of {len(sample):,} items per space, coloured by "
               f"{args.clusters} k-means clusters of that space.")
    report.save(str(Path(args.out_dir) / f"{stem}.md"))
    return {"rows": rows, "png": png}


METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
# The paper's Beauty numbers (Recall@10, Recall@20, NDCG@10, NDCG@20): Table 5 (modalities) and
# Table 6 (\ = concat, CKA, CKA + IKD); Figures 6 and 9 give no numbers in the text.
PAPER_BEAUTY = {
    "Semantic Only": (0.0810, 0.1102, 0.0498, 0.0571),
    "Collaborative Only": (0.0803, 0.1095, 0.0495, 0.0569),
    "Concat": (0.0807, 0.1085, 0.0504, 0.0574),
    "CKA": (0.0827, 0.1122, 0.0509, 0.0583),
    "CKA + IKD (PRORec)": (0.0939, 0.1289, 0.0559, 0.0646),
}
ABLATION = (("Semantic Only", "PRORec-semantic"), ("Collaborative Only", "PRORec-collab"),
            ("Concat", "PRORec-concat"), ("CKA", "PRORec-CKA"), ("CKA + IKD (PRORec)", "PRORec"))


# settings that say where output goes or how it is shown, not what a row trains: left out of its key
UNKEYED = {"show_progress", "state", "unicode_dir", "checkpoint_dir", "semantic_cache_dir"}


def row_key(args, label: str, settings: dict, overrides: dict) -> dict:
    """What decides a row's numbers, as JSON reads it back; a row stored with another key is trained again."""
    key = {"model": label, "settings": settings, "seed": args.seed, "budget": None if args.quick else args.budget,
           "device": args.device, "overrides": {k: v for k, v in overrides.items() if k not in UNKEYED}}
    return json.loads(json.dumps(key, default=str))


def train_rows(args, name: str, files: Sequence[str], overrides: dict,
               rows: Sequence[tuple[str, str, dict]]) -> list[dict]:
    """Train and test each (row name, model or variant, settings) through the runner, every row at
    the same budget (``--budget`` seconds of Stage II; quick mode: its own tiny one); the test split
    is read once per row. A setting the model was not built with (a misspelt key only warns) stops
    the analysis rather than giving a row of the defaults under a wrong name.

    Rows are stored as they finish in ``<name>_<dataset>.rows.json`` beside the table (with the
    machine they ran on and their per-epoch validation curve), and a stored
    row with the same key (model, settings, seed, budget, device, ``--set``) is reused rather than
    trained again: an analysis of hours can be run a few rows at a time (``--row``), and each
    row's test split is still read once. Rows neither stored nor asked for now come back with
    NaN metrics and ``"run": False``."""
    import torch

    from recbole_prorec.runner import run

    ledger_file = analysis_path(args, name, ".rows.json")
    ledger = read_ledger(ledger_file)
    wanted = set(args.row) or {row for row, _, _ in rows}
    unknown = wanted - {row for row, _, _ in rows}
    if unknown:
        raise ValueError(f"--row: {sorted(unknown)} not among this analysis' rows {[row for row, _, _ in rows]}")
    budget = {} if args.quick else {"train_time_budget": args.budget}
    out = []
    for row, label, settings in rows:
        key = row_key(args, label, settings, overrides)
        stored = ledger.get(row)
        if stored and stored.get("key") == key:
            print(f"row {row!r}: reusing its result of {stored['date']} from {ledger_file}", flush=True)
            out.append(stored)
            continue
        if row not in wanted:
            out.append({"row": row, "model": label, **dict.fromkeys(METRICS, float("nan")), "run": False})
            continue
        result = run(label, args.dataset, files, {"seed": args.seed, **budget, **overrides, **settings})
        saved = torch.load(result.checkpoint, weights_only=True, mmap=True)["config"]  # what the model was built with
        if any(saved.get(k) != v for k, v in settings.items()):
            raise RuntimeError(f"row {row!r}: settings {settings} did not reach {label} "
                               f"(its checkpoint has {({k: saved.get(k) for k in settings})})")
        ledger[row] = {"row": row, "model": label, **{m: result.test.get(m, float("nan")) for m in METRICS},
                       "epochs": result.epochs_run, "best epoch": result.best_epoch, "train s": result.train_time,
                       "artifact": str(result.data_folder), "settings": {k: saved.get(k) for k in settings},
                       "run": True, "date": str(date.today()), "hardware": hardware(),
                       "curve": result.curve,  # per validated epoch: outlives the log
                       "key": key}
        with atomic_file(ledger_file) as f:  # each row as soon as it is done; a crash keeps the old ledger
            f.write(json.dumps(ledger, indent=1))
        out.append(ledger[row])
    return out


def read_ledger(path: Path) -> dict:
    """The stored rows of ``path`` ({} when there is none); a damaged file stops the analysis, naming
    it, rather than being overwritten: it may hold hours of training."""
    if not path.is_file():
        return {}
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON rows ledger ({err}); repair it or move it away to train its rows again") from None
    if not isinstance(ledger, dict):
        raise ValueError(f"{path}: a rows ledger maps row names to rows, got {type(ledger).__name__}")
    return ledger


def hardware() -> str:
    """Where a row was trained: its budget buys a different number of epochs on another machine."""
    env = environment()
    return f"{env['cpu']}, {env['cores']} cores, GPU {env['gpu']}"


def rows_table(rows: list[dict], paper: dict | None = None) -> str:
    header = ["row", "model", *METRICS, "epochs", "best epoch", "train s"]
    table = [[r["row"], r["model"], *(f"{r[m]:.4f}" for m in METRICS), r["epochs"], r["best epoch"], f"{r['train s']:.0f}"]
             if r["run"] else [r["row"], r["model"], "not run yet", "", "", "", "", "", ""] for r in rows]
    if paper:
        header += [f"paper {m}" for m in METRICS]
        table = [t + [f"{v:.4f}" for v in paper.get(r["row"], ())] + [""] * (4 - len(paper.get(r["row"], ())))
                 for t, r in zip(table, rows)]
    text = markdown_table(header, table)
    missing = [r["row"] for r in rows if not r["run"]]
    if missing:
        text += f"\n\nNot run yet: {', '.join(missing)} (add them with `--row NAME`; stored rows are reused)."
    dates = sorted({r["date"] for r in rows if r["run"]})
    if len(dates) > 1:
        text += f"\n\nRows were trained on {', '.join(dates)}, with the same key each (`.rows.json` beside this file)."
    machines = {r.get("hardware", "not recorded") for r in rows if r["run"]}
    if len(machines) > 1:  # the environment line above is the last run's machine only
        text += "\n\nRows were trained on different machines: " + "; ".join(
            f"{r['row']}: {r.get('hardware', 'not recorded')}" for r in rows if r["run"]) + "."
    return text


def analysis_path(args, name: str, suffix: str) -> Path:
    """``<out-dir>/<name>_<dataset>[_quick]<suffix>`` (a smoke run never replaces a real one)."""
    return Path(args.out_dir) / (f"{name}_{args.dataset}" + ("_quick" if args.quick else "") + suffix)


def write_analysis(args, name: str, title: str, text: str) -> Path:
    """``docs/analysis/<name>_<dataset>[_quick].md``."""
    report = Report(title, ["benchmarks/paper.py", *args.argv])
    budget = "quick mode's tiny budget" if args.quick else f"{args.budget:.0f} s of Stage II training per row"
    report.add(f"{date.today()}, seed {args.seed}, {budget}; test split read once per row; `train s` is Stage II "
               f"training (PRORec's Stage I, run once per distinct Stage-I setting, is not counted).\n\n{text}")
    out = analysis_path(args, name, ".md")
    report.save(str(out))
    return out


def stage2_note(args) -> str:
    """What every ablation row's Stage II is, beside the paper's (``--set`` may change it)."""
    settings = f", changed by {', '.join(f'`{s}`' for s in args.set)}" if args.set else ""
    return (f"Every row keeps this package's Stage II defaults{settings}; the paper's model has neither "
            "an item's own last-code token nor integrated embeddings among its input tokens (`integrated_item_tokens`).")


def ablation(args, files: Sequence[str], overrides: dict) -> dict:
    """Tables 5 and 6: single modalities, concatenation, CKA, CKA + IKD, at one budget each."""
    rows = train_rows(args, "ablation", files, overrides, [(name, variant, {}) for name, variant in ABLATION])
    paper = PAPER_BEAUTY if args.dataset == "Amazon_Beauty" else None
    md = write_analysis(args, "ablation", f"Ablation on {args.dataset} (paper Tables 5 and 6)",
                        rows_table(rows, paper) + ("\n\nPaper columns: Tables 5 and 6 (Beauty)." if paper else "")
                        + "\n\n" + stage2_note(args))
    return {"rows": rows, "md": md}


def line_figure(out: Path, x: Sequence, series: dict[str, Sequence[float]], xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in series.items():
        ax.plot(list(map(str, x)), ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def layers(args, files: Sequence[str], overrides: dict) -> dict:
    """Figure 6: decoder depth against NDCG@20, PRORec beside an ID-only transformer of the same
    depth (SASRec-CE stands in for HSTU, which RecBole 1.2.1 lacks)."""
    depths = [int(d) for d in args.depths.split(",")]
    pairs = (("PRORec", "n_decoder_layers"), ("SASRec-CE", "n_layers"))
    rows = train_rows(args, "layers", files, overrides,
                      [(f"{label}, {d} layers", label, {key: d}) for d in depths for label, key in pairs])
    png = analysis_path(args, "layers", ".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    line_figure(png, depths, {label: [r["ndcg@20"] for r in rows if r["model"] == label] for label in ("PRORec", "SASRec-CE")},
                "layers (PRORec: decoder; SASRec-CE: transformer)", "test NDCG@20")
    md = write_analysis(args, "layers", f"Layer scaling on {args.dataset} (paper Figure 6)",
                        rows_table(rows) + f"\n\nFigure: `{png.name}` (test NDCG@20 against depth).")
    return {"rows": rows, "md": md, "png": png}


def sweep(args, files: Sequence[str], overrides: dict) -> dict:
    """Figure 9: codebook size K, quantizer and text encoder, one setting changed at a time from
    PRORec's defaults (its YAML's K, hkmeans, the bundled MiniLM)."""
    from recbole_prorec.stage1 import stage1_config

    default_k = stage1_config(args.dataset, files, overrides)["codebook_size"]
    settings = [(f"K={k}", {"codebook_size": k}) for k in (int(k) for k in args.sizes.split(","))]
    settings += [(f"quantizer {q}", {"quantizer": q}) for q in args.quantizers.split(",") if q != "hkmeans"]
    for spec in filter(None, args.encoders.split(",")):
        setting = encoder_settings(spec)
        encoder = setting.get("semantic_encoder") or setting["semantic_embedding_file"]
        settings.append((f"encoder {Path(encoder).name}", setting))
    rows = train_rows(args, "sweep", files, overrides, [(name, "PRORec", s) for name, s in settings])
    png = analysis_path(args, "sweep", ".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    line_figure(png, [r["row"] for r in rows], {m: [r[m] for r in rows] for m in ("recall@20", "ndcg@20")},
                "setting (one change from the defaults each)", "test metric")
    md = write_analysis(args, "sweep", f"Codebook size, quantizer and text encoder on {args.dataset} (paper Figure 9)",
                        rows_table(rows) + f"\n\nFigure: `{png.name}`. Each row changes one setting of the run's "
                        f"defaults (PRORec's: K={default_k}, hkmeans, the bundled all-MiniLM-L6-v2 with mean pooling).")
    return {"rows": rows, "md": md, "png": png}


ANALYSES = {"balance": balance, "ablation": ablation, "layers": layers, "sweep": sweep}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("analysis", choices=sorted(ANALYSES))
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out-dir", default=str(OUT_DIR), help="folder for the tables and figures")
    parser.add_argument("--anchors", type=int, default=2000, help="balance: anchor items of the KL estimate")
    parser.add_argument("--tau", type=float, default=0.1, help="balance: softmax temperature of the neighbourhoods")
    parser.add_argument("--tsne-items", type=int, default=3000, help="balance: items drawn in each t-SNE panel")
    parser.add_argument("--clusters", type=int, default=8, help="balance: k-means clusters that colour the points")
    parser.add_argument("--budget", type=float, default=900, help="ablation/layers/sweep: Stage II seconds per row")
    parser.add_argument("--row", action="append", default=[], help="ablation/layers/sweep: train only this row now "
                        "(its name in the table; repeatable); rows stored by an earlier run with the same settings are reused")
    parser.add_argument("--depths", default="1,2,4,8", help="layers: depths to train")
    parser.add_argument("--sizes", default="128,256,512", help="sweep: codebook sizes K")
    parser.add_argument("--quantizers", default="random,rqvae,hkmeans", help="sweep: quantizers (hkmeans is the default K's row)")
    parser.add_argument("--encoders", default="", help="sweep: extra text encoders (HF paths, NAME:last for "
                        "last-token pooling) or .npy embedding files, comma-separated")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = setup(args)
    overrides, tmp = run_overrides(args, parser, device)
    if args.quick:
        overrides["stage1"] = dict(QUICK["stage1"])
    files = [f for f in args.config_files.split(",") if f]
    try:
        return ANALYSES[args.analysis](args, files, overrides)
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
