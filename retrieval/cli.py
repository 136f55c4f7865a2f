"""Command-line face of the engine: parse, call the Python API, print. Nothing else lives here.

Heavy modules are imported inside commands so `--help` and `info` stay instant.
"""

from __future__ import annotations

import json
import os
import sys

import click

INDEX_HELP = "Index directory. Default: $RETRIEVAL_INDEX, else ~/.local/share/retrieval/default."


class Cli(click.Group):
    """Turns user errors into one line on stderr and exit code 2; --debug keeps tracebacks."""

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


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@index_option
@click.option(
    "--captions",
    "captions_file",
    type=click.Path(dir_okay=False),
    help="Caption corpus: CSV, JSONL, Karpathy or COCO JSON.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "csv", "jsonl", "karpathy", "coco"]),
    default="auto",
    show_default=True,
)
@click.option("--split", default=None, help="Karpathy split to use (train, val, test, restval).")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder that corpus image paths are relative to.",
)
@click.option(
    "--model",
    default=None,
    help="ARCH:PRETRAINED (open_clip names), ARCH:/path/to/weights, ARCH:none, or 'starter'. Only for a new index.",
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--workers", default=None, type=click.IntRange(0, 64), help="Decode processes (0 = in-process). Default: cores - 1."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option(
    "--decode",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="JPEG decoding: gpu = batched decode_jpeg (nvJPEG) on the model's device; auto = gpu on CUDA, else cpu (PIL).",
)
@click.option(
    "--runtime",
    type=click.Choice(["auto", "onnx", "torch"]),
    default="auto",
    show_default=True,
    help="What encodes: onnxruntime (auto on the CPU) or torch (auto on CUDA / MPS).",
)
@click.option(
    "--index-type",
    type=click.Choice(["auto", "flat", "ivfflat", "ivfsq", "hnsw", "ivfpq"]),
    default=None,
    help="FAISS index kind (default: auto: exact flat up to ~50k vectors at dim 512, IVF over float16 vectors "
    "(ivfsq) above; or the index's setting).",
)
@click.option("--exclude", multiple=True, help="Glob of paths or names to skip (repeatable).")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and directories.")
@click.option(
    "--no-default-excludes",
    is_flag=True,
    help="Also walk @eaDir, node_modules and .git folders (skipped by default, even with --include-hidden).",
)
@click.option("--rebuild", is_flag=True, help="Re-encode everything, e.g. with a different --model.")
@click.option(
    "--retry-errors", is_flag=True, help="Also try again files that failed to decode and have not changed since."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where to decode and encode: this process, or a Ray cluster ($RAY_ADDRESS, else a local Ray).",
)
@click.option(
    "--ray-actors",
    type=click.IntRange(1, 4096),
    default=None,
    help="Encoder actors with --executor ray. Default: one per GPU, else from the cluster's CPUs.",
)
def index(
    paths,
    index_dir,
    captions_file,
    fmt,
    split,
    images_dir,
    model,
    batch_size,
    workers,
    device,
    decode,
    runtime,
    index_type,
    exclude,
    include_hidden,
    no_default_excludes,
    rebuild,
    retry_errors,
    quiet,
    executor,
    ray_actors,
):
    """Add photo folders (and caption corpora) to an index. Re-runs only process what changed."""
    from index_data.pipeline import IndexOptions, run_index
    from retrieval.errors import RetrievalError
    from retrieval.names import escape_name

    opts = IndexOptions(
        paths=list(paths),
        captions_file=captions_file,
        fmt=fmt,
        split=split,
        images_dir=images_dir,
        model=model,
        batch_size=batch_size,
        workers=workers,
        device=device,
        decode=decode,
        runtime=runtime,
        index_type=index_type,
        exclude=list(exclude),
        include_hidden=include_hidden,
        rebuild=rebuild,
        progress=not quiet,
        retry_errors=retry_errors,
        default_excludes=not no_default_excludes,
    )
    if executor == "ray":
        from index_data.ray_executor import require_ray

        require_ray()
        explicit = (
            click.get_current_context().get_parameter_source("batch_size") == click.core.ParameterSource.COMMANDLINE
        )
        opts.executor, opts.ray_actors, opts.ray_batch_size = executor, ray_actors, batch_size if explicit else None
    elif ray_actors is not None:
        raise RetrievalError("--ray-actors only applies with --executor ray")
    r = run_index(index_dir, opts)
    click.echo(
        f"{r.images_total} images indexed: {r.encoded} encoded, {r.reused} duplicates reused, {r.moved} moved, "
        f"{r.updated} updated, {r.removed} removed, {r.unchanged} unchanged, {r.captions_added} captions added "
        f"in {r.seconds:.1f}s",
        err=True,
    )
    if r.errors:
        click.echo(f"{len(r.errors)} file{'' if len(r.errors) == 1 else 's'} skipped:", err=True)
        for path, reason in r.errors[:20]:
            click.echo(f"  {escape_name(path)}: {reason}", err=True)
        if len(r.errors) > 20:
            click.echo(f"  … and {len(r.errors) - 20} more (see: retrieval info --errors)", err=True)
    if r.interrupted:
        click.echo(
            "stopped early by Ctrl-C; everything encoded so far is kept. Run the same command to resume.", err=True
        )
        sys.exit(130)


@main.command()
@click.argument("text", required=False)
@index_option
@click.option(
    "--image", type=click.Path(), default=None, help="Query image (alone, or with TEXT for a composite query)."
)
@click.option("--weight", default=0.5, show_default=True, type=float, help="Image share of a composite query (0..1).")
@click.option(
    "--add",
    "add",
    multiple=True,
    metavar="[W:]Q",
    help="Add a text or image-path query, optionally weighted: '2:sunset', '0.5:./img.jpg' (repeatable).",
)
@click.option(
    "--subtract",
    "subtract",
    multiple=True,
    metavar="[W:]Q",
    help="Subtract a text or image-path query, optionally weighted (repeatable).",
)
@click.option("--to", "to", type=click.Choice(["images", "captions"]), default="images", show_default=True)
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 10000))
@click.option("--min-score", type=float, default=None)
@click.option("--under", default=None, help="Only results whose path is under this folder.")
@click.option("--glob", default=None, help="Only results whose path or file name matches this glob.")
@click.option("--exclude-self", is_flag=True, help="Leave out the query image itself (and identical copies).")
@click.option("--no-dedupe", is_flag=True, help="Keep results with identical content.")
@click.option(
    "--probes",
    type=click.IntRange(1),
    default=None,
    help="ANN effort for this query: IVF lists probed (nprobe) or HNSW efSearch. Higher finds more of the "
    "exact top k, slower. Default: the index's setting (`info`); exact (flat) indexes ignore it.",
)
@click.option(
    "--after", default=None, metavar="DATE", help="Only photos taken on or after DATE (ISO: 2019, 2019-06, 2019-06-21)."
)
@click.option(
    "--before",
    default=None,
    metavar="DATE",
    help="Only photos taken on or before DATE (the whole day, month or year named).",
)
@click.option(
    "--camera", default=None, metavar="TEXT", help="Only photos whose camera make or model contains TEXT (any case)."
)
@click.option("--near", default=None, metavar="LAT,LON", help="Only photos taken within --km of this point (EXIF GPS).")
@click.option("--km", type=float, default=None, help="Radius for --near, in kilometres. Default: 10.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one result per line.")
@click.option(
    "--paths",
    "as_paths",
    is_flag=True,
    help="Paths only, one per line (exact bytes; a name holding a newline is written $'...'-quoted).",
)
@click.option(
    "--null",
    "-0",
    "as_null",
    is_flag=True,
    help="Paths only, each ended by a NUL byte, exact bytes (like find -print0).",
)
@click.option(
    "--preview",
    is_flag=True,
    help="Show thumbnails inline (kitty or iTerm2 image protocol, detected; "
    "RETRIEVAL_PREVIEW=kitty|iterm2 forces one).",
)
def search(
    text,
    index_dir,
    image,
    weight,
    add,
    subtract,
    to,
    k,
    min_score,
    under,
    glob,
    exclude_self,
    no_dedupe,
    probes,
    after,
    before,
    camera,
    near,
    km,
    device,
    as_json,
    as_paths,
    as_null,
    preview,
):
    """Search by TEXT, by --image, or both, plus or minus --add/--subtract terms. Exit code 0 with results, 1 with
    none, 2 on error."""
    from retrieval.errors import RetrievalError
    from retrieval.query.searcher import Searcher

    if as_json + as_paths + as_null > 1:
        raise RetrievalError("--json, --paths and --null cannot be combined: pick one output format")
    if preview and (as_json or as_paths or as_null):
        raise RetrievalError("--preview shows thumbnails under the result table: leave out --json, --paths and --null")
    explicit = click.get_current_context().get_parameter_source("weight") == click.core.ParameterSource.COMMANDLINE
    if explicit and (text is None or image is None):
        raise RetrievalError("--weight only applies to a composite query: give both TEXT and --image")

    with Searcher.open(index_dir, device=device) as s:
        results = s.search(
            text,
            image,
            weight=weight,
            to=to,
            k=k,
            min_score=min_score,
            under=under,
            glob=glob,
            exclude_self=exclude_self,
            dedupe=not no_dedupe,
            probes=probes,
            after=after,
            before=before,
            camera=camera,
            near=near,
            km=km,
            add=add,
            subtract=subtract,
        )
    protocol = None
    if preview:
        from retrieval.preview import detect

        found = detect(isatty=sys.stdout.isatty())
        protocol = found.protocol
        if protocol is None:
            click.echo(f"no previews: {found.reason}", err=True)
    _print_results(results, as_json, as_paths, as_null, protocol)
    sys.exit(0 if results else 1)


def _show_preview(path, protocol) -> None:
    """One inline thumbnail (retrieval/preview.py) under a result line, or why there is none."""
    from retrieval.errors import ImageDecodeError
    from retrieval.names import escape_name
    from retrieval.preview import escape_for

    try:
        click.echo(escape_for(path, protocol))
    except ImageDecodeError as e:
        reason = str(e).splitlines()[0]
        click.echo(f"        (no preview: {escape_name(reason.removeprefix(os.fsdecode(path) + ': '))})")


def _print_results(results, as_json: bool, as_paths: bool, as_null: bool = False, protocol: str | None = None) -> None:
    from retrieval.names import escape_name, needs_quoting, result_bytes, shell_quote

    sys.stdout.flush()
    out = sys.stdout.buffer
    if as_json:  # written as is: click.echo would strip escape sequences from a piped name
        for r in results:
            out.write(json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
        return
    if as_paths or as_null:
        quoted = 0
        for r in results:
            if not r.path:
                continue
            raw = result_bytes(r.path, r.path_b64)
            if as_null:
                out.write(raw + b"\0")
            elif needs_quoting(raw):
                quoted += 1
                out.write(shell_quote(raw).encode("utf-8") + b"\n")
            else:
                out.write(raw + b"\n")
        out.flush()
        if quoted:
            click.echo(
                f"note: {quoted} name{'' if quoted == 1 else 's'} with a line break written $'...'-quoted; "
                "use --null for exact bytes",
                err=True,
            )
        return
    if not results:
        click.echo("no results", err=True)
        return

    def shown(r):
        return escape_name(result_bytes(r.path, r.path_b64)) if r.path else ""

    if results[0].kind == "image":
        click.echo(f"{'rank':>4}  {'score':>6}  path")
        for r in results:
            click.echo(f"{r.rank:>4}  {r.score:6.3f}  {shown(r)}")
            if protocol:
                _show_preview(r.path, protocol)
    else:
        click.echo(f"{'rank':>4}  {'score':>6}  caption  [image]")
        for r in results:
            click.echo(f"{r.rank:>4}  {r.score:6.3f}  {escape_name(r.caption)}" + (f"  [{shown(r)}]" if r.path else ""))
            if protocol and r.path:
                _show_preview(r.path, protocol)


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
    from pathlib import Path

    from retrieval.store.index import Index
    from retrieval.store.layout import default_index_dir

    root = Path(index_dir).expanduser() if index_dir else default_index_dir()
    Index.open(root).close()  # no index there: one line, exit 2, and nothing created
    # the writer lock keeps a running index job from looking broken; a read-only index is checked as it is
    writable = os.access(root, os.W_OK)
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


# -- benchmark (issue 8) ---------------------------------------------------------------------------------------


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
    from retrieval.eval.benchmark import format_recall, run_recall_benchmark

    def build(path, options):
        from index_data.pipeline import IndexOptions, run_index

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
    from retrieval.fusion.train import format_report, train_fusion_for_index

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


if __name__ == "__main__":
    main()
