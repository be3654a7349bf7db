"""Moved to ``mmconvmlp/engine/`` (one module per job). Kept only until
``tools/demo_pictures.py`` and ``tests/test_checkpoints.py`` drop ``checkpoint_globals``,
which importing mmconvmlp has made unnecessary."""
from .engine.safe_loading import checkpoint_globals  # noqa: F401
