"""Making and reading caches: ``extract`` and ``info``."""
from __future__ import annotations

import logging
import sys

import click

from cnncodes.extractor.devices import DTYPES, PRECISIONS
from cnncodes.extractor.errors import CnnCodesError

from .options import DEVICE, EXIT_INTERRUPTED, OFFLINE, POOL, RUNTIME, echo_json, existing_data, fail_cleanly


@click.command("extract")
@OFFLINE
@click.argument("data", callback=existing_data)
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Cache file [default: cache/<data>-<model>.h5].")
@click.option("--model", "-m", default="efficientnet_lite0", show_default=True,
              help="Backbone (see list-models): a torchvision name, timm:<name>, hf:<repo>, "
                   "openclip:<arch>/<tag>.")
@click.option("--weights", "-w", default="DEFAULT", show_default=True,
              help="DEFAULT, a torchvision enum name (IMAGENET1K_V2), a file, or none.")
@click.option("--layer", "-l", "layers", multiple=True, default=["penultimate"], show_default=True,
              help="Layer name or alias (stage1..stage5, penultimate, projection, block:K); repeat for "
                   "several.")
@click.option("--pool", default="avg", show_default=True, callback=POOL,
              help="avg | max | avgmax | grid:K | spp:1,2,4 | none; for token layers also cls | "
                   "mean | cls+mean (avg, max, mean: over the patch tokens).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Storage type of the codes.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 elsewhere.")
@RUNTIME
@click.option("--decode", type=click.Choice(("auto", "reduced", "exact", "gpu", "cpu")), default="auto",
              show_default=True,
              help="reduced: Pillow decodes at the smallest scale that keeps the pixels the resize needs "
                   "(JPEG DCT scaling; 5-10x faster on phone photos), then the weights' exact resize. "
                   "exact: full-size decode, bitwise the weights' own transform (cpu is its former name). "
                   "gpu: on CUDA, JPEGs decoded by nvJPEG and resized on the device (close, not bitwise). "
                   "auto: an existing cache's path, else reduced (exact for hf: and openclip: models, whose "
                   "preprocessing is their library's processor). See docs/engine.md.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workers", "-j", type=click.IntRange(min=0), default=None,
              help="Decoding worker processes [default: 0 on a CPU (one thread per core decodes a "
                   "batch, then computes it), one per core (at most 8) on CUDA/MPS].")
@click.option("--strict", is_flag=True, help="Stop at the first image that fails to decode.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file made by another recipe.")
@click.option("--allow-overlap", is_flag=True,
              help="Accept a manifest listing an image in two splits (a leak).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@fail_cleanly
def extract_cmd(data, out, model, weights, layers, pool, dtype, device, precision, runtime, decode,
                batch_size, workers, strict, overwrite, allow_overlap, quiet, as_json) -> None:
    """Extract CNN codes of one or more layers for every image of DATA into an HDF5 cache.

    DATA is an image folder (ROOT/<class>/<image>, or ROOT/train|val|test/<class>/<image>), a
    CSV manifest with a header path,label[,split], or WebDataset tar shards: a folder of .tar
    files or a brace pattern ('shards/train-{000000..000127}.tar'), each sample an image member
    and a .cls/.txt/.json label member; images are read from the archives in place. All layers
    come from one forward pass that stops after the deepest of them. Images that fail to decode
    are recorded in the cache and skipped (--strict stops instead).

    Interrupt at any moment and rerun the same command: only missing images are processed.
    Rerunning a finished extraction does nothing.

    Under torchrun (one node or many, a file system every rank sees), the ranks share the work
    of one cache: each computes its share of the fixed row blocks, rank 0 commits the cache,
    which is the one a single process makes; rerun with any number of processes to resume.

    \b
    Examples:
      cnncodes extract data/digits
      cnncodes extract photos/ --model resnet50 --layer layer3 --layer penultimate --pool avgmax
      cnncodes extract manifest.csv --model timm:resnet18 --weights r18.pth --out cache/r18.h5
      cnncodes extract photos/ -m timm:deit_small_patch16_224.fb_in1k -l stage3 -l block:-1 --pool cls+mean
      cnncodes extract photos/ -m hf:facebook/dinov2-small -l block:-1 --pool cls
      cnncodes extract photos/ -m openclip:ViT-B-32/openai -l penultimate -l projection
      cnncodes extract 'shards/train-{000000..000127}.tar' --out cache/train.h5
      torchrun --nproc-per-node 8 -m cnncodes extract photos/ --out cache/photos.h5
    """
    from cnncodes.extractor import ExtractionInterrupted, extract
    from cnncodes.extractor.distributed import is_main_process
    main = is_main_process()
    if not main:  # one summary, one progress bar: rank 0's (the others' errors still print)
        logging.getLogger().setLevel(logging.ERROR)
        quiet = True
    try:
        r = extract(data, out, model=model, weights=weights, layers=layers, pool=pool, dtype=dtype,
                    device=device, precision=precision, batch_size=batch_size, workers=workers,
                    strict=strict, overwrite=overwrite, allow_overlap=allow_overlap,
                    progress=False if quiet else None, runtime=runtime, decode=decode)
    except ExtractionInterrupted as e:
        if main:  # the other ranks' shards are in rank 0's count
            click.echo(str(e), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except CnnCodesError as e:
        if getattr(e, "from_rank_0", False):  # rank 0 says it
            sys.exit(1)
        raise
    if not main:
        return
    for path, err in r.failures[:10]:
        click.echo(f"failed: {path}: {err}", err=True)
    if len(r.failures) > 10:
        click.echo(f"... and {len(r.failures) - 10} more failed images (see /images/error)", err=True)
    if r.images and not r.done and r.failed == r.images:  # nothing to learn from: a script must see it
        first = f" (first: {r.failures[0][0]}: {r.failures[0][1]})" if r.failures else ""
        raise click.ClickException(f"none of the {r.images} images of {data} could be decoded{first}; "
                                   f"{r.path} records each one's error.")
    if as_json:
        echo_json(r.as_dict())
        return
    dims = ", ".join(f"{k}: {v}" for k, v in r.layers.items())
    if r.state == "up to date":
        click.echo(f"{r.path} is up to date: {r.done} images done, {r.failed} failed ({dims})")
    else:
        click.echo(f"{r.path}: {r.state}, {r.done}/{r.images} images done, {r.failed} failed; "
                   f"{r.processed} processed in {r.seconds:.1f}s ({r.images_per_s:.1f} img/s on "
                   f"{r.device}, {r.runtime}); layers {dims}")


@click.command("info")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--check", is_flag=True, help="Also read every code once: a damaged chunk is reported now.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@fail_cleanly
def info_cmd(cache: str, check: bool, as_json: bool) -> None:
    """Summarise a cache: recipe, layers, progress, splits.

    A damaged cache is reported as damaged, with the command that rebuilds it; --check reads
    every dataset to find damage that the summary does not touch.

    \b
    Examples:
      cnncodes info cache/digits-efficientnet_lite0.h5 --json
      cnncodes info cache/digits-efficientnet_lite0.h5 --check
    """
    from cnncodes.extractor.cache import open_cache
    with open_cache(cache) as c:
        s = c.summary()
        if check:
            s["checked_bytes"] = c.verify()
    if as_json:
        echo_json(s)
        return
    pre = s["preprocessing"] or {}  # .get throughout: a cache written by other tools may lack keys
    click.echo(f"{s['path']}  ({s['size_bytes'] / 1e6:.1f} MB, {s['format']} v{s['schema_version']})")
    weights = s["weights"] or {}
    click.echo(f"  model         {s['model']}  weights {weights.get('name')}"
               + (f" (sha256 {weights['sha256'][:12]})" if weights.get('sha256') else ""))
    click.echo(f"  preprocessing resize {pre.get('resize')} {pre.get('interpolation')}, "
               f"crop {pre.get('crop')}, mean {pre.get('mean')}, std {pre.get('std')}")
    click.echo(f"  pooling       {s['pooling']}, {s['dtype']}, precision {s['precision']}, "
               f"runtime {s.get('runtime') or 'torch'}, decode {s.get('decode')}")
    click.echo(f"  images        {s['images']}: {s['done']} done, {s['failed']} failed, "
               f"{s['pending']} pending; "
               f"{s['classes']} classes; splits " + ", ".join(f"{k} {v}" for k, v in s["splits"].items()))
    for name, l in s["layers"].items():
        stride = l.get("stride", -1)
        unpooled = "x".join(map(str, l.get("unpooled_shape", [])))
        if l.get("kind") == "tokens":
            unpooled = (f"{l.get('prefix_tokens', 0)}+{l.get('patch_tokens')} tokens x "
                        f"{l['unpooled_shape'][-1]}")
        elif l.get("kind") in ("map", "map-channels-last", "vector"):  # older caches: "output"/"input"
            unpooled = f"{l['kind']} {unpooled}"
        click.echo(f"  layer {name:<12} {l['dim']:>6}-d  module {l.get('module')}, "
                   f"unpooled {unpooled}, "
                   f"pooling {l.get('pooling', s['pooling'])}, stride {stride if stride > 0 else '-'}")
    state = "complete" if s["complete"] else "INCOMPLETE"
    extra = (f"; {s['unmerged_rows']} rows of an interrupted run await the next `extract`"
             if s["unmerged_rows"] else "")
    if s["damaged_shards"]:
        extra += (f"; {s['damaged_shards']} damaged journal shards (the next `extract` drops them and "
                  f"extracts their images again)")
    click.echo(f"  state         {state}{extra}; created {s['created']}")
    if "checked_bytes" in s:
        click.echo(f"  checked       every dataset read whole ({s['checked_bytes'] / 1e6:.1f} MB): no damage")
