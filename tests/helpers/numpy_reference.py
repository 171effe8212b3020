"""Independent numpy references for the method tests' hand-computed losses (one copy for every method file)."""

from __future__ import annotations

import numpy as np

SMOOTH = 1e-5  # soft Dice smoothing of mnseg.losses


def np_softmax(logits):
    """Softmax over axis 1 (the class axis of (N, K, ...))."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def conv1x1(conv, image):
    """What a 1x1x1 ``Conv3d(1, K)`` computes on (N, 1, ...) ``image``, as numpy logits (N, K, ...)."""
    w, b = conv.weight.detach().numpy().reshape(-1), conv.bias.detach().numpy()
    x = image.numpy()[:, 0]
    return np.stack([w[k] * x + b[k] for k in range(len(w))], axis=1)


def np_supervised(logits, label, ignore_index, w_ce=0.5, w_dice=0.5):
    """w_ce * CE + w_dice * (1 - mean_c batch soft Dice), both over the voxels that are not ``ignore_index``."""
    classes = logits.shape[1]
    p = np_softmax(logits)
    valid = label != ignore_index
    onehot = np.stack([(label == c) for c in range(classes)], axis=1).astype(float)
    ce = -(np.log(p) * onehot).sum(axis=1)[valid].mean()
    v = valid.astype(float)
    dice = [
        (2 * (p[:, c] * onehot[:, c] * v).sum() + SMOOTH) / ((p[:, c] * v).sum() + (onehot[:, c] * v).sum() + SMOOTH)
        for c in range(classes)
    ]
    return w_ce * ce + w_dice * (1 - np.mean(dice))
