"""Shared helpers of the benchmark scripts: where we ran, timing, peak memory, CLI, tables,
and a synthetic RecBole atomic dataset that real models can be built on.

Nothing here asserts a timing; the scripts print what they measure.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np  # noqa: E402
import torch  # noqa: E402

# RecBole 1.2.1 triggers pandas FutureWarnings on every dataset load
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the root
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment() -> dict[str, str]:
    """CPU model, core count, torch version, GPU name (if any), Python version."""
    env = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["gpu"] = "none"
    try:
        load = os.getloadavg()[0]
        env["load avg (1 min)"] = f"{load:.2f}"
        if load > 0.5 * (os.cpu_count() or 1):
            env["note"] = "other processes are using the CPU: timings are contended"
    except OSError:
        pass
    return env


def environment_line() -> str:
    return "environment: " + "; ".join(f"{k}: {v}" for k, v in environment().items())


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float  # seconds
    times: list[float]

    @property
    def ms(self) -> float:
        return self.median * 1e3


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    warmup: int = 1,
    repeats: int = 3,
    min_time: float = 0.0,
    max_repeats: int = 50,
) -> Timing:
    """Median wall time of ``fn()`` after ``warmup`` calls (GPU synchronised around each call).

    Runs at least ``repeats`` calls, and more (up to ``max_repeats``) until ``min_time`` seconds
    were measured, so millisecond calls get a stable median.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < min_time and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), times)


# --------------------------------------------------------------------------- memory


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux fallback: resident pages from /proc/self/statm
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so RSS growth is measurable."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory growth (bytes) of a block of code.

    GPU: ``torch.cuda.max_memory_allocated`` minus the allocation at entry (exact, torch tensors
    only). CPU: the process RSS is sampled every ``interval`` seconds by a thread and the peak
    minus the RSS at entry is reported (freed heap is trimmed first, so memory reused from an
    earlier block is not hidden); ``getrusage``'s max RSS cannot be reset, so it would only show
    growth beyond the process's earlier peak. Includes allocator overhead; a spike shorter than
    ``interval`` may be missed.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        _release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss()
        self._max = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._max = max(self._max, _rss())
        self._stop.set()
        self._thread.join()
        self.peak = self._max - self._base

    @property
    def mib(self) -> float:
        return self.peak / 2**20


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- command line and output


def base_parser(description: str) -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, finishes in < 2 min on 2 CPU cores")
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument("--out", default=None, help="also write the Markdown report to this file")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads (default: torch's, i.e. all cores; 1 in --quick mode, since on a "
        "machine where another job is busy, multi-threaded torch spin-waits and runs many times slower)",
    )
    return parser


def quiet_progress() -> None:
    """Silence tqdm progress bars (k-means, encoder, weight loading): they would drown the tables.

    torch imports tqdm, which reads ``TQDM_DISABLE`` only at import, so the default is patched too.
    """
    import functools

    import tqdm.std

    os.environ["TQDM_DISABLE"] = "1"
    if not getattr(tqdm.std.tqdm, "_benchmarks_quiet", False):
        tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
        tqdm.std.tqdm._benchmarks_quiet = True


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` (1 by default in quick mode), silence progress bars, validate ``--device``."""
    quiet_progress()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device


def thread_limit(args: argparse.Namespace):
    """Hold OpenMP/BLAS pools (sklearn's k-means) to torch's thread count when one was imposed."""
    if not (args.threads or args.quick):
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads())


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Collects printed sections; ``save`` writes them as one Markdown file."""

    def __init__(self, title: str, command: Sequence[str] | None):
        self.parts = [f"# {title}", "", f"`python {shlex.join(command or [])}`", "", environment_line(), ""]
        print(self.parts[-2], flush=True)

    def add(self, text: str) -> None:
        print(text + "\n", flush=True)
        self.parts += [text, ""]

    def save(self, out: str | None) -> None:
        if out:  # whole or not at all: an earlier table survives a failed write
            from recbole_prorec.files import atomic_file

            with atomic_file(out) as f:
                f.write("\n".join(self.parts))
            print(f"report written to {out}")


def fmt(x: float, digits: int = 1) -> str:
    """Fixed-point with thousands separators for large values."""
    if x != x:  # NaN
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


# --------------------------------------------------------------------------- synthetic RecBole dataset

SYNTHETIC_OVERRIDES: dict[str, Any] = {
    # the synthetic set has no dataset YAML: name the fields and switch every filter off
    "USER_ID_FIELD": "user_id",
    "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)",
    "item_inter_num_interval": "[0,inf)",
    "show_progress": False,
}


def write_synthetic_dataset(
    root: Path,
    name: str,
    n_items: int,
    codes: Sequence[Sequence[int]] | None = None,
    integrated: np.ndarray | None = None,
    semantic: np.ndarray | None = None,
    seq_len: int = 10,
    seed: int = 0,
) -> Path:
    """Write ``root/name/name.inter`` (+ ``.item``, embeddings) and return ``root``.

    Users hold ``seq_len`` consecutive items each, so every item occurs exactly once and items
    first appear in the order 1..n_items: RecBole's internal item ids then equal the .item row
    order, and every embedding file below is aligned both ways. ``codes`` (one per item) become
    the ``unicode:token_seq`` column; ``integrated`` is written as Stage I's ``.emb.npy`` (for
    IKD); ``semantic`` as ``.sem.npy`` (pass it as ``semantic_embedding_file``).
    """
    from recbole_prorec.artifact import UNICODE_FIELD, embedding_files

    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens = [f"i{i}" for i in range(1, n_items + 1)]
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for start in range(0, n_items, seq_len):
        user = f"u{start // seq_len}"
        # a short history is padded with random earlier items so each user has >= 3 events
        items = list(range(start, min(start + seq_len, n_items)))
        while len(items) < 3:
            items.insert(0, int(rng.integers(0, max(1, start))))
        lines += [f"{user}\t{tokens[i]}\t{t}" for t, i in enumerate(items)]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    header = "item_id:token" + (f"\t{UNICODE_FIELD}:token_seq" if codes is not None else "")
    rows = [header]
    for i, token in enumerate(tokens):
        rows.append(token + (("\t" + " ".join(map(str, codes[i]))) if codes is not None else ""))
    (folder / f"{name}.item").write_text("\n".join(rows) + "\n", encoding="utf-8")
    if integrated is not None:
        emb_file, items_file = embedding_files(folder, name)
        np.save(emb_file, integrated.astype(np.float32))
        items_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    if semantic is not None:
        np.save(folder / f"{name}.sem.npy", semantic.astype(np.float32))
    return Path(root)


def project_config(label: str, root: Path, name: str, overrides: Mapping[str, Any] | None = None):
    """Our ``ProjectConfig`` of model/variant ``label`` for the synthetic dataset ``root/name``."""
    from recbole_prorec.config import ProjectConfig
    from recbole_prorec.registry import resolve_model

    return ProjectConfig(resolve_model(label), name, [], {**SYNTHETIC_OVERRIDES, **(overrides or {})},
                         data_folder=Path(root))


def load_run(label: str, root: Path, name: str, overrides: Mapping[str, Any] | None = None):
    """Config, dataset and loaders of model ``label`` on the atomic dataset ``root/name``, built as
    the runner builds them (``.model()`` makes the model)."""
    from recbole_prorec.build import build
    from recbole_prorec.registry import resolve_model

    # built on the CPU (RecBole would start CUDA where there is one); callers move the model
    overrides = {**SYNTHETIC_OVERRIDES, "gpu_id": "", **(overrides or {})}
    return build(resolve_model(label), name, [], overrides, data_folder=Path(root))


def random_histories(n: int, n_items: int, max_len: int, device: torch.device | str, seed: int = 0):
    """(item_seq [n, max_len] left-aligned, lengths [n]) of random real items (ids 1..n_items-1)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen)
    seq = torch.randint(1, n_items, (n, max_len), generator=gen)
    seq = seq.masked_fill(torch.arange(max_len)[None] >= lengths[:, None], 0)
    return seq.to(device), lengths.to(device)


def sequential_batch(model, n: int, device: torch.device | str, seed: int = 0, with_target: bool = False):
    """A RecBole ``Interaction`` of ``n`` random users for any SequentialRecommender ``model``."""
    from recbole.data.interaction import Interaction

    seq, lengths = random_histories(n, model.n_items, model.max_seq_length, device, seed)
    data = {model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths}
    if with_target:
        gen = torch.Generator().manual_seed(seed + 1)
        data[model.POS_ITEM_ID] = torch.randint(1, model.n_items, (n,), generator=gen).to(device)
    return Interaction(data)


# --------------------------------------------------------------------------- runs through the runner

# Quick mode: the 305 ml-100k users with at most 40 ratings (~8k interactions after RecBole's
# 5-core item filter), tiny models, one epoch each, and PRORec's Stage I cut to one epoch.
QUICK = {
    "user_inter_num_interval": "[20,41)",  # not "[20,40]": RecBole eval()s that into a list
    "epochs": 1,
    "train_time_budget": 20,
    "hidden_size": 32,
    "inner_size": 64,
    "n_heads": 2,
    "n_layers": 1,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "warmup_steps": 10,
    "stage1": {"epochs": 1, "train_batch_size": 256, "learning_rate": 0.005, "eval_step": 0},
}


def parse_value(text: str) -> Any:
    """``--set key=value`` values: YAML scalars/lists/dicts (``32``, ``[1,2]``, ``{a: 1}``)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by the scripts that train models through ``recbole_prorec.runner.run``."""
    parser.add_argument("--config_files", default="", help="comma-separated YAML files for every model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every model (repeatable), e.g. --set hidden_size=64")
    parser.add_argument("--log-level", default=None, help="RecBole log level (default info; quick warning)")


def run_overrides(args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device):
    """Config overrides for every run: quiet progress, the device, quick mode's tiny settings
    (with a temporary folder for all outputs, returned so the caller can clean it up) and ``--set``."""
    import tempfile

    level = args.log_level or ("warning" if args.quick else "info")
    overrides: dict[str, Any] = {"show_progress": False, "state": level}
    if device.type == "cpu":
        overrides["gpu_id"] = ""  # RecBole 1.2.1 picks CUDA whenever gpu_id is set and a GPU exists
    tmp = tempfile.TemporaryDirectory(prefix="prorec-bench-") if args.quick else None
    if args.quick:
        overrides.update(QUICK)
        # a fresh Stage I and no files left behind in saved/
        overrides.update(unicode_dir=f"{tmp.name}/unicode", checkpoint_dir=f"{tmp.name}/saved",
                         semantic_cache_dir=f"{tmp.name}/semantic_cache")
    overrides.update(parse_settings(args.set, parser, "--set"))
    return overrides, tmp


def encoder_settings(spec: str) -> dict[str, Any]:
    """Config keys of one ``--encoders`` entry: a ``.npy`` file of embeddings, or a Hugging Face name or
    local folder with an optional ``:pooling`` (``NAME:last`` for decoder LLMs)."""
    from recbole_prorec.semantic import POOLINGS

    if spec.endswith(".npy"):
        return {"semantic_embedding_file": spec}
    encoder, _, pooling = spec.rpartition(":")
    if encoder and pooling in POOLINGS:
        return {"semantic_encoder": encoder, "semantic_pooling": pooling}
    return {"semantic_encoder": spec}


def parse_settings(items: Sequence[str], parser: argparse.ArgumentParser, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` strings of ``flag`` as config overrides, each value parsed as YAML would."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"{flag} expects KEY=VALUE, got {item!r}")
        settings[key] = parse_value(value)
    return settings
