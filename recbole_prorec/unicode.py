"""PRORec Stage I pipeline: train DIN+MAL+CKA, quantize the integrated embeddings, write unicodes.

The output is a new RecBole dataset folder ``<unicode_dir>/<dataset>-<key>/<dataset>/`` holding a
copy of the ``.inter`` file, the ``.item`` file with an added ``unicode:token_seq`` column, the
integrated embeddings (``.emb.npy`` with ``.emb_items.txt`` giving each row's item token) and
``stage1.json``. ``<key>`` hashes Stage I's whole configuration (less the keys that cannot change
its output) plus the size and mtime of the source files and of ``semantic_embedding_file``, so a
rerun with the same settings reuses the folder and any other setting trains anew.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from logging import getLogger
from pathlib import Path
from time import monotonic
from typing import Any, Mapping, Sequence

import numpy as np
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from sklearn.decomposition import PCA

from recbole_prorec.alignment import PRORecDIN, load_semantic
from recbole_prorec.config import RUNNER_KEYS, ModelSpec, ProjectConfig, plain_config
from recbole_prorec.data import UNICODE_FIELD, check_columns, embedding_files, read_header
from recbole_prorec.logs import start_log
from recbole_prorec.quantize import Codes, quantize
from recbole_prorec.trainer import SafeTrainer

FUSIONS = ("prorec", "collab_only", "semantic_only", "concat")
# Keys that cannot change Stage I's output: where files go, logging, devices, evaluation batching.
IGNORED_KEYS = {
    "stage1_rerun", "stage1_evaluate", "unicode_dir", "semantic_cache_dir", "semantic_batch_size",
    "semantic_device", "din_full_sort_chunk", "checkpoint_dir", "data_search_paths", "dataset_save_path",
    "dataloaders_save_path", "save_dataset", "save_dataloaders", "eval_batch_size", "gpu_id", "use_gpu",
    "local_rank", "single_spec", "worker", "state", "show_progress", "log_wandb", "wandb_project",
    "loss_decimal_place", "metric_decimal_place", "model_label", "load_checkpoint",
    # where the inputs lie; their bytes are hashed instead (stage1_key)
    "data_path", "semantic_embedding_file",
}


def stage1_config(dataset: str, config_files: Sequence[str], overrides: Mapping[str, Any]) -> ProjectConfig:
    """Config of the Stage-I DIN: shared keys, then the ``stage1`` training block on top (whose
    ``train_time_budget`` replaces the run's, which is Stage II's). Stage I is one process: the
    runner trains it before starting Stage II's DDP workers, so their DDP keys are dropped."""
    overrides = {k: v for k, v in overrides.items() if k not in RUNNER_KEYS}
    return ProjectConfig(ModelSpec("PRORecDIN", PRORecDIN), dataset, config_files, overrides, apply_block="stage1")


def stage1_key(config: ProjectConfig) -> str:
    """Hash of what Stage I's output depends on: its configuration and the bytes of its input files.

    Keys without a default for Stage I's model (Stage II's ``hidden_size``, say) are left out, and
    so are the input files' paths and dates: a copy of the dataset elsewhere (another machine, a
    fresh checkout) reuses the same Stage I output, an edited file does not."""
    known = config.known_keys | {"dataset"}
    relevant = {k: v for k, v in plain_config(config).items() if k in known and k not in IGNORED_KEYS}
    folder = Path(config["data_path"])
    inputs = {suffix: folder / f"{config['dataset']}.{suffix}" for suffix in ("inter", "item")}
    if config["semantic_embedding_file"]:
        inputs["semantic_embedding_file"] = Path(config["semantic_embedding_file"])
    for name, path in inputs.items():
        if path.is_file():
            with path.open("rb") as f:
                relevant[f"file.{name}"] = hashlib.file_digest(f, "sha256").hexdigest()
    blob = json.dumps(relevant, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_unicodes(dataset: str, config_files: Sequence[str], overrides: Mapping[str, Any]) -> Path:
    """Run (or reuse) Stage I; returns the data folder to hand RecBole as ``data_path``."""
    config = stage1_config(dataset, config_files, overrides)
    start_log(config)
    logger = getLogger()
    source = Path(config["data_path"])
    out_root = Path(config["unicode_dir"]) / f"{dataset}-{stage1_key(config)}"
    if out_root.resolve() == source.parent.resolve() or source.resolve() in out_root.resolve().parents:
        raise ValueError(f"unicode_dir {config['unicode_dir']} must not be (inside) the source data folder {source}")
    if (out_root / dataset / "stage1.json").is_file() and not config["stage1_rerun"]:
        logger.info(f"Stage I: reusing unicodes in {out_root / dataset} (stage1_rerun=True to retrain)")
        return out_root
    if config["fusion"] not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {config['fusion']!r}")
    if config["fusion"] in ("collab_only", "concat"):  # these fuse a DIN trained without CKA
        config["cka_weight"] = 0.0
    check_columns(source.parent, dataset, config["load_col"])
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    tokens = list(data.field2id_token[config["ITEM_ID_FIELD"]])[1:]
    report: dict[str, Any] = {"dataset": dataset, "items": len(tokens), "config": plain_config(config)}
    emb = integrated_embeddings(config, data, report)
    start = monotonic()
    codes = quantize(emb, config["quantizer"], config["codebook_size"], config["seed"], **quantizer_kwargs(config))
    report["quantize_seconds"] = monotonic() - start
    report["codes"] = codes.stats
    write_unicode_dataset(source, out_root / dataset, dataset, tokens, codes, emb, report, config["ITEM_ID_FIELD"])
    logger.info(f"Stage I: unicodes written to {out_root / dataset}")
    return out_root


def quantizer_kwargs(config) -> dict:
    if config["quantizer"] == "hkmeans":
        return {"n_init": config["hkmeans_n_init"], "show_progress": config["show_progress"]}
    if config["quantizer"] == "rqvae":
        return {"levels": config["rqvae_levels"], "epochs": config["rqvae_epochs"],
                "show_progress": config["show_progress"]}
    return {}


def integrated_embeddings(config, data, report: dict) -> np.ndarray:
    """Item embeddings [n_items, d] (row i = internal id i + 1) for the configured ``fusion``."""
    fusion = config["fusion"]
    if fusion == "semantic_only":
        start = monotonic()
        semantic = load_semantic(config, data)[1:]
        report["semantic_seconds"] = monotonic() - start
        return pca(semantic, config["din_embedding_size"], config["seed"])
    model = train_din(config, data, report)
    collab = model.integrated_embeddings()
    if fusion == "concat":
        semantic = model.semantic[1:].cpu().numpy()
        return np.hstack([pca(semantic, collab.shape[1], config["seed"]), collab])
    return collab


def pca(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    size = min(size, *x.shape)
    return PCA(n_components=size, random_state=seed).fit_transform(x).astype(np.float32)


def train_din(config, data, report: dict) -> PRORecDIN:
    """Train the Stage-I DIN with RecBole's loaders and our trainer; optionally test it."""
    logger = getLogger()
    train, valid, test = data_preparation(config, data)
    start = monotonic()
    model = PRORecDIN(config, train._dataset).to(config["device"])
    report["semantic_seconds"] = monotonic() - start
    trainer = SafeTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=config["show_progress"])
    report["train_seconds"] = trainer.train_time
    report["epochs"] = trainer.epochs_run
    if trainer.curve:  # validated: quantize the best epoch's embeddings, not the last epoch's
        trainer.load_best()
        report.update(best_epoch=trainer.best_epoch, valid=dict(trainer.best_valid_result), curve=trainer.curve)
        logger.info(f"Stage I: best validation epoch {trainer.best_epoch}: {dict(trainer.best_valid_result)}")
    if config["stage1_evaluate"]:
        result = trainer.evaluate(test, load_best_model=True, show_progress=config["show_progress"])
        report["test"] = dict(result)
        logger.info(f"Stage I DIN test result: {dict(result)}")
    return model


def write_unicode_dataset(
    source: Path, target: Path, dataset: str, tokens: list[str], codes: Codes,
    emb: np.ndarray, report: dict, id_field: str,
) -> None:
    """Write the augmented dataset folder atomically: build it aside, then rename into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset}-", dir=target.parent))
    try:
        write_unicode_files(source, tmp, dataset, tokens, codes, emb, id_field)
        (tmp / "stage1.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_unicode_files(
    source: Path, target: Path, dataset: str, tokens: list[str], codes: Codes, emb: np.ndarray, id_field: str,
) -> None:
    """The dataset's files in ``target``: its ``.inter``, its ``.item`` with codes, the embeddings."""
    shutil.copyfile(source / f"{dataset}.inter", target / f"{dataset}.inter")
    write_item_file(source / f"{dataset}.item", target / f"{dataset}.item", tokens, codes.to_strings(), id_field)
    emb_file, items_file = embedding_files(target, dataset)
    np.save(emb_file, emb.astype(np.float32, copy=False))
    items_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")


def write_item_file(source: Path, target: Path, tokens: list[str], codes: list[str], id_field: str) -> None:
    """Copy ``source`` line by line adding a ``unicode`` column; items missing from it get a row."""
    code_of = dict(zip(tokens, codes))
    if source.is_file():
        header = read_header(source)
        if id_field not in header:
            raise ValueError(f"{source} has no '{id_field}' column")
        if UNICODE_FIELD in header:
            raise ValueError(f"{source} already has a '{UNICODE_FIELD}' column")
        # lines as RecBole's pandas sees them: blank ones skipped, and no split at \x0c, \u2028, ...
        # (str.splitlines would split there and shift codes into the wrong rows)
        lines = [line for line in re.split(r"\r\n|\n|\r", source.read_text(encoding="utf-8")) if line]
    else:  # a dataset without item features still gets codes
        header, lines = [id_field], [f"{id_field}:token"]
    col = header.index(id_field)
    seen = set()
    out = [lines[0] + f"\t{UNICODE_FIELD}:token_seq"]
    for line in lines[1:]:
        token = line.split("\t")[col]
        seen.add(token)
        out.append(f"{line}\t{code_of.get(token, '')}")
    blanks = ["" for _ in header]
    for token in tokens:
        if token not in seen:
            row = list(blanks)
            row[col] = token
            out.append("\t".join(row + [code_of[token]]))
    target.write_text("\n".join(out) + "\n", encoding="utf-8")
