"""The click group of the `retrieval` command: one-line errors, the --index option. Commands only parse, call
the Python API and print.

Heavy modules are imported inside commands so `--help` and `info` stay instant.
"""

from __future__ import annotations

import os
import sys

import click

INDEX_HELP = (
    "Index directory, or a postgresql://USER@HOST/DB[?collection=NAME] URL. Default: $RETRIEVAL_INDEX, else "
    "~/.local/share/retrieval/default."
)


# Each command's module, imported when the command is run (or help lists them): a search does not pay for
# defining the other commands' ~150 options (click cleans every help text as it is defined).
COMMAND_MODULES = {
    "index": "retrieval.cli.indexing",
    "search": "retrieval.cli.searching",
    **dict.fromkeys(
        ("info", "verify", "copy", "duplicates", "benchmark", "serve", "train-fusion"), "retrieval.cli.manage"
    ),
}


class Cli(click.Group):
    """Turns user errors into one line on stderr and exit code 2; --debug keeps tracebacks. Commands are
    loaded from COMMAND_MODULES on first use."""

    def list_commands(self, ctx):
        return sorted(set(COMMAND_MODULES) | set(self.commands))

    def get_command(self, ctx, cmd_name):
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            import importlib

            importlib.import_module(COMMAND_MODULES[cmd_name])  # registers its commands on main
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx):
        from retrieval.errors import RetrievalError

        try:
            return super().invoke(ctx)
        except RetrievalError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a dropped PostgreSQL connection anywhere in a command: one line, not a traceback
            mapped = _database_error(e)
            if mapped is None or (ctx.obj and ctx.obj.get("debug")):
                raise
            click.echo(f"error: {mapped}", err=True)
            ctx.exit(mapped.exit_code)


def _database_error(e: BaseException):
    """A psycopg error as its one line, or None; never imports psycopg (it is loaded only for a collection)."""
    import sys

    if "psycopg" not in sys.modules:
        return None
    from retrieval.store.pg.connect import command_error

    return command_error(e)


def index_option(f):
    return click.option(
        "--index",
        "index_dir",
        type=click.Path(file_okay=False),
        default=None,
        envvar="RETRIEVAL_INDEX",
        help=INDEX_HELP,
    )(f)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx, debug):
    """Search your photos by sentence, by example image, or both — offline, on your machine."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


_leave_fast = False


def leave_fast() -> None:
    """Called by a read-only command once its output is written: the process then ends without the
    interpreter's teardown (freeing the model session, the vector index and every module), which costs a cold
    query ~50 ms and changes nothing it wrote. Only `run` acts on it, so in-process callers are unaffected."""
    global _leave_fast
    _leave_fast = True


def run() -> None:
    """The `retrieval` console script: the click group, then, for a command that asked (leave_fast), an
    immediate exit once stdout and stderr are flushed."""
    try:
        main(prog_name="retrieval")
        code = 0
    except SystemExit as e:
        code = e.code
    if not (_leave_fast and isinstance(code, (int, type(None)))):
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # `| head`: the reader has what it wanted
            pass
        except (OSError, ValueError) as e:  # a full disk, say: the results are not all written
            if stream is sys.stdout and (code or 0) in (0, 1):
                code = 2
                try:
                    sys.stderr.write(f"error: {unwritable(e)}\n")
                    sys.stderr.flush()
                except (OSError, ValueError):
                    pass
    os._exit(code or 0)


def unwritable(e: Exception) -> str:
    """The one line for results that could not be written to stdout (a full disk, say)."""
    return f"cannot write the results: {getattr(e, 'strerror', None) or e}"
