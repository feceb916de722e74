"""PRORec (progressive collaborative and semantic knowledge fusion) as a RecBole plugin.

The paper's later version is titled UNGER ("Generative Recommendation with A Unified Code via
Semantic and Collaborative Integration", arXiv 2502.06269, ACM TOIS). RecBole-style use:

    from recbole_prorec import run, load_data_and_model
    result = run("PRORec", "ml-100k")
"""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# the public API, after PROJECT_ROOT: its modules read it
from recbole_prorec.prorec import PRORec  # noqa: E402
from recbole_prorec.prorec_din import PRORecDIN  # noqa: E402
from recbole_prorec.quick_start import Config, load_data_and_model, run  # noqa: E402
from recbole_prorec.sasrec_bce import SASRecBCE  # noqa: E402

__all__ = ["Config", "PRORec", "PRORecDIN", "SASRecBCE", "load_data_and_model", "run"]
