"""Test-time adaptation (issue #20): the loaded model's normalisation layers adapt to the scan being predicted,
before it is predicted. Only the model in memory changes, never the files it was loaded from; by default every
scan starts again from the loaded weights (episodic), so one scan's adaptation never reaches the next.

Why: a scan from another scanner or protocol shifts the features a network computes; the normalisation layers
are the cheapest place to absorb that shift, and the scan itself (no label) is all there is at test time.

``norm``, BN adapt (Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020; Nado et al., "Evaluating prediction-time batch normalization", 2020). A BatchNorm
layer normalises with the training set's running statistics,

    y = gamma * (x - mu_train) / sqrt(var_train + eps) + beta,

which no longer centre the features of a shifted scan. They are replaced by the scan's own,

    mu_scan = 1/T sum_t mean_t(x),    var_scan = 1/T sum_t var_t(x),

the mean over the T window batches that tile the scan (at overlap 0, each voxel about once) of each batch's
mean and (unbiased) variance over its windows and voxels: PyTorch's cumulative average (``momentum=None``). This
is Schneider et al.'s mixture mu = N/(N+n) mu_train + n/(N+n) mu_scan with prior strength N = 0, the full
replacement; a scan's windows hold far more voxels than their test batches. gamma and beta stay as trained.
InstanceNorm (``unet3d``, ``unet3d_mn``, MONAI's DynUNet) and GroupNorm/LayerNorm normalise every window with its
own statistics in training and at test time alike, so they hold no training statistics to replace: ``norm``
leaves them, and a model made only of them, unchanged (``ScanAdapter.notes`` says so).

``entropy``, TENT (Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021, Eq. 1
and Sec. 3). With p = softmax(f_theta(x)) at every voxel v of the scan's tiles Omega,

    H(p_v) = - sum_k p_vk log p_vk,        L(theta) = 1/|Omega| sum_{v in Omega} H(p_v),

and ``steps`` Adam steps (learning rate ``lr``) on L, one step per pass over all tiles (gradients accumulated
window batch by window batch), update only theta = the normalisation layers' affine gamma and beta (every other
parameter frozen); the scan is then predicted with them. TENT normalises with the statistics of the test batch;
here the test batch is the scan, whose windows do not fit one forward pass, so BatchNorm layers first get the
scan's statistics (``norm`` above) and keep them during the steps. That way the prediction does not depend on
how windows are batched. Dropout stays off (the model is in eval mode throughout).

Episodic (TENT's episodic variant, the default): the norm layers are restored after each scan. With
``episodic=False`` (TENT's online setting) they carry over: gamma and beta keep learning, and BatchNorm statistics
become the average over the scans predicted so far; ``restore`` (called by ``predict_folder`` at the end) returns
the loaded model.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mnseg.errors import ConfigError
from mnseg.inference.window import WindowSettings, pad_to_at_least, window_slices
from mnseg.losses import entropy_loss
from mnseg.utils.precision import bf16_autocast

MODES = ("none", "norm", "entropy")
DEFAULT_STEPS = 10
DEFAULT_LR = 1e-3  # TENT's Adam learning rate (its CIFAR setting)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # _NormBase: BatchNorm*d, InstanceNorm*d
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass(frozen=True)
class AdaptSettings:
    """What to adapt on each scan: ``mode`` one of ``MODES``; ``steps`` and ``lr`` for ``entropy``."""

    mode: str = "none"
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    episodic: bool = True  # restore the loaded model after every scan

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown test-time adaptation {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"adaptation steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"adaptation learning rate must be a positive number, got {self.lr!r}")


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every normalisation layer of ``model`` (BatchNorm, InstanceNorm, GroupNorm, LayerNorm)."""
    return [m for m in model.modules() if isinstance(m, _NORMS)]


def running_stat_norms(model: nn.Module) -> list[nn.Module]:
    """The norm layers that normalise with stored statistics at test time (BatchNorm; InstanceNorm that tracks)."""
    return [m for m in norm_layers(model) if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The norm layers' own gamma and beta: all TENT updates."""
    return [p for m in norm_layers(model) for p in m.parameters(recurse=False) if p.is_floating_point()]


def mean_entropy(logits: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean over voxels of the Shannon entropy (nats) of the softmax over classes (dim 1) of ``logits``."""
    if isinstance(logits, list | tuple):  # deep supervision: the full-resolution head comes first
        logits = logits[0]
    return entropy_loss(logits, normalised=False)


class Tiles:
    """Window batches that tile a scan (overlap 0, so each voxel about once) in the sliding window's layout."""

    def __init__(self, image: Tensor, window: WindowSettings, device: torch.device):
        patch = tuple(int(p) for p in window.patch_size)
        volume = image.unsqueeze(0) if image.ndim == len(patch) + 1 else image  # as sliding_window_probabilities
        self.volume, _ = pad_to_at_least(volume.to(device=device, dtype=torch.float32), patch)
        self.jobs = [(b, w) for b in range(self.volume.shape[0])
                     for w in window_slices(self.volume.shape[2:], patch, overlap=0.0)]
        self.batch_size, self.channels_last = window.sw_batch_size, window.channels_last
        self.autocast = lambda: bf16_autocast(device, window.amp, window.cpu_amp)

    def __iter__(self) -> Iterator[tuple[Tensor, float]]:
        """(window batch, its share of all windows), the share weighting each batch's mean into the scan's."""
        for first in range(0, len(self.jobs), self.batch_size):
            chunk = self.jobs[first : first + self.batch_size]
            batch = torch.stack([self.volume[(b, slice(None)) + w] for b, w in chunk])
            if self.channels_last and batch.ndim in _CHANNELS_LAST:
                batch = batch.contiguous(memory_format=_CHANNELS_LAST[batch.ndim])
            yield batch, len(chunk) / len(self.jobs)

    def forward(self, model: nn.Module, batch: Tensor):
        with self.autocast():
            return model(batch)


@torch.no_grad()
def scan_entropy(model: nn.Module, image: Tensor, window: WindowSettings, device: torch.device) -> float:
    """L(theta) above: the model's mean voxel entropy over the scan's tiles (in eval mode)."""
    tiles, was_training = Tiles(image, window, device), model.training
    model.eval()
    try:
        return float(sum(mean_entropy(tiles.forward(model, batch)) * share for batch, share in tiles))
    finally:
        model.train(was_training)


def estimate_statistics(model: nn.Module, tiles: Tiles, reset: bool = True) -> int:
    """BN adapt: the running statistics of every BatchNorm layer become the scan's (see the module docstring);
    ``reset=False`` continues the cumulative average of earlier scans. Returns the number of layers changed."""
    norms = running_stat_norms(model)
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()  # dropout off; only the statistics layers run in training mode
    try:
        for m in norms:
            if reset:
                m.reset_running_stats()
            m.momentum = None  # cumulative average over the window batches
            m.train()
        with torch.no_grad():
            for batch, _ in tiles:
                tiles.forward(model, batch)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(norms)


def minimise_entropy(model: nn.Module, tiles: Tiles, steps: int, lr: float) -> list[float]:
    """TENT: ``steps`` Adam steps on the scan's mean voxel entropy, over the norm layers' affine parameters only.
    Returns the entropy before each step. ``requires_grad`` flags and the model's mode are restored."""
    params = affine_parameters(model)
    flags, was_training = [(p, p.requires_grad) for p in model.parameters()], model.training
    losses = []
    model.eval()
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimiser = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                optimiser.zero_grad(set_to_none=True)
                total = 0.0
                for batch, share in tiles:
                    loss = mean_entropy(tiles.forward(model, batch)) * share
                    loss.backward()
                    total += float(loss.detach())
                optimiser.step()
                losses.append(total)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


def _own_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _norm_kinds(model: nn.Module) -> str:
    """'12 InstanceNorm3d, 2 LayerNorm', for messages."""
    counts = Counter(type(m).__name__ for m in norm_layers(model))
    return ", ".join(f"{n} {name}" for name, n in counts.items()) or "none"


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Tensor], object]]:
    """Everything adaptation may change: the norm layers' parameters, buffers and momentum."""
    saved = []
    for m in norm_layers(model):
        tensors = {name: tensor.detach().clone() for name, tensor in _own_tensors(m)}
        saved.append((m, tensors, getattr(m, "momentum", None)))
    return saved


def _load_snapshot(saved: list[tuple[nn.Module, dict[str, Tensor], object]]) -> None:
    with torch.no_grad():
        for m, tensors, momentum in saved:
            for name, tensor in _own_tensors(m):
                tensor.copy_(tensors[name])
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.momentum = momentum


class ScanAdapter:
    """Adapts ``models`` (a run's predicting models, named by ``roles``) to each scan, in place; ``scan(...)`` is the
    context within which the scan is predicted, restoring the loaded state on exit when episodic."""

    def __init__(self, models: Sequence[nn.Module], roles: Sequence[str | None], settings: AdaptSettings,
                 device: torch.device):
        if settings.mode == "none":
            raise ValueError("ScanAdapter needs an adaptation mode other than 'none'")
        self.models, self.settings, self.device = list(models), settings, device
        self.roles = [r or f"model {i}" for i, r in enumerate(roles or [None] * len(self.models))]
        self.notes = []
        for role, model in zip(self.roles, self.models):
            kinds = _norm_kinds(model)
            if settings.mode == "entropy" and not affine_parameters(model):
                raise ConfigError(f"--adapt entropy: model '{role}' has no normalisation layer with affine "
                                  f"parameters to adapt (its norm layers: {kinds})")
            if settings.mode == "norm" and not running_stat_norms(model):
                self.notes.append(
                    f"note: --adapt norm: model '{role}' has no BatchNorm layer (its norm layers: {kinds}); "
                    f"InstanceNorm, GroupNorm and LayerNorm already normalise each window with its own statistics, "
                    f"so its prediction is unchanged. --adapt entropy adapts their affine parameters instead.")
        self._saved = [_snapshot(m) for m in self.models]
        self._scans = 0
        self.last_losses: list[list[float]] = []  # per model, the entropy before each step on the last scan

    def describe(self) -> str:
        s = self.settings
        what = "BatchNorm statistics (BN adapt)" if s.mode == "norm" else (
            f"entropy minimisation (TENT), {s.steps} Adam step(s) at lr {s.lr:g} on the norm layers' affine parameters")
        scope = "reset after every scan" if s.episodic else "carried over from scan to scan"
        return f"test-time adaptation: {what}, {scope}"

    def adapt(self, image: Tensor, window: WindowSettings) -> None:
        """Adapt every model to ``image`` (``(C, *spatial)``, preprocessed), in place."""
        tiles = Tiles(image, window, self.device)
        reset = self.settings.episodic or self._scans == 0
        self.last_losses = []
        for model in self.models:
            estimate_statistics(model, tiles, reset=reset)
            if self.settings.mode == "entropy":
                self.last_losses.append(minimise_entropy(model, tiles, self.settings.steps, self.settings.lr))
        self._scans += 1

    def restore(self) -> None:
        """Back to the state the models had when the adapter was made (the loaded weights)."""
        for saved in self._saved:
            _load_snapshot(saved)
        self._scans = 0

    @contextlib.contextmanager
    def scan(self, image: Tensor, window: WindowSettings) -> Iterator[None]:
        try:
            self.adapt(image, window)
            yield
        finally:
            if self.settings.episodic:
                self.restore()


def configure_adaptation(run, settings: AdaptSettings, log: Callable[[str], object] = print) -> ScanAdapter | None:
    """Adapt ``run`` (a ``LoadedRun``) on every scan it predicts; ``mode='none'`` leaves it as loaded."""
    run.adapter = None if settings.mode == "none" else ScanAdapter(run.models, run.roles, settings, run.device)
    if run.adapter is not None:
        for note in run.adapter.notes:
            log(note)
    return run.adapter
