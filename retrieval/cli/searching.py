"""`retrieval search` and how its results are printed."""

from __future__ import annotations

import json
import os
import sys

import click

from retrieval.cli.group import index_option, leave_fast, main, unwritable


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
    leave_fast()  # also on the errors below: the unwritten output must not be flushed again at exit
    try:
        _print_results(results, as_json, as_paths, as_null, protocol)
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        pass
    except OSError as e:  # stdout on a full disk, say
        raise RetrievalError(unwritable(e)) from None
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
