"""Which parameters train in each fine-tuning stage: stage specs, a new head, freezing and
the batch-norm policy of frozen parts.

A stage is ``START:EPOCHS``. ``START`` says where the trainable part of the network begins:

- ``head``: only the new classifier head trains;
- a module name (``layer4``, ``blocks.5``) or a block (``block:-3``): that module and every
  module that runs after it;
- a stage alias (``stage5``): that whole stage, i.e. everything after the end of the previous
  stage (``extract``'s ``stage4`` is the *end* of stage 4, so ``stage5`` starts right after it);
- ``all``: the whole network (of a ViT, also its class token and positional embeddings).

"Runs after" is execution order, as measured by the same probe that names layers for
``extract`` (forward hooks, so it works where torch.fx cannot trace). Stages must unfreeze from
the top down: a later stage never freezes what an earlier one trained.

Examples
--------
>>> parse_stages("head:3,layer4:3,all:4")
[('head', 3), ('layer4', 3), ('all', 4)]
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from torch import nn

from cnncodes.extractor.errors import CnnCodesError, LayerNotFoundError
from cnncodes.extractor.layers import ALIASES, Probe, is_alias, own_classifiers


class FinetuneError(CnnCodesError, ValueError):
    """A fine-tuning request that cannot be carried out as given."""


@dataclass
class Stage:
    """One stage of a schedule, resolved against a network.

    ``start`` is the execution-clock time from which modules train: ``-1`` for ``all``,
    ``inf`` for ``head``.
    """

    name: str
    epochs: int
    start: float
    module: str | None = None  # the first trainable module, when there is one to name

    def as_dict(self) -> dict:
        return {"name": self.name, "epochs": self.epochs, "module": self.module}


def parse_stages(spec: str) -> list[tuple[str, int]]:
    """``"head:3,layer4:3,all:4"`` -> ``[("head", 3), ("layer4", 3), ("all", 4)]``."""
    out = []
    for part in (p.strip() for p in str(spec).split(",")):
        name, sep, epochs = part.rpartition(":")
        # ASCII digits only: str.isdigit() accepts '²', which int() then refuses
        if not sep or not name or not re.fullmatch(r"[0-9]+", epochs.strip()) or int(epochs) < 1:
            raise FinetuneError(
                f"stage '{part}' is not START:EPOCHS with EPOCHS >= 1 (e.g. 'head:3,layer4:3,all:4').")
        out.append((name.strip(), int(epochs)))
    if not out:
        raise FinetuneError("--stages is empty; e.g. 'head:3,all:4'.")
    return out


def resolve_stages(probe: Probe, stages: list[tuple[str, int]]) -> list[Stage]:
    """Resolve stage starts to execution-clock times and check they go from the top down."""
    aliases = probe.aliases()
    resolved = []
    for name, epochs in stages:
        if name == "head":
            resolved.append(Stage(name, epochs, math.inf))
        elif name == "all":
            resolved.append(Stage(name, epochs, -1))
        elif name == "penultimate":
            raise FinetuneError("'penultimate' is the head's input; use 'head' to train only the head.")
        elif name in ALIASES and name in aliases:
            k = int(name[-1])
            prev = [aliases[f"stage{j}"] for j in range(k - 1, 0, -1) if f"stage{j}" in aliases]
            start = prev[0].order + 0.5 if prev else -1
            first = min((l for l in probe.layers if l.start > start), key=lambda l: l.start, default=None)
            resolved.append(Stage(name, epochs, start, first.name if first else None))
        elif name in probe.by_name or is_alias(name):  # a module, or block:K
            info = probe.lookup(name, aliases)
            resolved.append(Stage(name, epochs, info.start, info.name))
        else:
            choices = ["head", "all"] + [a for a in aliases if a.startswith("stage")] + list(probe.by_name)
            close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise LayerNotFoundError(
                f"stage start '{name}' is not a layer of {probe.model_name}.{hint} Valid starts: head, "
                f"all, {', '.join(a for a in aliases if a.startswith('stage'))}, block:K or a module name "
                f"from 'cnncodes list-layers --model {probe.model_name} --all'.")
    for before, after in zip(resolved, resolved[1:]):
        if after.start > before.start:
            top_down = ",".join(f"{s.name}:{s.epochs}" for s in sorted(resolved, key=lambda s: -s.start))
            raise FinetuneError(
                f"stages are out of network order: '{after.name}' starts after '{before.name}', so it "
                f"would freeze again what the stage before trained. Unfreeze from the top down: "
                f"{top_down}.")
    return resolved


def replace_head(model: nn.Module, probe: Probe, num_classes: int) -> tuple[str, ...]:
    """Swap the classifier for a fresh one with ``num_classes`` outputs; returns the names of
    the new head's modules.

    A timm model resets its own classifier (``reset_classifier``: a distilled DeiT's two heads,
    a Swin's ``head.fc``); elsewhere the last ``Linear`` to run is replaced.
    """
    if probe.classifier is None:
        raise FinetuneError(f"{probe.model_name} has no Linear classifier to replace.")
    reset = getattr(model, "reset_classifier", None)
    if callable(reset) and classifier_names(model):
        reset(num_classes)
        heads = classifier_names(model)
        if heads and all(model.get_submodule(h).out_features == num_classes for h in heads):
            return heads
    name, dim = probe.classifier
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Linear(dim, num_classes))
    return (name,)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The module names of timm's ``get_classifier()`` Linear heads (none for other models)."""
    return tuple(n for n, m in own_classifiers(model) if isinstance(m, nn.Linear))


def _in_head(name: str, heads: tuple[str, ...]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def frozen_modules(model: nn.Module, probe: Probe, stage: Stage, heads: tuple[str, ...]) -> set[str]:
    """Names of the modules whose parameters stay fixed in ``stage`` (the head never does).

    The model's own parameters (a ViT's class token and positional embeddings, used before its
    first block) are frozen with its first module: they train only in a stage that starts there.
    """
    frozen = set()
    first = min((l.start for l in probe.layers), default=0)
    for name, _ in model.named_modules():
        if _in_head(name, heads):
            continue
        if not name:
            if stage.start > first:
                frozen.add(name)
            continue
        info = probe.by_name.get(name)
        if info is None or info.start < stage.start:
            frozen.add(name)
    return frozen


def depth_groups(model: nn.Module, probe: Probe) -> dict[str, int]:
    """Parameter name -> the index of the stage it lies in, as ``--stages`` counts them (0-based):
    stage K holds what runs after stage K-1's module has ended, up to the end of stage K's (so
    the top group is what ``--stages stage5:N`` trains on a 5-stage network; the stem goes with
    the first stage). The model's own parameters (a ViT's class token) go with its first module."""
    import bisect
    ends = sorted(info.order for alias, info in probe.aliases().items() if re.fullmatch(r"stage\d+", alias))
    top = max(len(ends) - 1, 0)
    groups, module_group = {}, {"": 0}
    for mod_name, module in model.named_modules():  # parents come before their children
        info = probe.by_name.get(mod_name) if mod_name else None
        # a module that never ran in the probe's forward pass takes its parent's stage
        group = min(bisect.bisect_left(ends, info.start), top) if info is not None else \
            module_group.get(mod_name.rpartition(".")[0], 0)
        module_group[mod_name] = group
        for p_name, _ in module.named_parameters(recurse=False):
            groups[f"{mod_name}.{p_name}" if mod_name else p_name] = group
    return groups


def apply_stage(model: nn.Module, frozen: set[str]) -> int:
    """Set ``requires_grad`` per parameter; returns the number of trainable parameters."""
    count = 0
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            p.requires_grad_(mod_name not in frozen)
            count += p.numel() if p.requires_grad else 0
    return count


# Batch norm while training: `eval` = every batch-norm layer in inference mode (the running
# statistics used and kept; the scale and shift of unfrozen ones still train), `frozen` = only
# the frozen layers', `train` = every layer's statistics re-estimated from the batches.
BN_MODES = ("eval", "frozen", "train")


def set_train_mode(model: nn.Module, frozen: set[str], bn: str = "eval") -> None:
    """``model.train()``, except the batch-norm layers ``bn`` keeps in eval mode (all of them
    under ``eval``, the frozen ones under ``frozen``), whose running statistics are used and kept,
    not re-estimated from the batches.

    Why ``eval`` for unfrozen layers too (Keras' transfer-learning guide gives the same advice):
    the head was fitted on codes computed with the running statistics; batch statistics of
    images unlike ImageNet's differ from them, so switching to them changes every code at once.
    Measured on the digits, the probe-started head's loss went from 1.4-2.3 to 18-21 on the same
    batches, and fine-tuning everything then collapsed to chance."""
    model.train()
    if bn not in BN_MODES:
        raise FinetuneError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}.")
    if bn != "train":
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (bn == "eval" or name in frozen):
                module.eval()
