"""Model names -> model classes: ours, RecBole's built-in ones, and the named variants of
``properties/variants.yaml`` (a label, the model it runs and the keys it overrides)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from recbole.utils import get_model

from recbole_prorec.config import PROPERTIES, load_yaml
from recbole_prorec.prorec import PRORec
from recbole_prorec.prorec_din import PRORecDIN
from recbole_prorec.sasrec_bce import SASRecBCE

# Importing RecBole's sequential models (sasrec_bce.py does, and get_model imports from the same
# package) runs SINE's module, which calls torch.autograd.set_detect_anomaly(True): a debugging
# switch that roughly doubles every backward pass. Those modules run once per process, so the
# switch is turned off once, here, after them.
torch.autograd.set_detect_anomaly(False)

# Model modules are imported here directly, so they must never import registry or build (a cycle).
OWN_MODELS: dict[str, type] = {m.__name__: m for m in (PRORec, PRORecDIN, SASRecBCE)}


@dataclass(frozen=True)
class ModelSpec:
    """A runnable model: the label shown in tables, its class and the variant's overrides."""

    label: str
    model_class: type
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.model_class.__name__

    @property
    def needs_stage1(self) -> bool:
        """Whether the model reads Stage I's artifact (its class says so: ``needs_stage1 = True``)."""
        return getattr(self.model_class, "needs_stage1", False)


def variants() -> dict[str, dict]:
    return load_yaml(PROPERTIES / "variants.yaml")


def model_class(name: str) -> type:
    """Our own model classes by name, else RecBole's built-in ones."""
    if name in OWN_MODELS:
        return OWN_MODELS[name]
    try:
        return get_model(name)
    except (ValueError, ImportError):  # RecBole tries its lightgbm/xgboost modules last
        known = sorted(set(OWN_MODELS) | set(variants()))
        raise ValueError(
            f"unknown model '{name}': neither one of ours or a named variant ({', '.join(known)}) "
            "nor a RecBole built-in model (see recbole.model)"
        ) from None


def resolve_model(label: str) -> ModelSpec:
    """Turn a ``--model`` value (a model name or a variant from variants.yaml) into a spec."""
    table = variants()
    if label in table:
        overrides = dict(table[label])
        base = overrides.pop("model", None)
        if base is None:
            raise ValueError(f"variant '{label}' in {PROPERTIES / 'variants.yaml'} lacks 'model'")
        return ModelSpec(label, model_class(base), overrides)
    return ModelSpec(label, model_class(label))
