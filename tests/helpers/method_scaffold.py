"""What the per-method unit tests share: a small MethodContext, and models attached with SGD optimisers."""

from __future__ import annotations

import torch

from mnseg.methods.base import MethodContext


def tiny_context(**overrides) -> MethodContext:
    """2 classes, 1 channel, no ignore label, B = 2, 2 labelled and 2 unlabelled cases, 2 epochs of 5."""
    settings = dict(num_classes=2, in_channels=1, ignore_index=None, batch_size=2, epochs=2, iters_per_epoch=5,
                    n_labeled=2, n_unlabeled=2)
    settings.update(overrides)
    return MethodContext(**settings)


def attach_with_sgd(method, models: dict, trained=None, lr: float = 0.1):
    """Attach ``models``; each role in ``trained`` (default: every role) gets SGD over its trainable parameters."""
    roles = models if trained is None else trained
    optims = {r: torch.optim.SGD([p for p in models[r].parameters() if p.requires_grad], lr=lr) for r in roles}
    method.attach(models, {}, optims)
    return method


def assert_supervised_only_without_unlabelled_items(method, batch, net, ignore_index) -> None:
    """With no unlabelled case a semi-supervised method asks for none and its loss is the supervised loss of
    ``net`` (a 1x1x1 convolution) on the labelled items, with no ``loss_u`` logged."""
    import pytest

    from tests.helpers.numpy_reference import conv1x1, np_supervised

    assert method.batch_split(0, 0) == (batch.b_l, 0)
    out = method.training_step(batch, 0, 0)
    expected = np_supervised(conv1x1(net, batch.image_l), batch.label_l.numpy(), ignore_index)
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert "loss_u" not in out.logs
