"""DANN's gradient reversal layer and domain classifier (``models/domain_classifier.py``)."""

from __future__ import annotations

import pytest
import torch

from mnseg.errors import ConfigError
from mnseg.models import create_model
from mnseg.models.domain_classifier import grad_reverse


@pytest.mark.parametrize("lam", [1.0, 0.25, 3.0])
def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward(lam):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(2, 3, 4)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    (y * weight).sum().backward()
    torch.testing.assert_close(x.grad, -lam * weight)  # d(sum w*x)/dx = w, reversed and scaled


def test_gradient_reversal_with_lambda_zero_stops_the_gradient():
    x = torch.ones(3, requires_grad=True)
    grad_reverse(x, 0.0).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_classifier_reverses_the_gradient_into_its_features_but_descends_on_its_own_weights():
    torch.manual_seed(0)
    clf = create_model("domain_classifier3d", features=8, width=4)
    feats = torch.randn(2, 8, 2, 2, 2, requires_grad=True)
    logits = clf(grad_reverse(feats, 0.5))
    assert logits.shape == (2, 1, 2, 2, 2)
    logits.sum().backward()
    reversed_grad, own = feats.grad.clone(), [p.grad.clone() for p in clf.parameters()]

    feats.grad = None
    clf.zero_grad()
    plain = clf(feats)  # the same classifier without the reversal
    plain.sum().backward()
    torch.testing.assert_close(reversed_grad, -0.5 * feats.grad)
    for a, p in zip(own, clf.parameters()):
        torch.testing.assert_close(a, p.grad)  # the classifier's weights learn as usual


def test_classifier_needs_its_feature_width():
    with pytest.raises(ConfigError, match="features must be a positive whole number"):
        create_model("domain_classifier3d")
    clf = create_model("domain_classifier3d", features=8)
    with pytest.raises(ValueError, match=r"expects \(B, 8, X, Y, Z\)"):
        clf(torch.zeros(1, 4, 2, 2, 2))
