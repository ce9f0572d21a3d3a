"""The ``cnncodes`` command line: one click group of thin subcommands over the library.

torch and the models are imported inside the commands so that ``--help`` is instant.

The group is defined here and its commands live in one module per command group:
:mod:`.catalog` (sample-data, list-models, list-layers), :mod:`.extraction` (extract, info),
:mod:`.probes` (fit-svm, fit-softmax, fit-knn, evaluate, predict, export), :mod:`.sweep` (sweep, demo),
:mod:`.advise` (advise) and :mod:`.finetune` (finetune, compare); what they share (option types,
options, error handling) is in :mod:`.options`.
"""
from __future__ import annotations

import logging
import sys

import click

from .advise import advise_cmd
from .catalog import list_layers_cmd, list_models_cmd, sample_data
from .extraction import extract_cmd, info_cmd
from .finetune import compare_cmd, finetune_cmd, lr_find_cmd
from .options import OFFLINE
from .probes import evaluate_cmd, export_cmd, fit_knn, fit_softmax, fit_svm, predict_cmd
from .sweep import demo, sweep_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cnncodes")
@click.option("-v", "--verbose", count=True, help="More diagnostics on stderr (-vv for debug).")
@OFFLINE
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
      cnncodes advise data/digits
      cnncodes finetune data/digits --stages head:1,stage5:2 --out runs/digits
      cnncodes compare data/digits --head-epochs 1 --epochs 2
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(levelname)s: %(message)s")


for command in (sample_data, list_models_cmd, list_layers_cmd, extract_cmd, info_cmd, fit_svm, fit_knn,
                fit_softmax, sweep_cmd, demo, advise_cmd, finetune_cmd, lr_find_cmd, compare_cmd,
                evaluate_cmd, predict_cmd, export_cmd):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="cnncodes")
