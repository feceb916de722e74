"""PRORec (progressive collaborative and semantic knowledge fusion) as a RecBole plugin."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
