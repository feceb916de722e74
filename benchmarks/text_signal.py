"""How much of the next item an item's text alone tells: a training-free screen of text encoders.

Each encoder embeds the dataset's item texts (the text columns and template of the dataset's YAML,
as Stage I builds them) and every item outside the user's history is ranked by its text's cosine
to the history's last item, on RecBole's own split and full ranking (RecBole's loaders, the
``ranks`` of ``frequency.py``). A stronger encoder for PRORec should first carry more of this
signal; Stage I and Stage II then cost tens of minutes per encoder. With two encoders or more,
each is set against the first user by user (paired t-test, as ``frequency.py``).

    python benchmarks/text_signal.py --dataset Amazon_Beauty --encoders all-MiniLM-L6-v2,/path/to/all-mpnet-base-v2
    python benchmarks/text_signal.py --quick

``--encoders`` takes Hugging Face names or local model folders (``NAME:last`` for last-token
pooling) and ``.npy`` files of precomputed embeddings (one row per ``.item`` row).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Report, add_run_arguments, base_parser, encoder_settings, markdown_table,  # noqa: E402
                    run_overrides, setup)
from frequency import PAIRED_HEADER, paired_rows, ranks, user_metrics  # noqa: E402


class LastItemText(torch.nn.Module):
    """Scores every item by the cosine of its text embedding to the history's last item's.

    The history's own items are left out: the last item would always come first (cosine 1), and
    a ranker without training cannot learn, as the models do, how seldom an item comes again."""

    def __init__(self, embeddings: np.ndarray, config) -> None:
        super().__init__()
        table = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
        self.register_buffer("table", table)
        self.ITEM_ID = config["ITEM_ID_FIELD"]
        self.ITEM_SEQ = self.ITEM_ID + config["LIST_SUFFIX"]
        self.ITEM_SEQ_LEN = config["ITEM_LIST_LENGTH_FIELD"]

    def full_sort_predict(self, interaction) -> torch.Tensor:
        seq, length = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        last = seq.gather(1, (length - 1)[:, None]).squeeze(1)
        scores = self.table[last] @ self.table.T
        scores.scatter_(1, seq, float("-inf"))  # the history's own items
        scores[:, 0] = float("-inf")  # RecBole's padding item, also when no padding fills the history
        return scores


def text_ranks(run, dataset: str, files: Sequence[str], overrides: dict, split: str, device) -> tuple:
    """(encoder, dimension, seconds, (targets, ranks, None, None)) of the text ranking under ``overrides``."""
    from recbole_prorec.prorec_din import load_semantic
    from recbole_prorec.stage1 import stage1_config

    config = stage1_config(dataset, files, overrides)
    start = time.time()
    embeddings = load_semantic(config, run.dataset)  # as Stage I reads them, row 0 (padding) zeros
    seconds = time.time() - start
    model = LastItemText(embeddings, run.config).to(device)
    targets, rank, _ = ranks(model, run.valid if split == "valid" else run.test, device)
    encoder = config["semantic_embedding_file"] or config["semantic_encoder"]
    return encoder, embeddings.shape[1], seconds, (targets, rank, None, None)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--encoders", default="", help="comma-separated encoders or .npy files "
                        "(default: the config's semantic_encoder alone)")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    command = ["benchmarks/text_signal.py", *(sys.argv[1:] if argv is None else argv)]
    device = setup(args)
    overrides, tmp = run_overrides(args, parser, device)
    files = [f for f in args.config_files.split(",") if f]
    from recbole_prorec.build import build
    from recbole_prorec.registry import resolve_model

    # any sequential model's loaders hold the histories; only their last item is read, so the length cap is moot
    run = build(resolve_model("SASRec-CE"), args.dataset, files, overrides)
    table, results = [], {}
    for spec in [s for s in args.encoders.split(",") if s] or [None]:
        settings = encoder_settings(spec) if spec else {}
        encoder, dim, seconds, result = text_ranks(run, args.dataset, files, {**overrides, **settings}, args.split, device)
        results[encoder] = result
        metrics = {name: values.mean() for name, values in user_metrics(result[1]).items()}
        table.append([encoder, dim, f"{seconds:.1f}", *(f"{v:.4f}" for v in metrics.values())])
    header = ["encoder", "dim", "embed s", *metrics]
    report = Report(f"Next item from the last item's text, {args.dataset} ({args.split} split)",
                    command)
    report.add(f"{len(next(iter(results.values()))[0])} users; every item not in the history ranked by its text's "
               "cosine to the history's last item (RecBole's split and full ranking); seconds: embedding (a cache hit is near 0).")
    report.add(markdown_table(header, table))
    if len(results) > 1:
        report.add("Paired against the first encoder on the same users (difference: later minus first; 95 % "
                   "interval and p of a paired t-test):\n\n" + markdown_table(PAIRED_HEADER, paired_rows(results)))
    report.save(args.out)
    if tmp is not None:
        tmp.cleanup()
    return {"rows": table, "results": results}


if __name__ == "__main__":
    main()
