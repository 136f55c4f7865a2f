"""The `retrieval` command: the click group (group.py) and its commands, one module per area, each imported
when one of its commands runs (group.COMMAND_MODULES).

Heavy modules are imported inside commands so `--help` and `info` stay instant."""

from retrieval.cli.group import main

__all__ = ["main"]
