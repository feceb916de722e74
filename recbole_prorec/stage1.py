"""PRORec's Stage I: train DIN+MAL+CKA, quantize the integrated embeddings, write the artifact.

``run_stage1`` writes the Stage-I artifact (``artifact.py``) in ``<unicode_dir>/<dataset>-<key>``.
``<key>`` hashes Stage I's whole configuration (less the keys that cannot change its output) and
the bytes of its input files, so a rerun with the same settings and data reuses the artifact.
A run that differs from a cached one only in how the embeddings are quantized (``QUANTIZER_KEYS``)
quantizes that run's integrated embeddings again instead of retraining the DIN; any other setting
trains anew.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from logging import getLogger
from pathlib import Path
from time import monotonic
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.decomposition import PCA

from recbole_prorec.artifact import Artifact, ItemCodes, read_item_embeddings, write_artifact
from recbole_prorec.build import Run, load_data
from recbole_prorec.config import ProjectConfig, plain_config
from recbole_prorec.distributed import DDP_KEYS
from recbole_prorec.logs import start_log
from recbole_prorec.prorec_din import PRORecDIN, load_semantic
from recbole_prorec.quantize import check_quantizer, quantize
from recbole_prorec.registry import ModelSpec
from recbole_prorec.trainer import SafeTrainer

FUSIONS = ("prorec", "collab_only", "semantic_only", "concat")
WITHOUT_CKA = ("collab_only", "concat")  # fusions defined on a DIN trained without CKA
# Keys that cannot change Stage I's output: where files go, logging, devices, evaluation batching.
IGNORED_KEYS = {
    "stage1_rerun", "stage1_evaluate", "unicode_dir", "semantic_cache_dir", "semantic_batch_size",
    "semantic_device", "din_full_sort_chunk", "checkpoint_dir", "data_search_paths", "dataset_save_path",
    "dataloaders_save_path", "save_dataset", "save_dataloaders", "eval_batch_size", "gpu_id", "use_gpu",
    "local_rank", "single_spec", "worker", "state", "show_progress", "log_wandb", "wandb_project",
    "loss_decimal_place", "metric_decimal_place", "model_label", "load_checkpoint", "release_memory_every",
    # where the inputs lie; their bytes are hashed instead (stage1_key)
    "data_path", "semantic_embedding_file",
}
# Keys added after artifacts were cached, hashed only when set away from their default, so adding
# an option does not retrain every existing Stage I.
HASHED_WHEN_SET = {"hkmeans_balanced": False, "drop_last_interactions": 0, "ema_decay": None}
# Keys that act on the quantization of the integrated embeddings only: the paper's sweeps over K and
# quantizers (benchmarks/paper.py sweep) share one trained DIN through them.
QUANTIZER_KEYS = frozenset({"quantizer", "codebook_size", "hkmeans_n_init", "hkmeans_balanced", "rqvae_levels",
                            "rqvae_epochs"})


def stage1_config(dataset: str, config_files: Sequence[str], overrides: Mapping[str, Any]) -> ProjectConfig:
    """Config of the Stage-I DIN: shared keys, then the ``stage1`` training block on top (whose
    ``train_time_budget`` replaces the run's, which is Stage II's). Stage I is one process: the
    runner trains it before starting Stage II's DDP workers, so their DDP keys are dropped."""
    overrides = {k: v for k, v in overrides.items() if k not in DDP_KEYS}
    return ProjectConfig(ModelSpec("PRORecDIN", PRORecDIN), dataset, config_files, overrides, apply_block="stage1")


def _left_at_default(key: str, value: Any) -> bool:
    return key in HASHED_WHEN_SET and value == HASHED_WHEN_SET[key]


def stage1_key(config: ProjectConfig, leave_out: frozenset[str] = frozenset()) -> str:
    """Hash of what Stage I's output depends on: its configuration and the bytes of its input files.

    Keys without a default for Stage I's model (Stage II's ``hidden_size``, say) are left out, and
    so are the input files' paths and dates: a copy of the dataset elsewhere (another machine, a
    fresh checkout) reuses the same Stage I output, an edited file does not. ``leave_out``: keys
    the hashed output does not depend on (``embeddings_key``)."""
    known = config.known_keys | {"dataset"}
    relevant = {k: v for k, v in plain_config(config).items() if k in known and k not in IGNORED_KEYS
                and k not in leave_out and not _left_at_default(k, v)}
    relevant["stage1"] = {k: v for k, v in (relevant.get("stage1") or {}).items() if not _left_at_default(k, v)}
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


def embeddings_key(config: ProjectConfig) -> str:
    """Hash of what the integrated embeddings depend on: Stage I's key less the quantizer's keys."""
    return stage1_key(config, QUANTIZER_KEYS)


@dataclass
class DINTraining:
    """What training Stage I's DIN produced besides its embeddings (None: not validated/tested)."""

    train_seconds: float
    epochs: int
    best_epoch: int | None = None
    valid: dict | None = None
    curve: list | None = None
    test: dict | None = None


@dataclass
class Stage1Result:
    """One Stage-I run: where its artifact is and what its report (``stage1.json``) says."""

    artifact: Artifact
    items: int
    config: dict
    codes: dict
    semantic_seconds: float
    quantize_seconds: float
    din: DINTraining | None = None
    reused: bool = False
    embeddings_key: str | None = None  # what the DIN's embeddings depend on (``embeddings_key``)
    embeddings_from: str | None = None  # the artifact whose embeddings were quantized again, if any

    def report(self) -> dict[str, Any]:
        """``stage1.json``: one flat record, as Stage I has always written it."""
        record = {"dataset": self.artifact.dataset, "items": self.items, "config": self.config,
                  "semantic_seconds": self.semantic_seconds}
        if self.din:
            record.update({k: v for k, v in asdict(self.din).items() if v is not None})
        record.update(quantize_seconds=self.quantize_seconds, codes=self.codes)
        record.update({k: v for k in ("embeddings_key", "embeddings_from") if (v := getattr(self, k))})
        return record

    @classmethod
    def load(cls, artifact: Artifact) -> "Stage1Result":
        """The result an earlier run recorded in the artifact's ``stage1.json``."""
        report = artifact.report()
        din = {f.name: report[f.name] for f in fields(DINTraining) if f.name in report}
        return cls(artifact, report["items"], report["config"], report["codes"], report.get("semantic_seconds", 0.0),
                   report.get("quantize_seconds", 0.0), DINTraining(**din) if din else None, reused=True,
                   embeddings_key=report.get("embeddings_key"), embeddings_from=report.get("embeddings_from"))


def run_stage1(dataset: str, config_files: Sequence[str], overrides: Mapping[str, Any]) -> Stage1Result:
    """Run Stage I, or reuse its artifact for the same settings and data (``stage1_rerun`` retrains)."""
    config = stage1_config(dataset, config_files, overrides)
    start_log(config)
    logger = getLogger()
    source = Path(config["data_path"])
    artifact = Artifact.locate(config["unicode_dir"], dataset, stage1_key(config))
    check_settings(config, artifact, source)
    config.check_output_folders()
    if artifact.complete and not config["stage1_rerun"]:
        logger.info(f"Stage I: reusing unicodes in {artifact.folder} (stage1_rerun=True to retrain)")
        return Stage1Result.load(artifact)
    emb_key = embeddings_key(config)
    earlier = None if config["stage1_rerun"] else Artifact.find(config["unicode_dir"], dataset, "embeddings_key", emb_key)
    tokens, emb, semantic_seconds, din = reused_embeddings(earlier) if earlier else trained_embeddings(config)
    start = monotonic()
    codes = quantize(emb, config["quantizer"], config["codebook_size"], config["seed"], **quantizer_kwargs(config))
    result = Stage1Result(artifact, len(tokens), plain_config(config), codes.stats, semantic_seconds,
                          monotonic() - start, din, embeddings_key=emb_key,
                          embeddings_from=str(earlier.folder) if earlier else None)
    items = ItemCodes(tokens, codes.to_strings(), emb)
    write_artifact(artifact, source, items, result.report(), id_field=config["ITEM_ID_FIELD"])
    logger.info(f"Stage I: unicodes written to {artifact.folder}")
    return result


Embeddings = tuple[list[str], np.ndarray, float, DINTraining | None]  # tokens, rows, text seconds, DIN record


def trained_embeddings(config: ProjectConfig) -> Embeddings:
    """Item tokens (internal id order) and their integrated embeddings, from a DIN trained now."""
    run = load_data(ModelSpec("PRORecDIN", PRORecDIN), config)
    tokens = list(run.dataset.field2id_token[config["ITEM_ID_FIELD"]])[1:]
    return tokens, *integrated_embeddings(run)


def reused_embeddings(earlier: Artifact) -> Embeddings:
    """The embeddings of an artifact made with the same DIN and other quantizer settings, and the
    record of that DIN's training: quantizing them anew gives what retraining would."""
    getLogger().info(f"Stage I: quantizing the integrated embeddings of {earlier.folder} again (no DIN training)")
    previous = Stage1Result.load(earlier)
    return *read_item_embeddings(earlier.folder, earlier.dataset), previous.semantic_seconds, previous.din


def check_settings(config, artifact: Artifact, source: Path) -> None:
    """Refuse settings that cannot work before any training starts."""
    if artifact.root.resolve() == source.parent.resolve() or source.resolve() in artifact.root.resolve().parents:
        raise ValueError(f"unicode_dir {config['unicode_dir']} must not be (inside) the source data folder {source}")
    check_quantizer(config["quantizer"], config["codebook_size"])
    if config["fusion"] not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {config['fusion']!r}")
    if config["fusion"] in WITHOUT_CKA and config["cka_weight"]:
        raise ValueError(f"fusion {config['fusion']!r} fuses a DIN trained without CKA: set cka_weight: 0 "
                         f"(got {config['cka_weight']}; the PRORec-collab and PRORec-concat variants do)")


def quantizer_kwargs(config) -> dict:
    if config["quantizer"] == "hkmeans":
        return {"n_init": config["hkmeans_n_init"], "balanced": config["hkmeans_balanced"],
                "show_progress": config["show_progress"]}
    if config["quantizer"] == "rqvae":
        return {"levels": config["rqvae_levels"], "epochs": config["rqvae_epochs"],
                "show_progress": config["show_progress"]}
    return {}


def integrated_embeddings(run: Run) -> tuple[np.ndarray, float, DINTraining | None]:
    """Item embeddings [n_items, d] (row i = internal id i + 1) for the configured ``fusion``, the
    seconds spent on text embeddings, and the DIN's training record (None without a DIN)."""
    config = run.config
    if config["fusion"] == "semantic_only":
        start = monotonic()
        semantic = load_semantic(config, run.dataset)[1:]
        return pca(semantic, config["din_embedding_size"], config["seed"]), monotonic() - start, None
    start = monotonic()
    model = run.model()  # loads (or encodes) the text embeddings
    semantic_seconds = monotonic() - start
    din = train_din(run, model)
    collab = model.integrated_embeddings()
    if config["fusion"] == "concat":
        semantic = model.semantic[1:].cpu().numpy()
        return np.hstack([pca(semantic, collab.shape[1], config["seed"]), collab]), semantic_seconds, din
    return collab, semantic_seconds, din


def pca(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    size = min(size, *x.shape)
    return PCA(n_components=size, random_state=seed).fit_transform(x).astype(np.float32)


def train_din(run: Run, model: PRORecDIN) -> DINTraining:
    """Train the Stage-I DIN with RecBole's loaders and our trainer; optionally test it."""
    logger, config = getLogger(), run.config
    trainer = SafeTrainer(config, model)
    trainer.fit(run.train, run.valid, saved=True, show_progress=config["show_progress"])
    din = DINTraining(trainer.train_time, trainer.epochs_run)
    if trainer.curve:  # validated: quantize the best epoch's embeddings, not the last epoch's
        trainer.load_best()
        din.best_epoch, din.valid, din.curve = trainer.best_epoch, dict(trainer.best_valid_result), trainer.curve
        logger.info(f"Stage I: best validation epoch {trainer.best_epoch}: {dict(trainer.best_valid_result)}")
    if config["stage1_evaluate"]:
        din.test = dict(trainer.evaluate(run.test, load_best_model=True, show_progress=config["show_progress"]))
        logger.info(f"Stage I DIN test result: {din.test}")
    return din
