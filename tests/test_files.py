"""atomic_file: a target is replaced whole or left as it was."""
from contextlib import ExitStack

import numpy as np
import pytest

from recbole_prorec.files import atomic_file


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "ledger.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_file(target) as f:
            f.write("half of the new")
            raise RuntimeError("mid-write")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]  # the temp file is gone
    with atomic_file(target) as f:
        f.write("new")
    assert target.read_text(encoding="utf-8") == "new" and oct(target.stat().st_mode & 0o777) == "0o644"


def test_binary_files_and_new_folders(tmp_path):
    target = tmp_path / "cache" / "emb.npy"
    with atomic_file(target, binary=True) as f:
        np.save(f, np.arange(3.0))
    assert np.load(target).tolist() == [0.0, 1.0, 2.0]


def test_files_entered_together_are_replaced_only_when_all_are_written(tmp_path):
    first, second = tmp_path / "a.inter", tmp_path / "a.item"
    first.write_text("old inter", encoding="utf-8")
    with pytest.raises(ValueError, match="bad row"):
        with ExitStack() as stack:
            stack.enter_context(atomic_file(first)).write("new inter")
            stack.enter_context(atomic_file(second)).write("new item")
            raise ValueError("bad row")
    assert first.read_text(encoding="utf-8") == "old inter" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.inter"]
