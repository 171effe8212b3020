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

Variants (issue 8's speed options, all off by default in the trainer) time the mnseg side with
``train.channels_last``, ``frozen_dtype: bfloat16`` on the roles with frozen weights, ``torch.compile`` or all
of them, each against the same plain baseline (measured once), in one process, so one GPU call compares them.
``checkpoint`` (activation checkpointing of both roles) and ``memory`` (it with bf16 frozen weights) trade a
recompute for memory; their FLOP counts include the recompute, so their TFLOP/s is work done, not useful work.

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

from mnseg.models.compiled import COMPILE_MODES  # the modes train.compile_mode accepts

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
    checkpoint_slice_batch: int = 32  # slices per recomputed chunk of the 2D model in checkpointing variants


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
        checkpoint_slice_batch=8,
    ),
}


def batch_split(batch_size: int) -> tuple[int, int]:
    """The fixed (b_l, b_u) split of every timed batch: half labelled (rounded down), the rest unlabelled."""
    b_l = batch_size // 2
    return b_l, batch_size - b_l


@dataclass(frozen=True)
class Variant:
    """One set of mnseg speed options to time (each against the same plain baseline)."""

    name: str
    channels_last: bool = False  # train.channels_last: models and batches in channels-last(-3d) memory format
    frozen_bf16: bool = False  # frozen_dtype=bfloat16 on every role with frozen weights (LoRA / decoder tuning)
    compile: bool = False  # torch.compile both roles (and the inference model)
    checkpoint: bool = False  # activation_checkpoint on both roles (the 2D one per checkpoint_slice_batch slices)


VARIANTS = {
    "base": Variant("base"),
    "channels_last": Variant("channels_last", channels_last=True),
    "frozen_bf16": Variant("frozen_bf16", frozen_bf16=True),
    "compile": Variant("compile", compile=True),
    "all": Variant("all", channels_last=True, frozen_bf16=True, compile=True),
    "checkpoint": Variant("checkpoint", checkpoint=True),
    "memory": Variant("memory", frozen_bf16=True, checkpoint=True),  # both memory savers, no compile
}


def parse_variants(text: str) -> list[Variant]:
    """``"base,channels_last"`` -> variants in that order; ConfigError for unknown, repeated or no names."""
    from mnseg.errors import ConfigError

    names = [n.strip() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise ConfigError(f"unknown speed variant(s) {unknown or [text]}; choose from {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"speed variants repeat a name: {text}")
    return [VARIANTS[n] for n in names]


# ------------------------------------------------------------------ set-up
def make_config(preset: Preset, variant: Variant = VARIANTS["base"]):
    """An M&N run configuration with the preset's models (stage 1 lasts one epoch, co-training two) and the
    variant's options (``frozen_dtype`` only on roles that freeze weights: elsewhere it is a config error)."""
    from mnseg.config.schema import Config

    models = {"net2d": dict(preset.net2d), "net3d": dict(preset.net3d)}
    if variant.frozen_bf16:
        for role, fields in models.items():
            if fields.get("finetune") in ("lora", "decoder"):
                models[role] = {**fields, "frozen_dtype": "bfloat16"}
    if variant.checkpoint:
        models["net2d"] = {**models["net2d"], "activation_checkpoint": True,
                           "slice_batch": preset.checkpoint_slice_batch}
        models["net3d"] = {**models["net3d"], "activation_checkpoint": True}
    return Config.from_dict(
        {
            "method": {"name": "mn", "params": {"sup_epochs": 1}},
            "models": models,
            "train": {
                "epochs": 3,
                "iters_per_epoch": 1,
                "batch_size": preset.batch_size,
                "channels_last": variant.channels_last,
            },
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
    """The real ``MN`` method, engine-built optimisers, bf16 autocast on CUDA; ``step`` = one co-training pair.

    Models are built and placed as the trainer does it (``build_model`` with the variant's activation
    checkpointing, the masters' weights loaded, then ``place_model``: channels-last and bf16 frozen weights), and
    each step's batch is converted as the trainer converts it."""

    name = "mnseg"

    def __init__(
        self,
        preset: Preset,
        masters: dict,
        device: torch.device,
        variant: Variant = VARIANTS["base"],
        compile_mode: str | None = None,
    ):
        from mnseg.engine.build import build_optimizer, place_model
        from mnseg.methods.base import MethodContext
        from mnseg.methods.mn import MN

        self.cfg, self.device = make_config(preset, variant), device
        self.variant, self.compile_mode = variant, compile_mode
        self.models = {
            role: place_model(self._built_like(role, m, preset), self.cfg.models[role], self.cfg.train, device)
            for role, m in masters.items()
        }
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

    def _built_like(self, role: str, master: torch.nn.Module, preset: Preset) -> torch.nn.Module:
        """The role built from this variant's config, holding the master's weights (state-dict names do not
        depend on the options)."""
        from mnseg.engine.build import build_model

        model = build_model(self.cfg.models[role], 1, preset.num_classes)
        model.load_state_dict(master.state_dict())
        return model

    def compile(self) -> None:
        """torch.compile both roles' forwards as the trainer does with ``train.compile`` (``compile_forward``)."""
        from mnseg.models.compiled import compile_forward

        for model in self.models.values():
            compile_forward(model, self.compile_mode or "default")

    def bf16_frozen_tensors(self) -> dict[str, int]:
        """Per role, how many parameters are stored in bf16 (non-zero only where frozen_bf16 took effect)."""
        return {r: sum(p.dtype == torch.bfloat16 for p in m.parameters()) for r, m in self.models.items()}

    def _adapt(self, batch):
        """The batch as the trainer hands it to the method under this variant."""
        if not self.cfg.train.channels_last:
            return batch
        from mnseg.engine.build import to_channels_last
        from mnseg.methods.base import Batch

        return Batch(to_channels_last(batch.image_l), batch.label_l, to_channels_last(batch.image_u))

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch) -> None:
        """The trainer's step for each role in turn: its batch conversion, autocast, the method's loss and the
        engine's ``backward_and_step``."""
        from mnseg.engine.trainer import backward_and_step

        torch.backends.cudnn.benchmark = True
        batch = self._adapt(batch)
        for epoch in self.epochs:
            role = self.method.trained_role(epoch)
            for r, model in self.models.items():
                model.train(r == role)
            optimizer = self.optimizers[role]
            optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                out = self.method.training_step(batch, epoch, 0)
            self.losses.append(out.loss.detach())
            backward_and_step(out.loss, self.models, self.optimizers, [role], self.cfg.models)


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


def _free(device: torch.device, compiled: bool = False) -> None:
    if compiled:  # compiled graphs (and CUDA-graph pools) hold memory until dynamo forgets them
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_side(side, batch, device: torch.device, warmup: int, iters: int, compile: bool, profile: bool) -> dict:
    """FLOPs (one eager iteration, which also warms up), then ms per iteration and peak memory."""
    flops = count_flops(lambda: side.step(batch))
    if compile:
        side.compile()
    # Compilation never falls in the timed region (CUDA graphs record over the first calls, hence 3).
    for _ in range(max(warmup, 3 if compile else 0)):
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


def _against_plain(mnseg: dict, plain: dict) -> dict:
    """One variant's training entry: its mnseg side, speed-up and memory ratio over the plain side."""
    ratio = None
    if mnseg["peak_memory_mib"] and plain["peak_memory_mib"]:
        ratio = mnseg["peak_memory_mib"] / plain["peak_memory_mib"]
    return {"mnseg": mnseg, "speedup": plain["ms_per_iter"] / mnseg["ms_per_iter"], "memory_ratio": ratio}


def _guarded(run: Callable[[], dict], keep_going: bool, device: torch.device) -> dict:
    """``run()``, or with ``keep_going`` its failure as ``{"error": ...}`` so the other variants still run."""
    if not keep_going:
        return run()
    try:
        return run()
    except Exception as error:  # noqa: BLE001 - one variant failing (compile, OOM) must not lose the others
        _free(device, compiled=True)
        return {"error": f"{type(error).__name__}: {error}"}


def bench_training(
    preset: Preset,
    device: torch.device,
    masters: dict | None = None,
    warmup: int = 3,
    iters: int = 10,
    compile: bool = False,
    profile: bool = False,
    seed: int = 0,
    variants: list[Variant] | None = None,
    compile_mode: str | None = None,
    keep_going: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """ms per co-training iteration, peak memory and achieved TFLOP/s of the plain side (once) and the mnseg side
    under each variant (``compile`` compiles every variant), one after the other with memory freed in between.
    ``log`` gets a line per finished side, so a run cut off by a time limit still leaves what it measured.

    Returns ``{"plain": ..., "variants": {name: {"mnseg", "speedup", "memory_ratio", "bf16_frozen_tensors"}}}``
    plus, for the first variant, the single-variant keys ``mnseg``, ``speedup``, ``memory_ratio``.
    """
    masters = masters if masters is not None else build_master_models(preset, seed)
    variants = variants or [VARIANTS["base"]]
    batch = make_batch(preset, device, seed)
    plain = PlainSide(preset, masters, device)
    result = {"plain": measure_side(plain, batch, device, warmup, iters, False, profile), "variants": {}}
    log = log or (lambda line: None)
    log(f"training plain fp32: {_side_line(result['plain'])}")
    del plain
    _free(device)
    for variant in variants:
        compiled = compile or variant.compile

        def run(variant=variant, compiled=compiled) -> dict:
            side = MnsegSide(preset, masters, device, variant, compile_mode)
            entry = _against_plain(measure_side(side, batch, device, warmup, iters, compiled, profile), result["plain"])
            entry["bf16_frozen_tensors"] = side.bf16_frozen_tensors()
            return entry

        _record(result, variant, run, compiled, "training", lambda entry: (
            f"{_side_line(entry['mnseg'])}, speed-up {entry['speedup']:.2f}x, memory ratio "
            f"{_fmt(entry['memory_ratio'], '.2f')}"), keep_going, device, log)
    return _promote_first(result, variants, ("mnseg", "speedup", "memory_ratio"))


def _record(result: dict, variant: Variant, run: Callable[[], dict], compiled: bool, what: str,
            summary: Callable[[dict], str], keep_going: bool, device: torch.device, log) -> None:
    """One variant: ``run()`` (guarded), its entry under ``result["variants"]``, a log line (its summary or its
    error), then its memory freed."""
    entry = result["variants"][variant.name] = _guarded(run, keep_going, device)
    log(f"{what} {variant.name}: " + (entry["error"] if "error" in entry else summary(entry)))
    _free(device, compiled)


def _promote_first(result: dict, variants: list[Variant], keys: tuple[str, ...]) -> dict:
    """The first variant's figures also at the top level (as for a single variant), unless it failed."""
    first = result["variants"][variants[0].name]
    if "error" not in first:
        result.update({k: first[k] for k in keys})
    return result


def _side_line(side: dict) -> str:
    return f"{side['ms_per_iter']:.1f} ms/iter, peak {_fmt(side['peak_memory_mib'], '.0f', ' MiB')}"


def _mean_foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """Mean over foreground classes of the Dice between two label maps (1 for a class absent from both)."""
    from mnseg.evaluation.metrics import dice

    a, b = a.cpu().numpy(), b.cpu().numpy()
    return float(np.mean([dice(a == c, b == c) for c in range(1, num_classes)]))


def bench_inference(
    preset: Preset,
    device: torch.device,
    masters: dict | None = None,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    variants: list[Variant] | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
    keep_going: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Volumes/s of mnseg's sliding window (bf16 on CUDA) under each variant and of MONAI's (fp32, once), and the
    Dice between their masks. The inference model is the 3D role (no frozen weights: frozen_bf16 changes
    nothing here; activation checkpointing acts only when gradients are recorded); channels_last and compile
    apply to it, so a variant whose inference equals an earlier one's is not timed again: its entry is a copy
    marked ``same_as``. The first variant's figures also sit at the top level (``mnseg``, ``speedup``,
    ``mask_dice``, ``foreground_fraction``) as for a single variant."""
    from monai.inferers import sliding_window_inference

    from mnseg.engine.build import to_channels_last
    from mnseg.inference.window import sliding_window_probabilities

    masters = masters if masters is not None else build_master_models(preset, seed)
    variants = variants or [VARIANTS["base"]]
    gen = torch.Generator().manual_seed(seed + 1)
    image = torch.randn((1, *preset.volume), generator=gen).to(device)
    amp = device.type == "cuda"

    def timed(fn) -> tuple[dict, torch.Tensor]:
        mask = None
        for _ in range(warmup):
            mask = fn().argmax(0)
        seconds = time_calls(fn, repeats, device)
        return {"seconds_per_volume": seconds, "volumes_per_s": 1.0 / seconds}, mask

    def monai_baseline() -> tuple[dict, torch.Tensor]:
        model = copy.deepcopy(masters["net3d"]).to(device).eval()

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

        return timed(run_monai)

    monai_timing, monai_mask = monai_baseline()
    _free(device)
    result = {"volume": list(preset.volume), "monai": monai_timing, "variants": {}}
    log = log or (lambda line: None)
    log(f"inference MONAI fp32: {monai_timing['volumes_per_s']:.3f} vol/s")
    timed_as: dict[tuple[bool, bool], str] = {}  # the inference settings -> the variant first timed with them
    for variant in variants:
        compiled = compile or variant.compile
        key = (variant.channels_last, compiled)
        if key in timed_as:
            result["variants"][variant.name] = {**result["variants"][timed_as[key]], "same_as": timed_as[key]}
            continue
        timed_as[key] = variant.name

        def run(variant=variant, compiled=compiled) -> dict:
            model = copy.deepcopy(masters["net3d"]).to(device).eval()
            if variant.channels_last:
                to_channels_last(model)
            if compiled:
                model = torch.compile(model, mode=None if compile_mode in (None, "default") else compile_mode)

            def run_mnseg():
                torch.backends.cudnn.benchmark = True
                return sliding_window_probabilities(
                    model,
                    image,
                    preset.crop,
                    overlap=0.5,
                    sw_batch_size=preset.sw_batch_size,
                    amp=amp,
                    device=device,
                    channels_last=variant.channels_last,
                )

            timing, mask = timed(run_mnseg)
            return {
                "mnseg": timing,
                "speedup": monai_timing["seconds_per_volume"] / timing["seconds_per_volume"],
                "mask_dice": _mean_foreground_dice(mask, monai_mask, preset.num_classes),
                # a Dice of empty masks says little
                "foreground_fraction": float((mask > 0).float().mean()),
            }

        _record(result, variant, run, compiled, "inference", lambda entry: (
            f"{entry['mnseg']['volumes_per_s']:.3f} vol/s, speed-up {entry['speedup']:.2f}x, mask Dice "
            f"{entry['mask_dice']:.5f}"), keep_going, device, log)
    return _promote_first(result, variants, ("mnseg", "speedup", "mask_dice", "foreground_fraction"))


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
    variants: list[Variant] | str | None = None,
    compile_mode: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every measurement of issue 8 for one preset and each variant (plain and MONAI measured once); JSON-ready.
    ``log`` receives a line as each side is measured (the script prints them at once).

    With several variants a failing one (e.g. a compile error) is recorded as ``{"error": ...}`` and the others
    still run, so one GPU call measures them all. ``result["variants"][name]`` holds each variant's options,
    training and inference entries; the top-level ``training``/``inference`` keys describe the first variant.
    """
    from mnseg.errors import ConfigError

    if preset_name not in PRESETS:
        raise ConfigError(f"unknown speed preset '{preset_name}' (choose one of {', '.join(PRESETS)})")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ConfigError(f"unknown compile mode '{compile_mode}' (choose one of {', '.join(COMPILE_MODES)})")
    variants = parse_variants(variants) if isinstance(variants, str) else (variants or [VARIANTS["base"]])
    preset = PRESETS[preset_name]
    device = torch.device(device)
    if peak_tflops is None and device.type == "cuda":
        peak_tflops = H100_BF16_DENSE_TFLOPS
    masters = build_master_models(preset, seed)
    b_l, b_u = batch_split(preset.batch_size)
    keep_going = len(variants) > 1
    log = log or (lambda line: None)
    result = {
        "preset": asdict(preset),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "compile": compile,
        "compile_mode": compile_mode or "default",
        "batch": {"B": preset.batch_size, "b_l": b_l, "b_u": b_u},
        "peak_tflops": peak_tflops,
    }
    training = bench_training(
        preset, device, masters, warmup, iters, compile, profile, seed, variants, compile_mode, keep_going, log
    )
    for side_result in [training["plain"]] + [v["mnseg"] for v in training["variants"].values() if "mnseg" in v]:
        side_result["peak_fraction"] = side_result["tflops_per_s"] / peak_tflops if peak_tflops else None
    inference = bench_inference(
        preset, device, masters, 1, inference_repeats, seed, variants, compile, compile_mode, keep_going, log
    )
    result["variants"] = {
        v.name: {
            "options": {**asdict(v), "compile": compile or v.compile},
            "training": training["variants"][v.name],
            "inference": inference["variants"][v.name],
        }
        for v in variants
    }
    result["training"] = {k: v for k, v in training.items() if k != "variants"}
    result["inference"] = {k: v for k, v in inference.items() if k != "variants"}
    _free(device)
    result["loader"] = bench_loader(preset, device, loader_batches, seed)
    # Each co-training iteration consumes two batches of B (one per step); the fastest variant sets the pace.
    timed = [v["mnseg"]["ms_per_iter"] for v in training["variants"].values() if "mnseg" in v]
    needed = 2 * preset.batch_size / (min(timed) / 1000.0) if timed else float("nan")
    result["loader"]["training_samples_per_s"] = needed
    result["loader"]["keeps_up"] = bool(result["loader"]["samples_per_s"] >= needed)
    return result


def _fmt(value, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def format_report(result: dict) -> str:
    """A readable table of ``run_benchmark``'s result (one row per variant when several were timed)."""
    if len(result.get("variants", {})) > 1:
        return _format_variants(result)
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
        _loader_line(load),
    ]
    for side in ("mnseg", "plain"):
        if "profile" in t[side]:
            lines += ["", f"profile ({side}, top ops by self time over 2 iterations)", t[side]["profile"]]
    return "\n".join(lines)


def _loader_line(load: dict) -> str:
    return (
        f"loader: {load['samples_per_s']:.1f} samples/s; training consumes "
        f"{_fmt(load['training_samples_per_s'], '.1f')} samples/s -> {'keeps up' if load['keeps_up'] else 'BOTTLENECK'}"
    )


def _format_variants(result: dict) -> str:
    """One training row and one inference row per variant, the plain / MONAI baseline (measured once) on top."""
    p, t, inf = result["preset"], result["training"], result["inference"]
    lines = [
        f"preset {p['name']}: crop {tuple(p['crop'])}, B={result['batch']['B']} "
        f"(b_l={result['batch']['b_l']}, b_u={result['batch']['b_u']}), {p['num_classes']} classes, "
        f"device {result['device']}, torch {result['torch']}, compile mode {result['compile_mode']}",
        "",
        "training (one co-training iteration = 3D step + 2D step; targets on H100: speed-up >= 3x, memory <= 0.5)",
        f"  {'variant':<14} {'ms/iter':>9} {'speed-up':>9} {'peak MiB':>9} {'mem ratio':>9} {'GFLOP/iter':>11} "
        f"{'TFLOP/s':>9} {'of peak':>8}",
    ]

    def row(name: str, s: dict, speedup, ratio) -> str:
        return (
            f"  {name:<14} {s['ms_per_iter']:9.1f} {_fmt(speedup, '.2f', 'x'):>9} "
            f"{_fmt(s['peak_memory_mib'], '.0f'):>9} {_fmt(ratio, '.2f'):>9} {s['flops_per_iter'] / 1e9:11.2f} "
            f"{s['tflops_per_s']:9.3f} {_fmt(s['peak_fraction'], '.1%'):>8}"
        )

    lines.append(row("plain fp32", t["plain"], 1.0, 1.0 if t["plain"]["peak_memory_mib"] else None))
    for name, v in result["variants"].items():
        tv = v["training"]
        lines.append(
            f"  {name:<14} failed: {tv['error']}"
            if "error" in tv
            else row(name, tv["mnseg"], tv["speedup"], tv["memory_ratio"])
        )
    lines += [
        "",
        f"inference (volume {tuple(inf['volume'])}, patch {tuple(p['crop'])}, overlap 0.5; target >= 2x)",
        f"  {'variant':<14} {'vol/s':>9} {'speed-up':>9} {'mask Dice':>10} {'foreground':>10}",
        f"  {'MONAI fp32':<14} {inf['monai']['volumes_per_s']:9.3f} {'1.00x':>9}",
    ]
    for name, v in result["variants"].items():
        iv = v["inference"]
        if "error" in iv:
            lines.append(f"  {name:<14} failed: {iv['error']}")
            continue
        lines.append(
            f"  {name:<14} {iv['mnseg']['volumes_per_s']:9.3f} {iv['speedup']:8.2f}x {iv['mask_dice']:10.5f} "
            f"{iv['foreground_fraction']:10.1%}" + (f"  (inference as {iv['same_as']}: not timed again)"
                                                    if "same_as" in iv else "")
        )
    lines += ["", _loader_line(result["loader"]) + " (at the fastest variant's pace)"]
    if "profile" in t["plain"]:
        lines += ["", "profile (plain, top ops by self time over 2 iterations)", t["plain"]["profile"]]
    for name, v in result["variants"].items():
        if "profile" in v["training"].get("mnseg", {}):
            lines += [
                "",
                f"profile (mnseg {name}, top ops by self time over 2 iterations)",
                v["training"]["mnseg"]["profile"],
            ]
    return "\n".join(lines)
