"""`python cli.py ...` runs the `retrieval` command; the command itself lives in retrieval/cli/ (`main` is the
click group, `run` the console script around it)."""

from retrieval.cli import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    run()
