"""The checkout the tests run from: commands are started at its root, as a user starts them."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
