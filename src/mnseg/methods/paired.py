"""What the two-network methods share (CPS, the dual-subnet contrast): networks ``net_a`` and ``net_b`` fed one
augmented batch of B labelled and B unlabelled patches (B = train.batch_size; no unlabelled patches without
unlabelled cases), the labelled loss's weights, and which network predicts (a, b or their average)."""

from __future__ import annotations

from dataclasses import dataclass

from mnseg.methods.base import Method, Params


@dataclass
class PairedParams(Params):
    w_ce: float = 1.0  # weight of cross-entropy in the labelled loss
    w_dice: float = 1.0  # weight of soft Dice
    predict: str = "a"  # which network predicts: a, b or average


class PairedNetworks(Method):
    """Base for a method that trains ``net_a`` and ``net_b`` side by side on one augmented batch."""

    params_class = PairedParams
    augmented_as = {"net_b": "net_a"}  # one augmented batch feeds both networks
    predict_role = "net_a"

    def batch_split(self, epoch: int, iteration: int) -> tuple[int, int]:
        B = self.ctx.batch_size
        return B, (B if self.ctx.n_unlabeled > 0 else 0)

    def predictor(self, which: str | None = None):
        return self.pick_predictor(which, {"a": "net_a", "b": "net_b"}, "a")
