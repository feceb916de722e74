"""The dataset YAMLs load the shared Amazon copies with the statistics of SOURCES.md."""
import pytest
from recbole.data import create_dataset

from recbole_prorec import PROJECT_ROOT
from recbole_prorec.config import ProjectConfig
from recbole_prorec.registry import resolve_model
from recbole_prorec.data import check_columns, statistics, statistics_table

SHARED = PROJECT_ROOT.parent / "shared" / "datasets"
EXPECTED = {  # users, items, interactions from ../shared/datasets/SOURCES.md
    "Amazon_Beauty": (22363, 12101, 198502),
    "Amazon_Toys_and_Games": (19412, 11924, 167597),
    "Amazon_Sports_and_Outdoors": (35598, 18357, 296337),
}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(
        not (SHARED / name / f"{name}.inter").is_file(), reason=f"{SHARED / name} is absent on this machine"))
    for name in sorted(EXPECTED)
])
def test_shared_dataset_statistics(name, tmp_path):
    config = ProjectConfig(
        resolve_model("SASRec"), name, overrides={"data_path": str(SHARED), "checkpoint_dir": str(tmp_path)}
    )
    check_columns(SHARED, name, config["load_col"])
    stats = statistics(create_dataset(config))
    assert (stats["users"], stats["items"], stats["interactions"]) == EXPECTED[name]
    assert stats["density"] == pytest.approx(EXPECTED[name][2] / (EXPECTED[name][0] * EXPECTED[name][1]))
    assert f"| {name} | {EXPECTED[name][0]:,} |" in statistics_table(name, stats)


def test_bundled_ml100k_statistics(tmp_path):
    config = ProjectConfig(resolve_model("SASRec"), "ml-100k", overrides={"checkpoint_dir": str(tmp_path)})
    stats = statistics(create_dataset(config))
    assert stats["users"] == 943 and 1300 < stats["items"] < 1682  # 5-core drops rare movies
    assert 0.05 < stats["density"] < 0.08


def test_row_check_reads_quoted_values_as_recbole_does(tmp_path):
    from recbole_prorec.data import check_rows

    path = tmp_path / "x.item"
    path.write_text('item_id:token\ttitle:token_seq\ni1\t"a\ttabbed title"\ni2\tplain\n', encoding="utf-8")
    check_rows(path, "item_id")  # a quoted tab is inside the value, as pandas reads it
    path.write_text("item_id:token\ttitle:token_seq\ni1\ta\tb\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.item, line 2: 3 fields where the header has 2"):
        check_rows(path, "item_id")
