"""RecBole's recipe for a run, written once: config -> seed -> dataset -> loaders -> model.

The runner, Stage I, the tests and the benchmarks all build through here, so a seed, a column
check or a device move is never missing from one of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from recbole.data import create_dataset, data_preparation
from recbole.data.dataset import Dataset
from recbole.utils import init_seed

from recbole_prorec.artifact import require_codes
from recbole_prorec.config import ProjectConfig
from recbole_prorec.data import check_columns, check_rows, check_split, drop_last_interactions
from recbole_prorec.registry import ModelSpec


@dataclass
class Run:
    """A configured run's data: the dataset and RecBole's three loaders."""

    spec: ModelSpec
    config: ProjectConfig
    dataset: Dataset
    train: Any
    valid: Any
    test: Any

    def model(self) -> torch.nn.Module:
        """A fresh model on the run's device, seeded per rank as RecBole's quick start does."""
        init_seed(self.config["seed"] + self.config["local_rank"], self.config["reproducibility"])
        return self.spec.model_class(self.config, self.train._dataset).to(self.config["device"])


def load_data(spec: ModelSpec, config: ProjectConfig) -> Run:
    """Check the columns ``load_col`` names, then build the dataset (less ``drop_last_interactions``)
    and its loaders, seeded."""
    if spec.needs_stage1:
        require_codes(Path(config["data_path"]), config["dataset"])
    folder = Path(config["data_path"])
    check_columns(folder.parent, config["dataset"], config["load_col"])
    if not spec.needs_stage1:  # a Stage-I artifact copies source files Stage I checked row by row
        for suffix, unique in (("inter", None), ("item", config["ITEM_ID_FIELD"])):
            if (folder / f"{config['dataset']}.{suffix}").is_file():
                check_rows(folder / f"{config['dataset']}.{suffix}", unique)
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    drop_last_interactions(data, config["drop_last_interactions"])
    check_split(data, config)
    train, valid, test = data_preparation(config, data)
    return Run(spec, config, data, train, valid, test)


def build(
    spec: ModelSpec,
    dataset: str,
    config_files: Sequence[str | Path] = (),
    overrides: Mapping[str, Any] | None = None,
    data_folder: Path | None = None,
) -> Run:
    """Config, dataset and loaders of one run (``run.model()`` then makes its model)."""
    return load_data(spec, ProjectConfig(spec, dataset, config_files, overrides, data_folder=data_folder))
