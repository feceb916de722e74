"""RecBole's quick-start API for this package: ``run``, ``load_data_and_model`` and ``Config``.

The same names, arguments and return values as ``recbole.quick_start`` and ``recbole.config``, so
a RecBole user's script works with PRORec by changing its imports. What differs is inside: our
YAML defaults are read, PRORec's Stage I runs (or is reused) before Stage II's data is loaded,
and checkpoints are read with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from recbole_prorec import runner
from recbole_prorec.build import Run, load_data
from recbole_prorec.config import ProjectConfig, plain_config
from recbole_prorec.distributed import DDP_KEYS
from recbole_prorec.logs import start_log
from recbole_prorec.registry import ModelSpec, resolve_model
from recbole_prorec.trainer import SafeTrainer, load_checkpoint, trained_form

# Keys of a saved config that describe the machine or the data's place, not the run's settings.
MACHINE_KEYS = {"data_path", "device", "gpu_id", "use_gpu", "single_spec", "checkpoint_dir", *DDP_KEYS}


def _label(model: str | type) -> str:
    return model if isinstance(model, str) else model.__name__


def Config(  # noqa: N802 - RecBole's name, so a RecBole script only changes its import
    model: str | type,
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
) -> ProjectConfig:
    """RecBole's ``Config(model, dataset, config_file_list, config_dict)`` with our YAML layers; for
    PRORec its ``data_path`` is the Stage-I artifact (Stage I runs first if it is not cached)."""
    spec = resolve_model(_label(model))
    files, overrides = list(config_file_list or []), dict(config_dict or {})
    folder = runner.stage1_folder(spec, dataset, files, overrides)
    return ProjectConfig(spec, dataset, files, overrides, data_folder=folder)


def run(
    model: str | type,
    dataset: str,
    config_file_list: Sequence[str] | None = None,
    config_dict: Mapping[str, Any] | None = None,
    saved: bool = True,
) -> dict[str, Any]:
    """Train and test ``model`` (a name, a variant or a class) on ``dataset``; returns RecBole's
    ``run_recbole`` dict: best_valid_score, valid_score_bigger, best_valid_result, test_result."""
    result = runner.run(_label(model), dataset, list(config_file_list or []), dict(config_dict or {}), saved=saved)
    return {
        "best_valid_score": result.best_valid_score,
        "valid_score_bigger": result.valid_score_bigger,
        "best_valid_result": result.valid,
        "test_result": result.test,
    }


def checkpoint_config(model_file: str | Path, data_folder: Path | None = None,
                      extra: Mapping[str, Any] | None = None) -> tuple[ModelSpec, ProjectConfig]:
    """The config of the run that saved ``model_file``, rebuilt from the settings it records (only
    those that differ from the defaults are replayed, and an architecture key the checkpoint
    predates takes the value its weights were trained with); ``data_folder`` replaces its data's
    folder and ``extra`` settings are added."""
    saved = load_checkpoint(str(model_file))["config"]
    spec = resolve_model(saved.get("model_label") or saved["model"])
    if data_folder is not None and not (data_folder / saved["dataset"]).is_dir():
        raise FileNotFoundError(f"data folder {data_folder / saved['dataset']} does not exist")
    folder = data_folder or Path(saved["data_path"]).parent
    if not (folder / saved["dataset"]).is_dir():
        if spec.needs_stage1:
            raise FileNotFoundError(f"{model_file} was trained on the Stage-I artifact {folder / saved['dataset']}, "
                                    "which is not here: run Stage I again with the same settings")
        folder = None  # the data moved: look for the dataset where a run would
    defaults = plain_config(ProjectConfig(spec, saved["dataset"], data_folder=folder))
    form = {k: v for k, v in trained_form(saved).items() if k in defaults}  # this model's architecture keys
    overrides = {k: v for k, v in {**saved, **form}.items() if k not in MACHINE_KEYS and defaults.get(k, object()) != v}
    overrides.update(extra or {})
    return spec, ProjectConfig(spec, saved["dataset"], (), overrides, data_folder=folder)


def load_data_and_model(model_file: str | Path, extra: Mapping[str, Any] | None = None):
    """``(config, model, dataset, train_data, valid_data, test_data)`` of a checkpoint the runner
    saved, with the best weights loaded; ``extra`` settings (ranking keys, say) on top of its own."""
    data = load_checkpoint_data(model_file, extra)
    return data.config, load_model(model_file, data), data.dataset, data.train, data.valid, data.test


def load_checkpoint_data(model_file: str | Path, extra: Mapping[str, Any] | None = None) -> Run:
    """The dataset and loaders of the run that saved ``model_file``, built from its settings with
    ``extra`` on top, as that run built them."""
    spec, config = checkpoint_config(model_file, extra=extra)
    start_log(config)
    return load_data(spec, config)


def load_model(model_file: str | Path, data: Run) -> torch.nn.Module:
    """A fresh model of ``data``'s run holding the checkpoint's best weights. ``data.config`` may
    differ from the checkpoint's settings in ranking keys (the model's ``RANKING_KEYS``), so one
    loaded dataset serves a trained model ranked several ways without being built again."""
    model = data.model()
    SafeTrainer(data.config, model).load_best(str(model_file))
    return model
