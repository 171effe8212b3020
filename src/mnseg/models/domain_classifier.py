"""DANN's gradient reversal layer and a small domain classifier over a 3D UNet's bottleneck features.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation" (ICML 2015): features f = G_f(x), a label
predictor G_y and a domain classifier G_d trained at the saddle point of
    E(theta_f, theta_y, theta_d) = sum_{i source} L_y(G_y(G_f(x_i)), y_i) - lambda sum_i L_d(G_d(G_f(x_i)), d_i),
    theta_d minimises E's domain term (G_d learns to tell source d=0 from target d=1),
    theta_f maximises it (features the domain classifier cannot tell apart).
One backward pass reaches that saddle point through the gradient reversal layer R_lambda placed between G_f and
G_d:  R_lambda(x) = x in the forward pass,  dR_lambda/dx = -lambda I in the backward pass.

``DomainClassifier3D`` is G_d: a per-position MLP (1x1x1 convolutions, LeakyReLU 0.2, no normalisation) over the
bottleneck's (B, E, *S) features, giving one source/target logit per bottleneck position (B, 1, *S); the
adaptation computes ``classifier(grad_reverse(features, lam))`` = G_d(R_lambda(f)). R_lambda stays outside the
classifier's forward so that ``train.compile`` (which compiles that forward) does not recompile for every new
lambda of the schedule. Per-position logits, not one per
pooled crop: after instance norm a channel's spatial mean is its norm's bias whatever the input, so a pooled
vector would hide most of what differs between domains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnseg.errors import ConfigError
from mnseg.models.registry import register_model


class GradientReversal(torch.autograd.Function):
    """R_lambda: identity forward, gradient times -lambda backward (Ganin & Lempitsky 2015, eq. 9-10)."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.lam, None


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """R_lambda(x): ``x`` unchanged, its gradient multiplied by ``-lam`` on the way back."""
    return GradientReversal.apply(x, lam)


class DomainClassifier3D(nn.Module):
    """G_d: per-position source (0) / target (1) logits of (B, E, X, Y, Z) features (reversed by the caller)."""

    spatial_dims = 3

    def __init__(self, features: int, width: int = 64):
        super().__init__()
        for name, value in (("features", features), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model 'domain_classifier3d': {name} must be a positive whole number, got "
                                  f"{value!r} (features is set from the adapted network's bottleneck)")
        self.features = features
        self.classify = nn.Sequential(
            nn.Conv3d(features, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(width, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(width, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 5 or features.shape[1] != self.features:
            raise ValueError(f"domain classifier expects (B, {self.features}, X, Y, Z) features, "
                             f"got {tuple(features.shape)}")
        return self.classify(features)


@register_model("domain_classifier3d")
def domain_classifier3d(in_channels: int = 1, num_classes: int = 2, features: int = 0,
                        width: int = 64) -> DomainClassifier3D:
    """DANN's domain classifier (the dataset's ``in_channels`` and ``num_classes`` are not used; ``features`` comes
    from the adapted network)."""
    return DomainClassifier3D(features, width)
