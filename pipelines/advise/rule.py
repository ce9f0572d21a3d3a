"""The seeds' decision, from measured figures: keep the network fixed or fine-tune it, which
layer, how much to unfreeze.

The classic rule (CS231n's transfer-learning notes, Yosinski et al. 2014) has two axes:

================  ==============================  =======================================
                  similar to ImageNet             different from ImageNet
================  ==============================  =======================================
small data        linear probe on the top layer   linear probe on an earlier layer
medium data       fine-tune the top stage         fine-tune everything
large data        fine-tune everything            fine-tune everything
================  ==============================  =======================================

(CS231n's notes name the small and large rows; the medium row is this rule's interpolation.)

Here both axes are measured, never assumed: size is images per class; "different" needs
evidence that ImageNet's features fit the data less well - ImageNet's own head is unsure of
the images (high normalised entropy) *and* its predictions say little of the labels (low LEEP
gain), or an earlier layer's codes beat the top's (the best fixed layer is not the last). A
probe that is already near perfect leaves fine-tuning nothing to win, whatever the size.

The thresholds are provisional: the head's two are midway between the two data sets they were
first measured on (Lite0 on the digits: entropy 0.79, LEEP gain 0.04; on Caltech-101: 0.40 and
0.69). ``benchmarks/advise.py`` measures the rule's regret against the best strategy on every
data set it has, and against a rule that reads the size alone.
Every figure the rule read is in the advice, so a user can check the reasoning.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field

# Images per class (median) below which fine-tuning overfits more than it adapts, and from
# which there is data enough to move the early layers too.
SMALL_PER_CLASS, LARGE_PER_CLASS = 100, 1000
# ImageNet's head: normalised entropy above which it does not recognise the images, LEEP gain
# below which its predictions say little of the labels.
UNSURE_ENTROPY, WEAK_LEEP_GAIN = 0.6, 0.4
EARLIER_WINS = 0.01    # an earlier layer this much better (CV accuracy) than the top's
# A probe at this CV accuracy leaves fine-tuning too little to win for what it risks on a
# budget: set from benchmarks/advise.py, where the digits' stage4 probe (CV 0.959 on the sample,
# test 0.981) beat fine-tuning everything (0.936) by 4.5 points after 1 + 2 epochs, and
# Omniglot's alphabets (best probe CV 0.72) gained 6.2 points by fine-tuning. It was 0.98
# before that measurement; being fitted to the benchmark's data, the held-out check is its test.
NO_HEADROOM = 0.95
EPOCHS = 10            # fine-tuning epochs of the unfrozen stage (the early-stop rule ends it sooner)


@dataclass
class Recommendation:
    """What to run, and why, in words a user can check against the figures."""

    strategy: str                  # linear probe | probe, then fine-tune | fine-tune everything
    layer: str | None              # the best fixed layer (the probe's; fine-tuning keeps it fixed)
    unfreeze_from: str | None      # the first stage trained (``all`` for everything)
    size: str                      # small | medium | large
    similarity: str                # similar | different | unknown
    command: str
    reasons: list[str] = field(default_factory=list)

    def headline(self) -> str:
        """``linear probe on stage4`` or ``probe, then fine-tune, unfreezing from stage5``."""
        if self.strategy == "linear probe":
            return f"linear probe on {self.layer}"
        return f"{self.strategy}, unfreezing from {self.unfreeze_from}"

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "layer": self.layer, "unfreeze_from": self.unfreeze_from,
                "size": self.size, "similarity": self.similarity, "command": self.command,
                "reasons": self.reasons}


def size_class(per_class_median: float) -> str:
    if per_class_median < SMALL_PER_CLASS:
        return "small"
    return "large" if per_class_median >= LARGE_PER_CLASS else "medium"


def similarity_class(entropy: float | None, leep_gain: float | None, gap: float,
                     noise: float = 0.0) -> tuple[str, list[str]]:
    """``similar`` / ``different`` / ``unknown`` and the evidence, one clause each."""
    evidence = []
    head_says = None
    if entropy is not None and leep_gain is not None:
        unsure = entropy >= UNSURE_ENTROPY and leep_gain < WEAK_LEEP_GAIN
        head_says = "different" if unsure else "similar"
        sure = "unsure of" if entropy >= UNSURE_ENTROPY else "fairly sure of"
        evidence.append(f"ImageNet's head is {sure} these images (normalised entropy {entropy:.2f}; "
                        f"{UNSURE_ENTROPY} or more counts as unsure) and its predictions "
                        f"{'say little of' if leep_gain < WEAK_LEEP_GAIN else 'carry information on'} "
                        f"the labels (LEEP gain {leep_gain:.2f}; below {WEAK_LEEP_GAIN} counts as little)")
    if gap >= max(EARLIER_WINS, noise):
        evidence.append(f"an earlier layer's codes beat the top's by {100 * gap:.1f} points (more than "
                        f"twice the folds' standard error, {100 * noise / 2:.1f})")
        return "different", evidence
    if head_says is None:
        evidence.append("the top layer's codes are the best fixed ones (which alone says nothing of "
                        "similarity)")
        return "unknown", evidence
    return head_says, evidence


def recommend(*, data: str, model: str, cache: str, per_class_median: float, n_train: int, n_classes: int,
              entropy: float | None, leep_gain: float | None, layers: list[dict], top: str,
              weights: str = "DEFAULT", decode: str = "reduced") -> Recommendation:
    """The advice from the measured figures (``layers``: one dict per stage in depth order, with
    ``layer``, ``probe_accuracy`` and, where known, ``probe_std`` and ``folds``; ``top`` the
    deepest of them). The command carries ``weights`` and ``decode`` when they are not the
    defaults, so it runs what was measured."""
    scored = [r for r in layers if r.get("probe_accuracy") is not None]
    best = max(scored, key=lambda r: (round(r["probe_accuracy"], 3), -r.get("relative_depth", 0)))
    top_row = next(r for r in scored if r["layer"] == top)
    # the cheapest layer within a point of the best reads as well for less
    cheapest = min((r for r in scored if r["probe_accuracy"] >= best["probe_accuracy"] - 0.01),
                   key=lambda r: r.get("relative_depth", 0))
    gap = best["probe_accuracy"] - top_row["probe_accuracy"]
    # a gap within the folds' noise is no evidence: twice the best layer's standard error
    noise = 2 * best.get("probe_std", 0.0) / math.sqrt(max(1, best.get("folds", 1)))
    size = size_class(per_class_median)
    similarity, evidence = similarity_class(entropy, leep_gain, gap, noise)
    reasons = [f"{n_train} training images in {n_classes} classes, {per_class_median:g} per class (median): "
               f"{size} data (fewer than {SMALL_PER_CLASS} per class is small, {LARGE_PER_CLASS} or more "
               f"large).",
               "Similarity to ImageNet: " + "; ".join(evidence) + f" -> {similarity}."]
    if weights == "none":
        reasons.append("These are random weights: the figures describe an untrained network, and so "
                       "does the advice.")
    layer = cheapest["layer"]
    q = shlex.quote
    extra = (f" -w {q(weights)}" if weights != "DEFAULT" else "") + \
        (f" --decode {q(decode)}" if decode != "reduced" else "")
    probe_cmd = (f"cnncodes extract {q(data)} -m {q(model)}{extra} -l {layer} -o {q(cache)} && "
                 f"cnncodes fit-svm --cache {q(cache)} -l {layer}")
    if best["probe_accuracy"] >= NO_HEADROOM:
        reasons.append(f"A linear probe on {layer} already reaches {best['probe_accuracy']:.3f} (CV): "
                       f"fine-tuning has less than {100 * (1 - NO_HEADROOM):.0f} points to win.")
        return Recommendation("linear probe", layer, None, size, similarity, probe_cmd, reasons)
    if size == "small":
        where = (f"an earlier layer, {layer}" if layer != top else f"the top layer, {layer}")
        reasons.append(f"Small data: keep the network fixed and read {where} "
                       f"(CV accuracy {cheapest['probe_accuracy']:.3f}).")
        return Recommendation("linear probe", layer, None, size, similarity, probe_cmd, reasons)
    stages = [r["layer"] for r in layers if r["layer"].startswith("stage")]
    if similarity == "different" or size == "large":
        # CS231n: large data fine-tunes through the whole network, similar or not; different data
        # needs its early layers moved too, and medium data is enough to move them (measured by
        # benchmarks/advise.py against fine-tuning the top stage alone)
        start, strategy = "all", "fine-tune everything"
        why = (f"{size} and {similarity} data: there is data enough to move every layer"
               + (", and they need to move" if similarity == "different" else ""))
    else:
        start, strategy = stages[-1] if stages else "all", "probe, then fine-tune"
        why = f"{size}, {similarity} data: adapt the top stage ({start}), keep the rest fixed"
    reasons.append(f"{why.capitalize()}; the new head starts as the linear probe of the penultimate "
                   f"codes (LP-FT), so unfreezing does not push a random head's gradients through the "
                   f"pretrained layers.")
    command = (f"cnncodes finetune {q(data)} -m {q(model)}{extra} --stages head:1,{start}:{EPOCHS} "
               f"--init-head probe")
    return Recommendation(strategy, layer, start, size, similarity, command, reasons)
