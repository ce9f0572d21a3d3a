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


def leep(logits: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """LEEP: the mean log-likelihood of the labels under the "expected empirical predictor"
    built from the source head's soft predictions (Nguyen et al. 2020, eq. 2), cross-fitted.

    Nguyen et al. estimate P(y | z) and score it on the same images; with a few hundred images
    spread over 1,000 source classes that in-sample figure is far from zero even for a head that
    knows nothing of the labels (measured: a LEEP gain of 0.5 for 100 random classes). Here
    P(y | z) is estimated on ``folds - 1`` folds and scored on the held-out one, with the label
    frequencies as a floor (add-``1/n`` smoothing), so an uninformative head scores about minus
    the labels' entropy.
    """
    from cnncodes.pipelines.probes.metrics import stratified_kfold
    theta = softmax(logits)
    y = np.asarray(y, dtype=np.int64)
    k = int(y.max()) + 1
    scores = np.empty(len(y))
    for train, test in stratified_kfold(y, folds, seed):
        joint = np.zeros((k, theta.shape[1]))
        np.add.at(joint, y[train], theta[train])
        prior = np.bincount(y[train], minlength=k) / len(train)
        alpha = 1.0 / len(train)
        conditional = (joint + alpha * prior[:, None]) / (joint.sum(0, keepdims=True) + alpha)  # P(y | z)
        likelihood = (theta[test] * conditional[y[test]].reshape(len(test), -1)).sum(1)
        scores[test] = np.log(np.clip(likelihood, 1e-300, None))
    return float(scores.mean())


def label_entropy(y: np.ndarray) -> float:
    """Entropy of the label frequencies (nats): LEEP's value for a head that tells nothing."""
    counts = np.bincount(np.asarray(y, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def leep_gain(leep_value: float, y: np.ndarray) -> float:
    """A (cross-fitted) LEEP value rescaled to [0, 1]: 0 when ImageNet's predictions say nothing
    of the labels (LEEP at or below minus the labels' entropy), 1 when they determine them
    (LEEP = 0)."""
    h = label_entropy(y)
    return float(np.clip(1 + leep_value / h, 0.0, 1.0)) if h > 0 else 0.0
