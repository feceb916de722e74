"""Layered YAML configuration on top of RecBole's ``Config``.

Layers, lowest priority first: RecBole's internal defaults, ``properties/overall.yaml``
(the paper's protocol), ``properties/model/<model>.yaml``, ``properties/dataset/<dataset>.yaml``,
the named variant in ``properties/variants.yaml``, the user's ``--config_files``, then
``--key=value`` overrides. The ``stage1`` block is merged key by key, not replaced. The dataset
folder is resolved by us (``data.find_dataset``) rather than by RecBole, which would force
``ml-100k`` to its bundled copy and prompt for downloads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np
import recbole
import yaml
from recbole.config import Config

from recbole_prorec import PROJECT_ROOT
from recbole_prorec.data import find_dataset, search_folders
from recbole_prorec.distributed import DDP_KEYS, join_group

if TYPE_CHECKING:
    from recbole_prorec.registry import ModelSpec

PROPERTIES = PROJECT_ROOT / "properties"
RECBOLE_PROPERTIES = Path(recbole.__file__).resolve().parent / "properties"

# Dict-valued keys merged key by key across layers rather than replaced (``--stage1="{'epochs': 5}"``).
MERGED_BLOCKS = ("stage1",)
# YAML files of our models: PRORec also reads Stage I's keys, since it runs Stage I first;
# SASRecBCE starts from RecBole's SASRec defaults, which RecBole looks up by class name only.
MODEL_YAML = {
    "PRORec": [PROPERTIES / "model" / "PRORecDIN.yaml", PROPERTIES / "model" / "PRORec.yaml"],
    "SASRecBCE": [RECBOLE_PROPERTIES / "model" / "SASRec.yaml", PROPERTIES / "model" / "SASRecBCE.yaml"],
}


def load_yaml(path: Path) -> dict:
    """Read a YAML file with RecBole's loader (so ``1e-3`` is a float), naming the file on error."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=Config._build_yaml_loader(None))
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return data


def default_files(model: str, dataset: str) -> list[Path]:
    """The project's YAML layers that exist for this model and dataset (dataset keys win)."""
    files = [PROPERTIES / "overall.yaml"]
    files += MODEL_YAML.get(model, [PROPERTIES / "model" / f"{model}.yaml"])
    files.append(PROPERTIES / "dataset" / f"{dataset}.yaml")
    return [f for f in files if f.is_file()]


_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}


def _kind(value: Any) -> type | None:
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return t
    return None


def check_types(defaults: Mapping[str, Any], given: Mapping[str, Any], source: str) -> None:
    """Refuse a value whose type differs from the documented default (int is fine for float)."""
    for key, value in given.items():
        ref = defaults.get(key)
        if ref is None or value is None:
            continue
        want, got = _kind(ref), _kind(value)
        if want is None or got == want or (want is float and got is int):
            continue
        if want is list and got is tuple:
            continue
        raise ValueError(
            f"config key '{key}' from {source} must be {_TYPE_NAMES[want]} "
            f"(default {ref!r}), got {_TYPE_NAMES.get(got, type(value).__name__)} {value!r}"
        )


class ProjectConfig(Config):
    """RecBole's Config with our layers, our data folder, CPU-capable DDP and type checks."""

    def __init__(
        self,
        spec: ModelSpec,
        dataset: str,
        config_files: Iterable[str | Path] = (),
        overrides: Mapping[str, Any] | None = None,
        data_folder: Path | None = None,
        apply_block: str | None = None,
    ):
        """``apply_block`` (one of ``MERGED_BLOCKS``) lays that block's keys over every layer,
        as Stage I does with ``stage1``."""
        self._apply_block = apply_block
        self._cli_overrides = dict(overrides or {})
        self._data_folder = data_folder
        self._user_files = [Path(f) for f in config_files]
        for f in self._user_files:
            if not f.is_file():
                raise FileNotFoundError(f"config file not found: {f} (from --config_files)")
        files = default_files(spec.name, dataset)
        project = [load_yaml(f) for f in files]
        self._project_defaults = {k: v for layer in project for k, v in layer.items()}
        # the variant sits between the project's files and the user's: --config_files may amend it
        self._user_layers = {str(f): load_yaml(f) for f in self._user_files}  # read once
        self._layers = [*project, dict(spec.overrides), *self._user_layers.values()]
        super().__init__(
            model=spec.model_class,
            dataset=dataset,
            config_file_list=[str(f) for f in files],
            config_dict={k: v for layer in self._layers[len(project):] for k, v in layer.items()},
        )
        self.final_config_dict["model_label"] = spec.label

    @property
    def known_keys(self) -> set[str]:
        """Keys with a documented default (RecBole's or one of our YAML files), not stray extras."""
        return set(self.internal_config_dict) | set(self._project_defaults)

    def unknown_keys(self) -> list[str]:
        """Keys the user gave (files, command line) that no default documents: likely misspelt."""
        given = {k for layer in self._user_layers.values() for k in layer} | set(self.cmd_config_dict)
        return sorted(given - self.known_keys - set(DDP_KEYS))

    def _load_variable_config_dict(self, config_dict: dict) -> dict:
        # the variant's and the user files' values are typed YAML; RecBole would eval() their strings
        return dict(config_dict or {})

    def _load_cmd_line(self) -> dict:
        # RecBole would parse sys.argv itself; our runner hands over the parsed overrides instead.
        return self._convert_config_dict(dict(self._cli_overrides))

    def _set_default_parameters(self) -> None:
        cfg = self.final_config_dict
        for key in MERGED_BLOCKS:  # a later layer amends these blocks key by key
            blocks = [layer.get(key) for layer in (*self._layers, self.cmd_config_dict)]
            if any(isinstance(b, dict) for b in blocks):
                cfg[key] = {k: v for b in blocks if isinstance(b, dict) for k, v in b.items()}
        self._check_user_types()
        if self._apply_block:
            cfg.update(cfg.get(self._apply_block) or {})
        # CE-trained sequential models need no sampled negatives; RecBole errors unless told so.
        if "train_neg_sample_args" not in self.external_config_dict and cfg.get("loss_type") != "BPR":
            cfg["train_neg_sample_args"] = None
        if not self._dataset_documented():
            cfg["load_col"] = None  # every column of the files, not RecBole's sample.yaml [user_id, item_id]
        extra = getattr(self.model_class, "item_columns", ())
        if extra and cfg.get("load_col") is not None:  # None: RecBole loads every column anyway
            # a new dict: the one in cfg may be the caller's own override, which must stay as given
            load_col = dict(cfg["load_col"])
            load_col["item"] = list(dict.fromkeys([cfg["ITEM_ID_FIELD"], *load_col.get("item", []), *extra]))
            cfg["load_col"] = load_col
        super()._set_default_parameters()
        folder = self._data_folder or find_dataset(
            self.dataset,
            search_folders(self.external_config_dict.get("data_path"), cfg.get("data_search_paths")),
        )
        cfg["data_path"] = str(Path(folder) / self.dataset)

    def check_output_folders(self, keys: Iterable[str] = ("checkpoint_dir", "unicode_dir")) -> None:
        """Each folder a run writes to exists or can be made, and takes files: found before hours
        of training, not after them."""
        for key in keys:
            folder = Path(self[key] or ".")
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as e:
                raise ValueError(f"config key '{key}': {folder} is not a folder this run can write to "
                                 f"({e.strerror})") from None

    def _dataset_documented(self) -> bool:
        """Whether ``load_col`` comes from somewhere that knows this dataset: a YAML file of ours or
        RecBole's for it, a variant, the user's files or command line. A new dataset without one
        would otherwise load only user and item ids and fail on the protocol's timestamp."""
        if "load_col" in self.cmd_config_dict or any("load_col" in layer for layer in self._layers):
            return True
        return (Path(recbole.__file__).parent / "properties" / "dataset" / f"{self.dataset}.yaml").is_file()

    def _check_user_types(self) -> None:
        defaults = dict(self.internal_config_dict)
        defaults.update(self._project_defaults)
        for source, layer in self._user_layers.items():
            check_types(defaults, layer, source)
        check_types(defaults, self.cmd_config_dict, "the command line")
        if self._apply_block:
            check_types(defaults, self.final_config_dict.get(self._apply_block) or {}, f"'{self._apply_block}'")

    def compatibility_settings(self) -> None:
        # RecBole's own version assigns np.float = np.float_ (gone in NumPy 2) and friends; its metrics
        # still read these aliases, so set them from names that NumPy 1 and 2 both have.
        aliases = {"bool": np.bool_, "int": np.int_, "float": np.float64, "complex": np.complex128,
                   "object": np.object_, "str": np.str_, "long": np.int_, "unicode": np.str_}
        for name, value in aliases.items():
            setattr(np, name, value)

    def _init_device(self) -> None:
        # RecBole's DDP hard-codes NCCL and CUDA and cannot join a group torchrun made
        if "local_rank" not in self.final_config_dict:
            super()._init_device()
        else:
            join_group(self.final_config_dict)


_SKIP = object()


def plain_config(config: Config) -> dict:
    """The JSON-like part of a config, safe for ``torch.load(weights_only=True)`` and for hashing."""

    def plain(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            items = [plain(x) for x in v]
            return None if any(x is _SKIP for x in items) else items
        if isinstance(v, dict):
            out = {str(k): plain(x) for k, x in v.items()}
            return {k: x for k, x in out.items() if x is not _SKIP}
        return _SKIP

    out = {k: plain(v) for k, v in config.final_config_dict.items()}
    return {k: v for k, v in out.items() if v is not _SKIP}
