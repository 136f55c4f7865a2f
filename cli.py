"""`python cli.py ...` runs the `retrieval` command; the command itself lives in retrieval/cli/."""

from retrieval.cli import run

if __name__ == "__main__":
    run()
