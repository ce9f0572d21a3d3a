"""What the ``cnncodes`` commands share: option types, options, value checks, error handling.

Imports click and torch-free name lists only, so that ``--help`` is instant.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import sys

import click

# Plain name lists (torch-free), shared with the library's own validation.
from cnncodes.extractor.devices import DEVICES, RUNTIMES
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


def fail_cleanly(fn):
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


def checked_by(module: str, parser: str):
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


_C_GRID = checked_by("cnncodes.pipelines.probes.classifiers", "parse_c_grid")
POOL = checked_by("cnncodes.extractor.pooling", "parse_pooling")


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _go_offline(ctx, param, value):
    # The library reads the variable (as Hugging Face's HF_HUB_OFFLINE is read), so that every
    # command, and the torchrun ranks it starts, agree without passing a flag through each call.
    if value:
        os.environ["CNNCODES_OFFLINE"] = "1"
    return value


RUNTIME = click.option(
    "--runtime", type=click.Choice(RUNTIMES), default=None,
    help="What runs the network on a CPU: auto = OpenVINO, else ONNX Runtime when installed and its "
         "codes match PyTorch's (a cache keeps the runtime it was made with), else PyTorch. "
         "[default: $CNNCODES_RUNTIME, else auto]")

OFFLINE = click.option("--offline", is_flag=True, expose_value=False, callback=_go_offline, is_eager=True,
                       help="Never touch the network (as CNNCODES_OFFLINE=1): missing weights fail at once.")


def existing_data(ctx, param, value):
    # a path that exists, or a brace pattern of tar shards (whose shards find_images checks)
    if value is not None and not os.path.exists(value) and not ("{" in value and "}" in value):
        raise click.BadParameter(f"'{value}' does not exist (an image folder, a CSV manifest, .tar shards "
                                 f"or a brace pattern of them).")
    return value


# How C is cross-validated: shared by fit-svm, fit-softmax, sweep and demo.
CV_OPTIONS = [
    click.option("--c-grid", callback=_C_GRID,
                 help="Comma-separated C values [default: 1e-4,1e-3,...,1e2]."),
    click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
                 help="Stratified, shuffled cross-validation folds."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds (and holdout)."),
    click.option("--norm", type=click.Choice(["standard", "l2", "power", "none"]), default="standard",
                 show_default=True, help="Fitted inside each fold; power = signed sqrt, then L2."),
]



# What chooses C and how classes weigh: shared by fit-svm, fit-softmax and sweep (the values are
# pipelines.probes.metrics.SELECT and classifiers.CLASS_WEIGHTS, written out: --help imports no numpy).
SELECT_OPTIONS = [
    click.option("--select", type=click.Choice(["accuracy", "balanced_accuracy", "macro_f1"]),
                 default="accuracy",
                 show_default=True, help="The mean out-of-fold score that chooses C (and a sweep's best "
                 "layer); balanced_accuracy or macro_f1 where classes are imbalanced."),
    click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True,
                 help="balanced: every class weighs the same in the loss (n / (K n_class) a training "
                 "image, counted in each fold); linear probes only."),
]
