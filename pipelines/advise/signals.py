"""What a few hundred images' codes say about a data set, in seconds and without torch.

Two kinds of signal, for the two axes of the classic transfer rule (small/large x
similar/different):

- How ImageNet's own head reads the images (the 1000 logits of the pretrained classifier):
  :func:`normalised_entropy` of its predictions (near 0: it sees familiar objects; near 1: it
  has no idea) and :func:`leep` (Nguyen et al., ICML 2020: how well the ImageNet label
  distribution predicts the data's labels), normalised by :func:`leep_gain` against the labels'
  own entropy.
- How linearly each layer's codes separate the data's classes: cross-validated probe and k-NN
  accuracy per stage (k-NN by layer is one of the strongest cheap transferability signals),
  and the gap between the best stage and the top.

LogME, which ranks models on one data set rather than data sets, is used only to rank layers.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def normalised_entropy(logits: np.ndarray) -> float:
    """Mean entropy of the softmax predictions over the head's classes, divided by its largest
    possible value (log of the number of classes): 0 = certain, 1 = uniform."""
    p = softmax(logits)
    h = -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
    return float(h.mean() / np.log(p.shape[1]))


def leep(logits: np.ndarray, y: np.ndarray) -> float:
    """LEEP: the mean log-likelihood of the labels under the "expected empirical predictor"
    built from the source head's soft predictions (Nguyen et al. 2020, eq. 2)."""
    theta = softmax(logits)
    y = np.asarray(y, dtype=np.int64)
    n, k = len(y), int(y.max()) + 1
    joint = np.zeros((k, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= n
    conditional = joint / np.clip(joint.sum(0, keepdims=True), 1e-300, None)  # P(y | z)
    likelihood = (theta * conditional[y]).sum(1)
    return float(np.log(np.clip(likelihood, 1e-300, None)).mean())


def label_entropy(y: np.ndarray) -> float:
    """Entropy of the label frequencies (nats): LEEP's value for a head that tells nothing."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def leep_gain(logits: np.ndarray, y: np.ndarray) -> float:
    """LEEP rescaled to [0, 1]: 0 when ImageNet's predictions say nothing of the labels (LEEP
    equals minus the labels' entropy), 1 when they determine them (LEEP = 0)."""
    h = label_entropy(y)
    return float(np.clip(1 + leep(logits, y) / h, 0.0, 1.0)) if h > 0 else 0.0
