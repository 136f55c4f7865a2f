"""The `retrieval` command: the click group (group.py) and its commands, one module per area, each imported
when one of its commands runs (group.COMMAND_MODULES).

Heavy modules are imported inside commands so `--help` and `info` stay instant. `main` is the click group
(what tests and embedders invoke); `run` is the console script around it."""

from retrieval.cli.group import main, run

__all__ = ["main", "run"]
