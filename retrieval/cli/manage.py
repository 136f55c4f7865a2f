"""The other commands: info, verify, copy, duplicates, benchmark recall, serve, train-fusion."""

from __future__ import annotations

import json
import os
import sys

import click

from retrieval.cli.group import index_option, main


@main.command()
@index_option
@click.option("--json", "as_json", is_flag=True)
@click.option("--errors", "show_errors", is_flag=True, help="List the files that were skipped, with reasons.")
def info(index_dir, as_json, show_errors):
    """What an index holds: counts, model, vector index type."""
    from retrieval.store.index import Index

    idx = Index.open(index_dir)
    try:
        i = idx.info()
        errors = idx.store.errors() if show_errors else []
    finally:
        idx.close()
    if as_json:
        d = i.to_dict()
        if show_errors:
            d["error_list"] = [{"path": p, "reason": r} for p, r in errors]
        click.echo(json.dumps(d, ensure_ascii=False))
        return
    for key, value in i.to_dict().items():
        click.echo(f"{key:>16}: {value}")
    from retrieval.names import escape_name

    for p, r in errors:
        click.echo(f"  {escape_name(p)}: {r}")


@main.command()
@index_option
@click.option("--repair", is_flag=True, help="Rebuild the vector files from the stored raw embeddings.")
def verify(index_dir, repair):
    """Check that the manifest, SQLite and FAISS agree. Exit 1 if a problem is found."""
    from retrieval.store.index import Index
    from retrieval.store.layout import resolve_index

    root = resolve_index(index_dir)
    Index.open(root).close()  # no index there: one line, exit 2, and nothing created
    # the writer lock keeps a running index job from looking broken; a read-only index is checked as it is
    # (a PostgreSQL collection has no lock: its writers' transactions are never half-seen)
    writable = isinstance(root, str) or os.access(root, os.W_OK)
    with Index.open_for_write(root, create=False) if repair or writable else Index.open(root) as idx:
        problems = idx.verify()
        for p in problems:
            click.echo(f"problem: {p}")
        if problems and repair:
            for line in idx.repair():
                click.echo(f"repaired: {line}")
            after = idx.verify()
            if after:
                click.echo("still broken after repair:")
            for p in after:
                click.echo(f"problem: {p}")
            sys.exit(1 if after else 0)
    if not problems:
        click.echo("ok")
    sys.exit(1 if problems else 0)


@main.command("copy")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="SRC",
    help="The index to copy: a directory, or a postgresql://USER@HOST/DB[?collection=NAME] URL.",
)
@click.option(
    "--to",
    "dest",
    required=True,
    metavar="DST",
    help="Where to put the copy (a directory or a collection URL); it must not hold an index yet.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was copied as one JSON object.")
def copy_cmd(source, dest, as_json):
    """Copy an index to another store (a directory or a PostgreSQL collection) without re-encoding anything:
    rows, ids, raw embeddings, manifest and fusion move as they are; the copy makes its own vectors from them."""
    from index_data.copy import copy_index

    r = copy_index(source, dest)
    if as_json:
        click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
        return
    fusion = f", fusion {r.fusion}" if r.fusion else ""
    errors = f"{r.errors} error{'' if r.errors == 1 else 's'}"
    click.echo(
        f"copied {r.images} images, {r.captions} captions, {r.embeddings} raw embeddings and {errors} "
        f"({r.model}{fusion}) from {r.source} to {r.destination} in {r.seconds:.1f} s, nothing re-encoded; "
        f"vectors published: {r.index_type}, generation {r.generation}"
    )


@main.command()
@index_option
@click.option(
    "--threshold",
    default=0.95,
    show_default=True,
    type=click.FloatRange(0.5, 1.0),
    help="Cosine similarity at or above which two photos are near-duplicates.",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one group per line, best-quality member first.")
def duplicates(index_dir, threshold, as_json):
    """Groups of near-identical photos (bursts, resized copies, edits), best-quality member first.
    Exit code 0 with groups, 1 with none."""
    from retrieval.query.duplicates import find_duplicates
    from retrieval.store.index import Index

    with Index.open(index_dir) as idx:
        groups = find_duplicates(idx, threshold=threshold)
    for n, g in enumerate(groups, 1):
        if as_json:
            click.echo(json.dumps(g.to_dict(), ensure_ascii=False))
            continue
        click.echo(f"group {n}: {len(g.members)} photos")
        for m in g.members:
            size = f"{m.width}x{m.height}" if m.width and m.height else "?"
            click.echo(f"  {m.score:6.3f}  {size:>11}  {m.path}")
    if not as_json:
        click.echo(
            f"{len(groups)} group{'' if len(groups) == 1 else 's'} of near-duplicates at {threshold:g}", err=True
        )
    sys.exit(0 if groups else 1)


# -- benchmark ------------------------------------------------------------------------------------------------


@main.group()
def benchmark():
    """Measure an index. See also benchmarks/ for speed."""


@benchmark.command("recall")
@click.option(
    "--captions",
    "captions_file",
    required=True,
    type=click.Path(dir_okay=False),
    help="Caption corpus: CSV, JSONL, Karpathy or COCO JSON.",
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder that corpus image paths are relative to.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "csv", "jsonl", "karpathy", "coco"]),
    default="auto",
    show_default=True,
)
@click.option("--split", default=None, help="Karpathy split to use (e.g. test).")
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Evaluate this index; built here from FILE first if it does not exist. Default: build in a temporary "
    "directory.",
)
@click.option("--model", default=None, help="Model for a new index (ARCH:PRETRAINED, ARCH:none, starter).")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Comma-separated K values.")
@click.option("--exact", is_flag=True, help="Also report recall over exact (flat) search, under the key 'exact'.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
@click.option("--workers", default=None, type=click.IntRange(0, 64), help="Decode processes when indexing.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar while indexing.")
def benchmark_recall(
    captions_file, images_dir, fmt, split, index_dir, model, ks, exact, device, workers, as_json, quiet
):
    """Recall@K on FILE's image-caption pairs, through the index's own query path (clip_benchmark key names)."""
    from retrieval.eval.run import format_recall, run_recall_benchmark

    def build(path, options):
        from index_data.options import IndexOptions
        from index_data.pipeline import run_index

        run_index(path, IndexOptions(workers=workers, progress=not quiet, **options))

    r = run_recall_benchmark(
        captions_file,
        index_dir=index_dir,
        images_dir=images_dir,
        fmt=fmt,
        split=split,
        model=model,
        ks=ks,
        exact=exact,
        device=device,
        build=build,
    )
    if r.missing_images or r.missing_captions:
        click.echo(
            f"warning: counted as misses: {r.missing_images} images not in the index, "
            f"{r.missing_captions} captions without a caption row",
            err=True,
        )
    if r.extra.get("captions_encoded"):
        click.echo(
            f"note: the index holds no caption row for {r.extra['captions_encoded']} of the file's captions; "
            "image→text ranks the file's captions, encoded for this evaluation (the index is unchanged)",
            err=True,
        )
    click.echo(json.dumps(r.to_dict(), ensure_ascii=False) if as_json else format_recall(r))


@main.command()
@index_option
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on; anything but loopback shows your photos to the network.",
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free port).")
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(0.1, 1024),
    help="Largest query image accepted.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
def serve(index_dir, host, port, max_upload_mb, device):
    """Web page and JSON API over an index (http://127.0.0.1:8000/). The model loads on the first query."""
    from retrieval.server.app import serve as run_server

    def ready(url, app, loopback):
        info = app.state.service.info()
        click.echo(f"serving {info['images']} images from {info['path']} at {url}  (Ctrl-C to stop)", err=True)
        if not loopback:
            click.echo(
                f"warning: listening on {host}: anyone who can reach this machine can see the indexed photos", err=True
            )

    try:
        run_server(
            index_dir,
            host=host,
            port=port,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
            device=device,
            on_ready=ready,
        )
    except KeyboardInterrupt:
        pass


@main.command("train-fusion")
@index_option
@click.option(
    "--epochs",
    default=40,
    show_default=True,
    type=click.IntRange(0, 10000),
    help="Most training epochs (early stopping may end sooner).",
)
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed for the train/validation split and training."
)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="Share of captioned images held out for validation.",
)
@click.option("--dry-run", is_flag=True, help="Train and report the validation gain; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def train_fusion(index_dir, epochs, seed, val_fraction, dry_run, as_json, quiet):
    """Learn a fusion from the index's image-caption pairs; install it only if it beats the current one."""
    from retrieval.fusion.install import format_report, train_fusion_for_index

    r = train_fusion_for_index(
        index_dir,
        epochs=epochs,
        seed=seed,
        val_fraction=val_fraction,
        dry_run=dry_run,
        progress=not quiet and not as_json,
    )
    if as_json:
        click.echo(json.dumps(r.to_dict(), ensure_ascii=False))
    else:
        for line in format_report(r):
            click.echo(line)
