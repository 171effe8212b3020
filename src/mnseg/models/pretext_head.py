"""The small heads of self-supervised pretraining (``methods/pretrain.py``), one model role beside the network.

They read the network's features and are left behind after pretraining: a later run loads the network's weights
alone (``models.<role>.init``). Only the heads a task uses are built, so every parameter gets a gradient (DDP's
reducer needs that). Features come channel-last (``(..., width)``), so one head serves pooled vectors and voxels.

- ``classify`` (rotation): pooled encoder features (B, E) -> Linear-ReLU-Linear -> (B, classes) logits;
- ``project`` (contrastive, global): pooled encoder features (B, E) -> Linear-ReLU-Linear -> (B, dim), SimCLR's
  projection head;
- ``project_local`` (contrastive, voxel-local): voxel features (N, D) -> Linear-ReLU-Linear -> (N, dim);
- ``reconstruct`` (reconstruction): voxel features (..., D) -> Linear -> (..., in_channels) intensities (a 1x1x1
  convolution: the decoder itself must carry the volume).
- ``cluster`` (clustering): voxel features (N, D) -> Linear -> (N, classes) cluster scores, IIC's linear head
  before its softmax (a 1x1x1 convolution).

The widths (``encoder_width``, ``local_width``) and ``classes`` are set by the pretrain method from the network it
trains (``Method.derived_kwargs``), never by hand.
"""

from __future__ import annotations

from torch import Tensor, nn

from mnseg.errors import ConfigError
from mnseg.models.registry import check_choice, register_model

TASKS = ("rotation", "contrastive", "reconstruction", "clustering")


def mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class PretextHead(nn.Module):
    def __init__(self, in_channels: int, task: str, encoder_width: int, local_width: int, classes: int, dim: int,
                 hidden: int):
        super().__init__()
        check_choice("pretext_head", "task", task, TASKS)
        sizes = {"encoder_width": encoder_width, "local_width": local_width, "classes": classes, "dim": dim,
                 "hidden": hidden}
        for name, value in sizes.items():
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"model 'pretext_head': {name} must be a whole number >= 0, got {value!r}")
        needs = {"rotation": ("encoder_width", "classes"), "contrastive": ("encoder_width", "local_width"),
                 "reconstruction": ("local_width",), "clustering": ("local_width", "classes")}[task]
        unset = [n for n in needs if not sizes[n]]
        if unset:
            raise ConfigError(f"model 'pretext_head' (task {task}): {', '.join(unset)} unset; the pretrain method "
                              "sets them from the network it trains")
        self.task = task
        if task == "rotation":
            self.classify = mlp(encoder_width, hidden, classes)
        elif task == "contrastive":
            self.project = mlp(encoder_width, hidden, dim)
            self.project_local = mlp(local_width, hidden, dim)
        elif task == "clustering":
            self.cluster = nn.Linear(local_width, classes)
        else:
            self.reconstruct = nn.Linear(local_width, in_channels)

    def forward(self, pooled: Tensor | None = None, voxels: Tensor | None = None) -> tuple[Tensor | None, ...]:
        """(the pooled features' output, the voxel features' output); None where no input or head."""
        if self.task == "rotation":
            return self.classify(pooled), None
        if self.task == "contrastive":
            return self.project(pooled), self.project_local(voxels)
        if self.task == "clustering":
            return None, self.cluster(voxels)
        return None, self.reconstruct(voxels)


@register_model("pretext_head")
def pretext_head(
    in_channels: int = 1,
    num_classes: int = 2,
    task: str = "rotation",
    encoder_width: int = 0,
    local_width: int = 0,
    classes: int = 0,
    dim: int = 128,
    hidden: int = 256,
) -> PretextHead:
    """The heads of one pretext task (``num_classes``, the dataset's, is not used)."""
    return PretextHead(in_channels, task, encoder_width, local_width, classes, dim, hidden)
