"""Resident memory (RSS) of one run through the runner, phase by phase and epoch by epoch.

A thread samples the process's RSS; the run's phases (imports, Stage I, dataset and loaders, model,
each training epoch, each validation, the test) are marked by wrapping the runner's functions, and
each row gives the RSS when the phase ended and the highest RSS seen during it. The last row is the
kernel's own peak (VmHWM). Growth from epoch to epoch shows as a rising "after" column.

    python benchmarks/memory.py --dataset ml-100k --model PRORec --out docs/memory_ml-100k.md   # the README's command
    python benchmarks/memory.py --dataset Amazon_Beauty --model PRORec --set epochs=3 --out docs/memory_beauty.md
    python benchmarks/memory.py --quick
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Report, _rss, add_run_arguments, base_parser, markdown_table, run_overrides, setup  # noqa: E402

MIB = 2**20


class RssTrace:
    """RSS sampled every ``interval`` seconds; ``phase`` records the RSS at a phase's end and its peak."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.rows, self._peak, self._depth = interval, [], _rss(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssTrace":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @contextmanager
    def phase(self, name: str, nested: bool = True):
        """One row, in the order phases start, indented under the phase it runs in; ``nested=False``
        keeps no row when it runs inside another phase (the test's evaluate inside a validation)."""
        if self._depth and not nested:
            yield
            return
        row = len(self.rows)
        self.rows.append(None)
        self._depth += 1
        self._peak, start = _rss(), time.monotonic()
        try:
            yield
        finally:
            self._depth -= 1
            after = _rss()
            self.rows[row] = ("· " * self._depth + name, after / MIB, max(self._peak, after) / MIB, time.monotonic() - start)

    def traced(self, owner, attribute: str, name: Callable[..., str], nested: bool = True) -> None:
        """Wrap ``owner.attribute`` so that each call is one phase named ``name(*args)``."""
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            with self.phase(name(*args), nested):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapper)


def kernel_peak() -> float:
    """The process's peak RSS in MiB as the kernel counts it (VmHWM)."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def main(argv: Sequence[str] | None = None) -> list[tuple]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="PRORec")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    imported = _rss() / MIB
    device = setup(args)
    overrides, tmp = run_overrides(args, parser, device)
    from recbole_prorec import runner
    from recbole_prorec.trainer import SafeTrainer

    trace = RssTrace()
    trace.rows.append(("start and imports", imported, imported, 0.0))
    trace.traced(runner, "stage1_folder", lambda *a: "Stage I (or its cached output)")
    trace.traced(runner, "load_data", lambda *a: "dataset and loaders")
    trace.traced(runner.Run, "model", lambda *a: "model")
    trace.traced(SafeTrainer, "_train_epoch", lambda self, data, epoch, *a, **k: f"training epoch {epoch}")
    trace.traced(SafeTrainer, "_valid_epoch", lambda self, *a, **k: f"validation after epoch {self._epoch}")
    trace.traced(SafeTrainer, "evaluate", lambda *a, **k: "test", nested=False)
    files = [f for f in args.config_files.split(",") if f]
    try:
        with trace:
            runner.run(args.model, args.dataset, files, overrides)
    finally:
        if tmp:
            tmp.cleanup()
    rows = trace.rows
    report = Report(f"Memory of {args.model} on {args.dataset}",
                    ["benchmarks/memory.py", *(sys.argv[1:] if argv is None else argv)])
    table = [(name, f"{after:,.0f}", f"{peak:,.0f}", f"{seconds:.1f}") for name, after, peak, seconds in rows]
    table.append(("whole process (kernel's VmHWM)", "", f"{kernel_peak():,.0f}", ""))
    report.add("RSS in MiB at the end of each phase and its highest sample during it (every 50 ms).\n\n"
               + markdown_table(["phase", "RSS after", "peak during", "seconds"], table))
    report.save(args.out)
    return rows


if __name__ == "__main__":
    main()
