"""Losses, each returning (loss, dloss/dinput) for a batch.

- softmax_cross_entropy: integer labels, stable log-sum-exp, mean over the batch.
- mse: mean over every element of (pred - target)^2 (PyTorch's default).
"""
from __future__ import annotations

from typing import Any

from worker.nn.layers import xp_of


def _log_softmax_parts(logits: Any, labels: Any) -> tuple[Any, Any, Any]:
    """Return (shifted logits, log-sum-exp of them, per-example loss)."""
    xp = xp_of(logits)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(shifted).sum(axis=1))
    per_example = lse - shifted[xp.arange(n), labels]
    return shifted, lse, per_example


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[float, Any]:
    """Mean cross-entropy of softmax(logits) against integer `labels`, and dlogits.

    logits (N, K) float, labels (N,) int in [0, K). dlogits = (softmax - onehot) / N.
    """
    xp = xp_of(logits)
    n = logits.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    shifted, lse, per_example = _log_softmax_parts(logits, labels)
    probs = shifted
    probs -= lse[:, None]
    xp.exp(probs, out=probs)
    probs[xp.arange(n), labels] -= 1.0
    probs *= 1.0 / n
    return float(per_example.mean()), probs


def cross_entropy_sum_and_correct(logits: Any, labels: Any) -> tuple[float, int]:
    """Summed cross-entropy over the batch and the number of argmax hits (no gradient)."""
    _, _, per_example = _log_softmax_parts(logits, labels)
    correct = (logits.argmax(axis=1) == labels).sum()
    return float(per_example.sum()), int(correct)


def mse(pred: Any, target: Any) -> tuple[float, Any]:
    """Mean squared error over all elements, and dpred = 2 (pred - target) / size."""
    if pred.shape != target.shape:
        raise ValueError(f"mse needs equal shapes, got {pred.shape} and {target.shape}")
    diff = pred - target
    loss = float((diff * diff).mean())
    diff *= 2.0 / diff.size
    return loss, diff
