"""`retrieval index`: the write path's command."""

from __future__ import annotations

import sys

import click

from retrieval.cli.group import index_option, main


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
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="Image vectors' precision: auto = bf16 autocast on CUDA, fp32 elsewhere. bf16 on a CPU with bfloat16 "
    "instructions (AVX512-BF16, AMX) encodes about twice as fast on torch; vectors differ from fp32 by ~1e-3.",
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
@click.option(
    "--ray-write",
    type=click.Choice(["driver", "direct"]),
    default="driver",
    show_default=True,
    help="With --executor ray on a PostgreSQL index: 'direct' has the encode actors write raw embeddings to "
    "the database themselves instead of sending them through this process.",
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
    precision,
    index_type,
    exclude,
    include_hidden,
    no_default_excludes,
    rebuild,
    retry_errors,
    quiet,
    executor,
    ray_actors,
    ray_write,
):
    """Add photo folders (and caption corpora) to an index. Re-runs only process what changed."""
    from index_data.options import IndexOptions
    from index_data.pipeline import run_index
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
        precision=precision,
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
        opts.ray_write = ray_write
        if precision != "auto":
            raise RetrievalError("--precision applies to the local executor; Ray actors use auto")
    elif ray_actors is not None or ray_write != "driver":
        raise RetrievalError("--ray-actors and --ray-write only apply with --executor ray")
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
