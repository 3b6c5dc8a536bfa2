"""Where the sweep's space machinery used to live: the schema is ``weit_core.space``, the trials
``weit_core.trials``. Kept only for callers that still import from here."""

from weit_core.sizes import TaskShape, check_size  # noqa: F401
from weit_core.space import Space, SpaceError, learning_rates, load_space, parse_space  # noqa: F401
from weit_core.trials import (  # noqa: F401
    Expansion,
    expand,
    inspect_tasks,
    load_task_data,
    size_points,
    spec_of,
    summarize_space,
    trial_key,
)
