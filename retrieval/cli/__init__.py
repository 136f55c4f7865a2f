"""The `retrieval` command: the click group (group.py) and its commands, one module per area.

Heavy modules are imported inside commands so `--help` and `info` stay instant."""

from retrieval.cli import indexing, manage, searching  # noqa: F401 - each registers its commands on main
from retrieval.cli.group import main

__all__ = ["main"]
