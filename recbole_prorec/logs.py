"""One RecBole log file per model run, also when one process runs several."""
from __future__ import annotations

import logging

from recbole.utils import init_logger

# Handlers RecBole's init_logger installed for the previous run in this process.
_RUN_HANDLERS: list[logging.Handler] = []


def start_log(config) -> str:
    """RecBole's ``init_logger``, once per run: it relies on ``logging.basicConfig``, a no-op while
    the root logger has handlers, so Stage II would log into Stage I's file and every model of a
    multi-model run into the first model's. The previous run's handlers are closed first.
    Returns the run's log file ('' when RecBole writes none)."""
    root = logging.getLogger()
    for handler in _RUN_HANDLERS:
        root.removeHandler(handler)
        handler.close()
    before = set(root.handlers)
    init_logger(config)
    _RUN_HANDLERS[:] = [h for h in root.handlers if h not in before]
    files = [h.baseFilename for h in _RUN_HANDLERS if isinstance(h, logging.FileHandler)]
    return files[0] if files else ""
