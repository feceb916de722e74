"""Decoding speed: PRORec's constrained beam search vs SASRec's full-sort top-k, unified vs dual code.

A randomly initialised PRORec of the paper's size (hidden 128, 1 encoder layer, 4 decoder layers,
K=256) is built through RecBole on a synthetic Beauty-sized catalogue (12,101 items by default)
whose unicodes come from ``quantize.hkmeans`` on random 64-d embeddings (or ``random_codes``).
Speed does not depend on the weights, only on sizes and code lengths, so no training is needed.

For each batch size and beam width it reports ms per batch and users/s of ``PRORec.beam_search``
and of SASRec-CE (hidden 64, 2 layers) ``full_sort_predict`` + ``torch.topk(k=beam)`` on the same
users, and the ratio. The dual-code setup (EAGER-style) decodes two PRORec models, one over
"semantic" codes and one over "collaborative" codes (two independent hkmeans code sets over
two random embedding sets), and merges their top-k lists by confidence (union ranked by each
item's best score); it prints dual/unified time (the paper reports unified 2.8x faster).

    python benchmarks/decode.py                 # full grid, beam 10/20/50 x batch 1/64/512
    python benchmarks/decode.py --quick         # 2,000 items, beam 10/20 x batch 1/64
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    Report,
    base_parser,
    fmt,
    load_run,
    markdown_table,
    project_config,
    sequential_batch,
    setup,
    thread_limit,
    time_fn,
    write_synthetic_dataset,
)

BEAUTY_ITEMS = 12101
SASREC = {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "inner_size": 256}
PAPER_DUAL_RATIO = 2.8


def make_codes(method: str, n_items: int, seed: int, K: int = 256, dim: int = 64) -> list[tuple[int, ...]]:
    """Unicodes of ``n_items`` items: hkmeans over random ``dim``-d embeddings, or random ones."""
    from recbole_prorec.quantize import hkmeans, random_codes

    if method == "hkmeans":
        emb = np.random.default_rng(seed).standard_normal((n_items, dim)).astype(np.float32)
        return hkmeans(emb, K=K, seed=seed).codes
    # random prefix-free codes, a quarter of them one level longer (lengths 2-3 like hkmeans')
    short = max(2, int(np.ceil(np.log(n_items) / np.log(K))))
    lengths = [short + (i % 4 == 0) for i in range(n_items)]
    return random_codes(n_items, lengths, K=K, seed=seed).codes


def build_prorec(root: Path, name: str, beam: int, device: torch.device, seed: int):
    """A randomly initialised paper-size PRORec on ``root/name`` (IKD off: it changes no decoding)."""
    run = load_run("PRORec", root, name, {"ikd_weight": 0.0, "beam_size": beam, "seed": seed})
    return run.model().to(device).eval(), run.train._dataset


def build_sasrec(root: Path, name: str, data, device: torch.device, seed: int):
    """RecBole's SASRec (CE) sized as in our Beauty baseline, over the same loaded dataset."""
    from recbole_prorec.registry import model_class

    SASRec = model_class("SASRec")  # through the registry, which turns RecBole's anomaly detection off

    config = project_config("SASRec-CE", root, name, SASREC)
    torch.manual_seed(seed)
    return SASRec(config, data).to(device).eval()


def merge_by_confidence(items_a, scores_a, items_b, scores_b, k: int):
    """Per user, the union of two top-k lists ranked by each item's best score; top ``k`` of it."""
    items = torch.cat([items_a, items_b], dim=1)
    scores = torch.cat([scores_a, scores_b], dim=1)
    scores, order = scores.sort(dim=1, descending=True)
    items = items.gather(1, order)
    n = items.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=items.device).tril(-1)  # j < i
    dup = ((items[:, :, None] == items[:, None, :]) & earlier).any(-1)  # same item ranked higher
    scores = scores.masked_fill(dup | (items == 0), float("-inf"))
    top, pick = scores.topk(k, dim=1)
    return items.gather(1, pick).masked_fill(torch.isinf(top), 0), top


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=None,
                        help=f"catalogue size (default {BEAUTY_ITEMS:,}; quick 2,000)")
    parser.add_argument("--beams", default=None, help="comma-separated beam widths (default 10,20,50; quick 10,20)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64,512; quick 1,64)")
    parser.add_argument("--codes", choices=["hkmeans", "random"], default="hkmeans")
    parser.add_argument("--no-dual", action="store_true", help="skip the unified-vs-dual comparison")
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args(argv)
    device = setup(args)
    n_items = args.items or (2000 if args.quick else BEAUTY_ITEMS)
    beams = parse_ints(args.beams or ("10,20" if args.quick else "10,20,50"))
    batches = parse_ints(args.batches or ("1,64" if args.quick else "1,64,512"))
    repeats, min_time = (2, 0.2) if args.quick else (5, 1.0)
    report = Report("Decoding speed", ["benchmarks/decode.py", *(argv if argv is not None else sys.argv[1:])])

    with tempfile.TemporaryDirectory(prefix="prorec-decode-") as tmp:
        roots = {"unified": Path(tmp) / "unified", "semantic": Path(tmp) / "semantic", "collab": Path(tmp) / "collab"}
        streams = ["unified"] if args.no_dual else list(roots)
        models, code_stats = {}, []
        for i, stream in enumerate(streams):
            with thread_limit(args):
                codes = make_codes(args.codes, n_items, args.seed + i)
            # random Stage-I embeddings: the default integrated item tokens project them once per search
            integrated = np.random.default_rng(args.seed + i).standard_normal((n_items, 64)).astype(np.float32)
            write_synthetic_dataset(roots[stream], "synthetic", n_items, codes, integrated=integrated, seed=args.seed)
            # beam_size >= max(topk) = 20 is checked at construction; beam_size is set per run below
            models[stream], data = build_prorec(roots[stream], "synthetic", max(beams + [20]), device,
                                                args.seed + i)
            lengths = np.bincount([len(c) for c in codes])
            code_stats.append([stream, fmt(n_items, 0), ", ".join(f"{n}: {c}" for n, c in enumerate(lengths) if c)])
            if stream == "unified":
                sasrec = build_sasrec(roots[stream], "synthetic", data, device, args.seed)
        report.add(f"Catalogue: {n_items:,} items, {args.codes} codes (K=256), paper-size PRORec "
                   f"(hidden 128, 1 encoder / 4 decoder layers), random weights, histories of 1-20 items, "
                   f"device {device}.\n\n"
                   + markdown_table(["code stream", "items", "code lengths (length: items)"], code_stats))

        rows, dual_rows, results = [], [], []
        unified = models["unified"]
        for batch in batches:
            inter = sequential_batch(unified, batch, device, seed=args.seed + batch).to(device)
            for beam in beams:
                for model in models.values():
                    model.beam_size = beam

                def prorec():
                    return unified.beam_search(inter)

                def sas():
                    with torch.no_grad():
                        return torch.topk(sasrec.full_sort_predict(inter), k=beam, dim=1)

                t_pro = time_fn(prorec, device, repeats=repeats, min_time=min_time)
                t_sas = time_fn(sas, device, repeats=repeats, min_time=min_time)
                entry = {"batch": batch, "beam": beam, "prorec_ms": t_pro.ms, "sasrec_ms": t_sas.ms,
                         "ratio": t_pro.median / t_sas.median}
                rows.append([batch, beam, fmt(t_pro.ms, 2), fmt(batch / t_pro.median), fmt(t_sas.ms, 2),
                             fmt(batch / t_sas.median), f"{entry['ratio']:.1f}x"])
                if not args.no_dual:

                    def dual():
                        sem = models["semantic"].beam_search(inter)
                        col = models["collab"].beam_search(inter)
                        return merge_by_confidence(*sem, *col, k=beam)

                    t_dual = time_fn(dual, device, repeats=repeats, min_time=min_time)
                    entry.update(dual_ms=t_dual.ms, dual_ratio=t_dual.median / t_pro.median)
                    dual_rows.append([batch, beam, fmt(t_pro.ms, 2), fmt(t_dual.ms, 2),
                                      f"{entry['dual_ratio']:.2f}x", f"{PAPER_DUAL_RATIO}x"])
                results.append(entry)
                print(f"  batch {batch} beam {beam}: " + ", ".join(f"{k}={v:.3g}" for k, v in entry.items()),
                      flush=True)

    report.add("PRORec constrained beam search vs SASRec-CE full-sort + top-k (same users, median of repeats):\n\n"
               + markdown_table(["batch", "beam", "PRORec ms/batch", "PRORec users/s", "SASRec ms/batch",
                                 "SASRec users/s", "PRORec/SASRec time"], rows))
    if dual_rows:
        report.add("Unified code (one PRORec) vs dual code (semantic + collaborative PRORec decoders, merged by "
                   "confidence); dual/unified > 1 means unified is faster:\n\n"
                   + markdown_table(["batch", "beam", "unified ms", "dual ms", "dual/unified (ours)",
                                     "dual/unified (paper)"], dual_rows))
    report.save(args.out)
    return {"n_items": n_items, "device": str(device), "results": results}


if __name__ == "__main__":
    main()
