"""Moved: the space's schema is ``weit_core.space``, its trials ``weit_core.trials``; these names stay importable
from here for callers not yet moved (tests/test_cli.py, benchmarks/sweep_overhead.py)."""

from weit_core.space import load_space, parse_space  # noqa: F401
from weit_core.trials import expand, inspect_tasks  # noqa: F401
