"""A user's own families and tasks: modules named in ``WEIT_PLUGINS`` are imported before any registry
lookup, so a new architecture or task is one file that calls ``register_family`` / ``register``.

The variable is read in every process that looks a name up — the CLI driver and each Ray worker (which
inherit the driver's environment on a local cluster; pass it in the job's ``env_vars`` on a remote one).
"""

from __future__ import annotations

import importlib
import os

ENV = "WEIT_PLUGINS"
_imported: set[str] = set()


def load_plugins() -> None:
    """Import each comma-separated module of ``$WEIT_PLUGINS`` once; a name that does not import is a
    ValueError that says how to fix it."""
    for name in (s.strip() for s in os.environ.get(ENV, "").split(",")):
        if not name or name in _imported:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"{ENV} names module {name!r}, which does not import ({e}); put its folder on "
                             "PYTHONPATH or correct the name") from e
        _imported.add(name)
