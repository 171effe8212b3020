"""Speed harness for issue 8: mnseg's M&N training step, sliding-window inference and patch loader,
each against the plain way of doing the same work.

Training: one co-training iteration = one 3D step trained on the 2D model's pseudo-masks plus one 2D step
trained on the 3D model's pseudo-masks, on a fixed synthetic batch of ``b_l = B // 2`` labelled and
``b_u = B - b_l`` unlabelled crops (data loading excluded; measured on its own). The "mnseg" side is the real
``MN`` method with models and optimisers from ``mnseg.engine.build`` (bf16 autocast, cudnn.benchmark and fused
AdamW on CUDA, gradient clipping as the trainer does); the "plain" side is the same models (same initial
weights) with the same losses written out in fp32 eager PyTorch, default AdamW and a ``.item()`` per step, as
published code does. Inference: ``sliding_window_probabilities`` (bf16 on CUDA) against MONAI's
``sliding_window_inference`` in fp32 with the same model, patch and 50% overlap, on a volume whose size makes
both window grids coincide, so the two masks differ only by precision.

Timings use CUDA events with a synchronise around the timed region (``perf_counter`` on CPU); peak memory is
measured per side after a reset, with the other side's models freed. The CLI is ``benchmarks/speed.py``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

H100_BF16_DENSE_TFLOPS = 989.0


@dataclass(frozen=True)
class Preset:
    """Shapes and models of one benchmark size."""

    name: str
    net2d: dict  # ModelConfig fields of the 2D model (run slice by slice)
    net3d: dict
    crop: tuple[int, int, int]
    batch_size: int
    num_classes: int = 3
    volume: tuple[int, int, int] = (0, 0, 0)  # inference volume: crop + k * crop / 2 so window grids coincide
    sw_batch_size: int = 4


PRESETS = {
    # The paper's shapes: SegFormer-B2-sized (random init, no download) with LoRA over all 64 slices of 5 crops.
    "paper": Preset(
        "paper",
        {"name": "segformer", "kwargs": {"size": "b2"}, "finetune": "lora", "optim": {"lr": 1e-3}},
        {"name": "unet3d_mn", "optim": {"lr": 1e-4}},
        (160, 160, 64),
        5,
        volume=(320, 320, 128),
    ),
    "small": Preset(
        "small",
        {"name": "segformer", "kwargs": {"size": "b0"}, "finetune": "lora", "optim": {"lr": 1e-3}},
        {"name": "unet3d", "kwargs": {"depth": 4, "base_filters": 16}, "optim": {"lr": 1e-4}},
        (96, 96, 32),
        4,
        volume=(192, 192, 64),
    ),
    # Seconds on a CPU (a tiny 2D UNet without LoRA): for the test and a smoke check, not for numbers.
    "tiny": Preset(
        "tiny",
        {"name": "unet2d", "kwargs": {"depth": 3, "base_filters": 4}, "optim": {"lr": 1e-3}},
        {"name": "unet3d", "kwargs": {"depth": 3, "base_filters": 4}, "optim": {"lr": 1e-4}},
        (32, 32, 16),
        2,
        volume=(48, 48, 24),
        sw_batch_size=2,
    ),
}


def batch_split(batch_size: int) -> tuple[int, int]:
    """The fixed (b_l, b_u) split of every timed batch: half labelled (rounded down), the rest unlabelled."""
    b_l = batch_size // 2
    return b_l, batch_size - b_l


# ------------------------------------------------------------------ set-up
def make_config(preset: Preset):
    """An M&N run configuration with the preset's models (stage 1 lasts one epoch, co-training two)."""
    from mnseg.config import Config

    return Config.from_dict(
        {
            "method": {"name": "mn", "params": {"sup_epochs": 1}},
            "models": {"net2d": dict(preset.net2d), "net3d": dict(preset.net3d)},
            "train": {"epochs": 3, "iters_per_epoch": 1, "batch_size": preset.batch_size},
            "data": {"patch_size": list(preset.crop)},
        }
    )


def build_master_models(preset: Preset, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The two roles on the CPU; each side of the benchmark trains its own device copy of these weights."""
    from mnseg.engine.build import build_model

    cfg = make_config(preset)
    torch.manual_seed(seed)
    return {role: build_model(cfg.models[role], 1, preset.num_classes) for role in ("net2d", "net3d")}


def make_batch(preset: Preset, device: torch.device, seed: int = 0):
    """A synthetic training batch: noise images, blob labels (two nested boxes) on the device."""
    from mnseg.methods.base import Batch

    b_l, b_u = batch_split(preset.batch_size)
    gen = torch.Generator().manual_seed(seed)
    image_l = torch.randn((b_l, 1, *preset.crop), generator=gen)
    image_u = torch.randn((b_u, 1, *preset.crop), generator=gen)
    label = torch.zeros((b_l, *preset.crop), dtype=torch.int64)
    quarter = tuple(slice(s // 4, 3 * s // 4) for s in preset.crop)
    label[(slice(None), *quarter)] = 1
    label[(slice(None), *(slice(s // 2 - s // 8, s // 2 + s // 8) for s in preset.crop))] = preset.num_classes - 1
    return Batch(image_l.to(device), label.to(device), image_u.to(device))


def _copy_to(models: dict, device: torch.device) -> dict[str, torch.nn.Module]:
    return {role: copy.deepcopy(m).to(device) for role, m in models.items()}


class MnsegSide:
    """The real ``MN`` method, engine-built optimisers, bf16 autocast on CUDA; ``step`` = one co-training pair."""

    name = "mnseg"

    def __init__(self, preset: Preset, masters: dict, device: torch.device):
        from mnseg.engine.build import build_optimizer
        from mnseg.methods.base import MethodContext
        from mnseg.methods.mn import MN

        self.cfg, self.device = make_config(preset), device
        self.models = _copy_to(masters, device)
        self.optimizers = {r: build_optimizer(m, self.cfg.models[r].optim, device) for r, m in self.models.items()}
        b_l, b_u = batch_split(preset.batch_size)
        ctx = MethodContext(
            num_classes=preset.num_classes,
            in_channels=1,
            ignore_index=None,
            batch_size=preset.batch_size,
            epochs=self.cfg.train.epochs,
            iters_per_epoch=1,
            n_labeled=1,
            n_unlabeled=1,
            device=device,
        )
        self.method = MN(self.cfg, ctx)
        self.method.attach(self.models, {}, self.optimizers)  # no augmenters: the same work as the plain side
        # 3D trained on 2D pseudo-masks, then 2D trained on 3D pseudo-masks.
        self.epochs = (self.method.sup_epochs, self.method.sup_epochs + 1)
        self.losses: list[torch.Tensor] = []  # kept on the device: reading them would sync

    def compile(self) -> None:
        """torch.compile both roles (optional: measure whether it helps)."""
        self.method.models = {r: torch.compile(m) for r, m in self.models.items()}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch) -> None:
        torch.backends.cudnn.benchmark = True
        for epoch in self.epochs:
            role = self.method.trained_role(epoch)
            for r, model in self.models.items():
                model.train(r == role)
            optimizer = self.optimizers[role]
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.method.training_step(batch, epoch, 0)
            self.losses.append(out.loss.detach())
            out.loss.backward()
            clip = self.cfg.models[role].optim.grad_clip
            if clip:
                torch.nn.utils.clip_grad_norm_(self.models[role].parameters(), clip)
            optimizer.step()


def _plain_dice_loss(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    dims = (0, *range(2, probs.dim()))
    intersection = (probs * target).sum(dims)
    denominator = probs.sum(dims) + target.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


class PlainSide:
    """The same recipe as published code writes it: fp32 eager, default AdamW, losses inline, ``.item()``."""

    name = "plain"

    def __init__(self, preset: Preset, masters: dict, device: torch.device):
        cfg = make_config(preset)
        self.models = _copy_to(masters, device)
        self.optimizers = {
            r: torch.optim.AdamW(
                [p for p in m.parameters() if p.requires_grad],
                lr=cfg.models[r].optim.lr,
                weight_decay=cfg.models[r].optim.weight_decay,
            )
            for r, m in self.models.items()
        }
        self.num_classes = preset.num_classes
        self.losses: list[float] = []

    def compile(self) -> None:
        """The plain side stays eager."""

    def _train_one(self, role: str, other: str, batch) -> None:
        model, generator = self.models[role], self.models[other]
        model.train()
        generator.eval()
        b_l, b_u = batch.image_l.shape[0], batch.image_u.shape[0]
        with torch.no_grad():
            pseudo = F.softmax(generator(batch.image_u), dim=1)
        logits = model(torch.cat([batch.image_l, batch.image_u]))
        out_l, out_u = logits[:b_l], logits[b_l:]
        one_hot = F.one_hot(batch.label_l, self.num_classes).movedim(-1, 1).float()
        loss_l = F.cross_entropy(out_l, batch.label_l) + _plain_dice_loss(F.softmax(out_l, dim=1), one_hot)
        kl = F.kl_div(F.log_softmax(out_u, dim=1), pseudo, reduction="none").sum(dim=1).mean()
        loss_u = kl + _plain_dice_loss(F.softmax(out_u, dim=1), pseudo)
        loss = b_l / (b_l + b_u) * loss_l + b_u / (b_l + b_u) * loss_u
        self.optimizers[role].zero_grad()
        loss.backward()
        self.optimizers[role].step()
        self.losses.append(loss.item())

    def step(self, batch) -> None:
        torch.backends.cudnn.benchmark = False
        self._train_one("net3d", "net2d", batch)
        self._train_one("net2d", "net3d", batch)


# ------------------------------------------------------------------ measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls (CUDA events on a GPU)."""
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        synchronize(device)
        return start.elapsed_time(end) / 1000.0 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (forward and backward matmuls/convolutions, as torch's FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def profile_table(fn: Callable[[], object], device: torch.device, calls: int = 2, rows: int = 12) -> str:
    """torch.profiler's top ops by self time (device time on CUDA) over ``calls`` calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_side(side, batch, device: torch.device, warmup: int, iters: int, compile: bool, profile: bool) -> dict:
    """FLOPs (one eager iteration, which also warms up), then ms per iteration and peak memory."""
    flops = count_flops(lambda: side.step(batch))
    if compile:
        side.compile()
    for _ in range(max(warmup, 1 if compile else 0)):  # compilation never falls in the timed region
        side.step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_calls(lambda: side.step(batch), iters, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    result = {
        "ms_per_iter": seconds * 1000.0,
        "peak_memory_mib": peak,
        "flops_per_iter": flops,
        "tflops_per_s": flops / seconds / 1e12,
    }
    if profile:
        result["profile"] = profile_table(lambda: side.step(batch), device)
    return result


def bench_training(
    preset: Preset,
    device: torch.device,
    masters: dict | None = None,
    warmup: int = 3,
    iters: int = 10,
    compile: bool = False,
    profile: bool = False,
    seed: int = 0,
) -> dict:
    """ms per co-training iteration, peak memory and achieved TFLOP/s of both sides, run one after the other."""
    masters = masters if masters is not None else build_master_models(preset, seed)
    batch = make_batch(preset, device, seed)
    result = {}
    for cls in (MnsegSide, PlainSide):
        side = cls(preset, masters, device)
        result[cls.name] = measure_side(side, batch, device, warmup, iters, compile and cls is MnsegSide, profile)
        del side
        _free(device)
    mnseg, plain = result["mnseg"], result["plain"]
    result["speedup"] = plain["ms_per_iter"] / mnseg["ms_per_iter"]
    if mnseg["peak_memory_mib"] and plain["peak_memory_mib"]:
        result["memory_ratio"] = mnseg["peak_memory_mib"] / plain["peak_memory_mib"]
    else:
        result["memory_ratio"] = None
    return result


def _mean_foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the Dice between two label maps (1 for a class absent from both)."""
    scores = []
    for c in range(1, num_classes):
        x, y = a == c, b == c
        total = int(x.sum()) + int(y.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((x & y).sum()) / total)
    return float(np.mean(scores))


def bench_inference(
    preset: Preset,
    device: torch.device,
    masters: dict | None = None,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Volumes/s of mnseg's sliding window (bf16 on CUDA) and MONAI's (fp32), and the Dice between their masks."""
    from monai.inferers import sliding_window_inference

    from mnseg.inference import sliding_window_probabilities

    masters = masters if masters is not None else build_master_models(preset, seed)
    model = copy.deepcopy(masters["net3d"]).to(device).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    image = torch.randn((1, *preset.volume), generator=gen).to(device)
    amp = device.type == "cuda"

    def run_mnseg():
        return sliding_window_probabilities(
            model, image, preset.crop, overlap=0.5, sw_batch_size=preset.sw_batch_size, amp=amp, device=device
        )

    @torch.no_grad()
    def run_monai():
        torch.backends.cudnn.benchmark = False
        probs = sliding_window_inference(
            image[None],
            preset.crop,
            preset.sw_batch_size,
            lambda x: torch.softmax(model(x), dim=1),
            overlap=0.5,
            mode="constant",
        )
        return probs[0]

    def run_mnseg_tuned():
        torch.backends.cudnn.benchmark = True
        return run_mnseg()

    result = {"volume": list(preset.volume)}
    masks = {}
    for name, fn in (("mnseg", run_mnseg_tuned), ("monai", run_monai)):
        for _ in range(warmup):
            masks[name] = fn().argmax(0)
        seconds = time_calls(fn, repeats, device)
        result[name] = {"seconds_per_volume": seconds, "volumes_per_s": 1.0 / seconds}
    result["speedup"] = result["monai"]["seconds_per_volume"] / result["mnseg"]["seconds_per_volume"]
    result["mask_dice"] = _mean_foreground_dice(masks["mnseg"], masks["monai"], preset.num_classes)
    result["foreground_fraction"] = float((masks["mnseg"] > 0).float().mean())  # a Dice of empty masks says little
    return result


def _synthetic_cases(preset: Preset, n: int, labelled: bool, rng: np.random.Generator):
    from mnseg.data.loader import MemoryCase
    from mnseg.data.sampling import foreground_coords

    shape = preset.volume
    cases = []
    for i in range(n):
        image = rng.standard_normal((1, *shape), dtype=np.float32)
        label = np.zeros(shape, np.int16)
        label[tuple(slice(s // 4, 3 * s // 4) for s in shape)] = 1
        label[tuple(slice(s // 2 - s // 8, s // 2 + s // 8) for s in shape)] = preset.num_classes - 1
        fg = foreground_coords(label, rng=rng) if labelled else None
        cases.append(MemoryCase(f"case_{i}", image, label if labelled else None, image.reshape(1, -1).min(axis=1), fg))
    return cases


def bench_loader(preset: Preset, device: torch.device, batches: int = 20, seed: int = 0) -> dict:
    """Samples/s of ``PatchBatcher.next_batch`` + ``batch_to_device`` alone, on synthetic in-memory cases."""
    from mnseg.data.loader import PatchBatcher, batch_to_device

    rng = np.random.default_rng(seed)
    batcher = PatchBatcher(
        _synthetic_cases(preset, 2, True, rng), _synthetic_cases(preset, 2, False, rng), preset.crop, 0.5, None, seed
    )
    b_l, b_u = batch_split(preset.batch_size)

    def one_batch():
        return batch_to_device(batcher.next_batch(b_l, b_u), device)

    one_batch()
    seconds = time_calls(one_batch, batches, device)
    return {"seconds_per_batch": seconds, "samples_per_s": preset.batch_size / seconds}


# ------------------------------------------------------------------ all together
def run_benchmark(
    preset_name: str = "tiny",
    device: torch.device | str = "cpu",
    warmup: int = 3,
    iters: int = 10,
    compile: bool = False,
    profile: bool = False,
    peak_tflops: float | None = None,
    inference_repeats: int = 3,
    loader_batches: int = 20,
    seed: int = 0,
) -> dict:
    """Every measurement of issue 8 for one preset; a JSON-ready dict."""
    from mnseg.errors import ConfigError

    if preset_name not in PRESETS:
        raise ConfigError(f"unknown speed preset '{preset_name}' (choose one of {', '.join(PRESETS)})")
    preset = PRESETS[preset_name]
    device = torch.device(device)
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = H100_BF16_DENSE_TFLOPS
    masters = build_master_models(preset, seed)
    b_l, b_u = batch_split(preset.batch_size)
    result = {
        "preset": asdict(preset),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile": compile,
        "batch": {"B": preset.batch_size, "b_l": b_l, "b_u": b_u},
        "peak_tflops": peak_tflops,
    }
    result["training"] = bench_training(preset, device, masters, warmup, iters, compile, profile, seed)
    for side in ("mnseg", "plain"):
        side_result = result["training"][side]
        side_result["peak_fraction"] = side_result["tflops_per_s"] / peak_tflops if peak_tflops else None
    result["inference"] = bench_inference(preset, device, masters, 1, inference_repeats, seed)
    _free(device)
    result["loader"] = bench_loader(preset, device, loader_batches, seed)
    # Each co-training iteration consumes two batches of B (one per step).
    needed = 2 * preset.batch_size / (result["training"]["mnseg"]["ms_per_iter"] / 1000.0)
    result["loader"]["training_samples_per_s"] = needed
    result["loader"]["keeps_up"] = result["loader"]["samples_per_s"] >= needed
    return result


def _fmt(value, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def format_report(result: dict) -> str:
    """A readable table of ``run_benchmark``'s result."""
    t, inf, load = result["training"], result["inference"], result["loader"]
    p = result["preset"]
    lines = [
        f"preset {p['name']}: crop {tuple(p['crop'])}, B={result['batch']['B']} "
        f"(b_l={result['batch']['b_l']}, b_u={result['batch']['b_u']}), {p['num_classes']} classes, "
        f"device {result['device']}, torch {result['torch']}, compile={result['compile']}",
        "",
        "training (one co-training iteration = 3D step + 2D step)",
        f"  {'side':<6} {'ms/iter':>10} {'peak MiB':>10} {'GFLOP/iter':>11} {'TFLOP/s':>9} {'of peak':>8}",
    ]
    for side in ("mnseg", "plain"):
        s = t[side]
        lines.append(
            f"  {side:<6} {_fmt(s['ms_per_iter'], '10.1f')} {_fmt(s['peak_memory_mib'], '10.0f')} "
            f"{s['flops_per_iter'] / 1e9:11.2f} {s['tflops_per_s']:9.3f} {_fmt(s['peak_fraction'], '8.1%')}"
        )
    lines += [
        f"  speed-up {t['speedup']:.2f}x (target >= 3x on H100); "
        f"memory mnseg/plain {_fmt(t['memory_ratio'], '.2f')} (target <= 0.5)",
        "",
        f"inference (volume {tuple(inf['volume'])}, patch {tuple(p['crop'])}, overlap 0.5)",
        f"  mnseg {inf['mnseg']['volumes_per_s']:.3f} vol/s, MONAI fp32 {inf['monai']['volumes_per_s']:.3f} vol/s, "
        f"speed-up {inf['speedup']:.2f}x (target >= 2x)",
        f"  Dice of the argmax masks {inf['mask_dice']:.5f} ({inf['foreground_fraction']:.1%} of voxels foreground)",
        "",
        f"loader: {load['samples_per_s']:.1f} samples/s; training consumes {load['training_samples_per_s']:.1f} "
        f"samples/s -> {'keeps up' if load['keeps_up'] else 'BOTTLENECK'}",
    ]
    for side in ("mnseg", "plain"):
        if "profile" in t[side]:
            lines += ["", f"profile ({side}, top ops by self time over 2 iterations)", t[side]["profile"]]
    return "\n".join(lines)
