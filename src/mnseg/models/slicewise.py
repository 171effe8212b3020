"""Run a 2D segmentation model over every slice of a volume, as one 3D model.

Slices along ``axis`` are moved into the batch so the 2D network sees
(B * S, C, H, W); ``slice_batch`` bounds how many slices go through at once
(for memory). Plain tensor ops, so gradients flow and training can use it.
"""

from __future__ import annotations

import torch

from mnseg.errors import ConfigError


class SliceWise(torch.nn.Module):
    spatial_dims = 3

    def __init__(self, model2d: torch.nn.Module, axis: int = -1, slice_batch: int | None = None):
        super().__init__()
        if getattr(model2d, "spatial_dims", 2) != 2:
            raise ConfigError("SliceWise needs a 2D model (spatial_dims == 2)")
        if axis not in (-3, -2, -1, 2, 3, 4):
            raise ConfigError(
                f"SliceWise axis must be a spatial axis of (B, C, X, Y, Z): 2, 3, 4 or -3..-1; got {axis!r}"
            )
        if slice_batch is not None and (not isinstance(slice_batch, int) or slice_batch < 1):
            raise ConfigError(f"SliceWise slice_batch must be a positive integer or None, got {slice_batch!r}")
        self.inner = model2d
        self.axis = axis % 5
        self.slice_batch = slice_batch
        self.checkpoint_chunks = False  # set by enable_activation_checkpointing: recompute each chunk in backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"SliceWise expects (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        batch, slices = x.shape[0], x.shape[self.axis]
        stacked = x.movedim(self.axis, 1).flatten(0, 1)  # (B*S, C, H, W)
        if self.slice_batch is None or self.slice_batch >= stacked.shape[0]:
            out = self._run_chunk(stacked)
        else:
            out = torch.cat([self._run_chunk(chunk) for chunk in stacked.split(self.slice_batch)], dim=0)
        out = out.unflatten(0, (batch, slices))  # (B, S, K, H, W)
        return out.movedim(1, self.axis)

    def _run_chunk(self, chunk: torch.Tensor) -> torch.Tensor:
        if not self.checkpoint_chunks:
            return self.inner(chunk)
        from mnseg.models.checkpointing import checkpointed_call

        return checkpointed_call(self.inner, self.inner, chunk)
