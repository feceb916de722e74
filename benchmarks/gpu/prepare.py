"""Pack what ``benchmarks/gpu/converged.sh`` needs on a bare GPU machine into ``.carry/`` (ignored).

The lent H200 has Python 3.12, a CUDA torch and NumPy 2 (its SciPy needs it; ``ProjectConfig`` makes
RecBole run on it) but neither recbole, pandas<2.3 nor our text encoder, and nothing can be downloaded
there. This writes, in the repository root:

- ``.carry/wheels/``: cp312 manylinux wheels of recbole 1.2.1 and those of its imports the machine
  lacks (``pip download``, so it needs the package registry here);
- ``.carry/datasets/<dataset>/``: the dataset's atomic files, gzipped;
- ``.carry/<dataset>.semantic.npy``: its item-text embeddings in ``.item`` row order, from our
  encoder (cached runs reuse ``saved/semantic_cache``), so the machine needs no encoder.

    python benchmarks/gpu/prepare.py --dataset Amazon_Beauty
then, with a device machine: run ``bash benchmarks/gpu/converged.sh`` carrying ``.carry``.
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CARRY = ROOT / ".carry"
# what recbole_prorec imports and the machine's image lacks, in versions recbole 1.2.1 accepts
WHEELS = ["recbole==1.2.1", "pandas==2.2.3", "pytz==2025.2", "tzdata==2025.2", "colorlog==6.9.0",
          "texttable==1.7.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]
LIMIT_MIB = 64  # the device tool carries the working tree plus carried paths up to this size


def download_wheels(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(target), *WHEELS],
                   check=True)


def pack_dataset(dataset: str, target: Path) -> Path:
    """Gzipped copies of the atomic files; returns the source folder."""
    sys.path.insert(0, str(ROOT))
    from recbole_prorec.data import find_dataset, search_folders

    source = Path(find_dataset(dataset, search_folders(None, ["dataset/", "../shared/datasets/"]))) / dataset
    (target / dataset).mkdir(parents=True, exist_ok=True)
    for suffix in ("inter", "item"):
        with open(source / f"{dataset}.{suffix}", "rb") as f, gzip.open(target / dataset / f"{dataset}.{suffix}.gz", "wb") as g:
            shutil.copyfileobj(f, g)
    return source


def export_embeddings(dataset: str, source: Path, out: Path) -> None:
    """The semantic embeddings PRORec's Stage I would compute, one row per ``.item`` row."""
    from recbole_prorec.prorec_din import PRORecDIN, semantic_embeddings
    from recbole_prorec.config import ProjectConfig
    from recbole_prorec.registry import ModelSpec
    from recbole_prorec.semantic import read_item_table

    config = ProjectConfig(ModelSpec("PRORecDIN", PRORecDIN), dataset, (), {"show_progress": False, "gpu_id": ""})
    item_file = source / f"{dataset}.item"
    tokens = list(read_item_table(item_file, config["ITEM_ID_FIELD"])[config["ITEM_ID_FIELD"]])
    np.save(out, semantic_embeddings(config, item_file, tokens).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="Amazon_Beauty")
    parser.add_argument("--no-wheels", action="store_true", help="skip the download (tests, or wheels already there)")
    args = parser.parse_args()
    if not args.no_wheels:
        download_wheels(CARRY / "wheels")
    source = pack_dataset(args.dataset, CARRY / "datasets")
    export_embeddings(args.dataset, source, CARRY / f"{args.dataset}.semantic.npy")
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file()) / 2**20
    print(f".carry holds {size:.1f} MiB (the tree and the carried paths together must stay under {LIMIT_MIB} MiB)")


if __name__ == "__main__":
    main()
