"""Tiny embedded assets (synthetic task, tokenizer, teacher, student) and the script that builds them.

Built outputs live in ``pipeline/assets/tiny/``; rebuild with ``python -m pipeline.assets.build_tiny``.
"""

from pathlib import Path

TINY_ASSETS_DIR = Path(__file__).resolve().parent / "tiny"
