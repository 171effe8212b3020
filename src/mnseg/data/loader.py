"""Patch batches from preprocessed cases held in memory.

Cases are small once preprocessed, so they are kept in RAM and cropped on the
fly; a seeded numpy Generator makes the stream reproducible, and its state is
saved in checkpoints so a resumed run draws the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mnseg.data.sampling import extract, foreground_coords, sample_window


@dataclass
class MemoryCase:
    case_id: str
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray | None  # (X, Y, Z) int16
    image_min: np.ndarray  # per-channel pad value
    fg: dict | None = None  # class -> (N, 3) voxel coordinates, for foreground-centred crops


def to_memory_case(pre, ignore_index: int | None, rng: np.random.Generator, aim: bool = True) -> MemoryCase:
    """``aim=False``: no foreground coordinates from the label, so crops are never aimed by it (the unlabelled
    cases of M&N's oracle diagnostic carry labels that only their pseudo-masks may read)."""
    image = np.ascontiguousarray(pre.image, dtype=np.float32)
    fg = foreground_coords(pre.label, ignore_index=ignore_index, rng=rng) if aim and pre.label is not None else None
    return MemoryCase(pre.case_id, image, pre.label, image.reshape(image.shape[0], -1).min(axis=1), fg)


class PatchBatcher:
    """Draws (b_l labelled, b_u unlabelled) patch batches."""

    def __init__(
        self,
        labeled: list[MemoryCase],
        unlabeled: list[MemoryCase],
        patch_size,
        fg_prob: float,
        ignore_index: int | None,
        seed: int,
        class_balanced: bool = True,
    ):
        if not labeled and not unlabeled:
            raise ValueError("no cases to train on")
        self.labeled, self.unlabeled = labeled, unlabeled
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fg_prob, self.class_balanced = fg_prob, class_balanced
        self.label_pad = 0 if ignore_index is None else ignore_index
        self.rng = np.random.default_rng(seed)
        # only M&N's oracle diagnostic gives unlabelled cases labels; then every batch carries their crops too
        self.unlabeled_labels = bool(unlabeled) and all(case.label is not None for case in unlabeled)

    def set_unlabeled_foreground(self, coords: dict[str, dict]) -> None:
        """Foreground of unlabelled cases (from a model's pseudo-masks), so their crops can include it."""
        for case in self.unlabeled:
            case.fg = coords.get(case.case_id, case.fg)

    def _crop(self, case: MemoryCase, with_label: bool):
        window = sample_window(
            case.image.shape[1:], self.patch_size, self.rng, case.fg, self.fg_prob, self.class_balanced
        )
        img = np.stack([extract(case.image[c], window, float(case.image_min[c])) for c in range(case.image.shape[0])])
        lab = extract(case.label, window, self.label_pad) if with_label else None
        return img, lab

    def next_batch(self, b_l: int, b_u: int) -> dict[str, np.ndarray]:
        c = (self.labeled or self.unlabeled)[0].image.shape[0]
        imgs_l, labs_l, imgs_u, labs_u = [], [], [], []
        for _ in range(b_l):
            img, lab = self._crop(self.labeled[self.rng.integers(len(self.labeled))], True)
            imgs_l.append(img)
            labs_l.append(lab)
        for _ in range(b_u if self.unlabeled else 0):
            case = self.unlabeled[self.rng.integers(len(self.unlabeled))]
            img, lab = self._crop(case, self.unlabeled_labels)
            imgs_u.append(img)
            labs_u.append(lab)
        empty = np.zeros((0, c, *self.patch_size), np.float32)
        extra = {}
        if self.unlabeled_labels:
            empty_labels = np.zeros((0, *self.patch_size), np.int64)
            extra["label_u"] = np.stack(labs_u).astype(np.int64) if labs_u else empty_labels
        return {
            **extra,
            "image_l": np.stack(imgs_l).astype(np.float32) if imgs_l else empty,
            "label_l": np.stack(labs_l).astype(np.int64) if labs_l else np.zeros((0, *self.patch_size), np.int64),
            "image_u": np.stack(imgs_u).astype(np.float32) if imgs_u else empty,
        }

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def shard_batch(batch: dict[str, np.ndarray], rank: int, world_size: int) -> dict[str, np.ndarray]:
    """This rank's share of a globally drawn batch: items ``rank::world_size`` of labelled-then-unlabelled.

    Every rank draws the same global batch (same seeded batcher) and keeps its slice, so N processes
    together see exactly the patches one process would. Taking the slice over the labelled and
    unlabelled items together gives every rank the same item count (global batch / world_size) even
    when a method's b_l or b_u is not divisible by world_size; then labelled items go to low ranks.
    """
    if world_size <= 1:
        return batch
    b_l = batch["image_l"].shape[0]
    mine = np.arange(rank, b_l + batch["image_u"].shape[0], world_size)
    own_l, own_u = mine[mine < b_l], mine[mine >= b_l] - b_l
    shard = {"image_l": batch["image_l"][own_l], "label_l": batch["label_l"][own_l], "image_u": batch["image_u"][own_u]}
    if "label_u" in batch:
        shard["label_u"] = batch["label_u"][own_u]
    return shard


def batch_to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    pin = device.type == "cuda"
    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(v)
        if pin:
            t = t.pin_memory()
        out[k] = t.to(device, non_blocking=pin)
    return out
