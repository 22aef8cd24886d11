"""Shared pytest set-up: make the repository root importable (so plain `pytest tests` works as
well as `python -m pytest tests`). Fixtures belong in the test file that uses them."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
