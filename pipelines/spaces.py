"""Moved: the space's schema is ``weit_core.space``, its trials ``weit_core.trials``; these names stay importable
from here for callers not yet moved."""

from weit_core.sizes import TaskShape, check_size  # noqa: F401
from weit_core.space import load_space, parse_space  # noqa: F401
from weit_core.trials import expand, inspect_tasks, size_points  # noqa: F401
