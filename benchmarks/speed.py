"""Issue 8 speed harness: mnseg's M&N co-training iteration, sliding-window inference and patch loader
against plain fp32 eager PyTorch / MONAI on the same models and shapes (logic in ``speed_harness.py`` beside it).

    python benchmarks/speed.py --device cuda --preset paper [--compile] [--profile] [--peak-tflops 989]
                               [--variants base,channels_last,frozen_bf16,compile,all] [--compile-mode MODE]
                               [--json speed.json]

Presets: paper (SegFormer-B2-sized + LoRA and the M&N 3D UNet, crops 160x160x64, B=5), small, tiny
(seconds on a CPU; a smoke check only). Targets (H100): training >= 3x faster at <= half the peak memory,
inference >= 2x with the same masks, loader faster than training consumes.

Variants time mnseg's speed options (all off by default in training) against the same plain baseline, measured
once, in one process: base, channels_last (train.channels_last), frozen_bf16 (frozen_dtype=bfloat16 on the LoRA
model), compile (torch.compile), all (the three together). One variant prints the classic report; several print
one row per variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # speed_harness.py, beside this script


def main(argv: list[str] | None = None) -> int:
    from speed_harness import COMPILE_MODES, H100_BF16_DENSE_TFLOPS, PRESETS, VARIANTS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    parser.add_argument("--compile", action="store_true", help="torch.compile the mnseg side's models (every variant)")
    parser.add_argument(
        "--variants",
        default="base",
        help=f"comma-separated mnseg variants to time, each against the same plain run ({', '.join(VARIANTS)}; "
        "default: base)",
    )
    parser.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile mode of compiled variants"
    )
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of both sides")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help=f"the device's dense bf16 peak for the 'of peak' column (default on CUDA: {H100_BF16_DENSE_TFLOPS:g}, "
        "H100 SXM)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before timing (default 3)")
    parser.add_argument("--iters", type=int, default=10, help="timed co-training iterations (default 10)")
    parser.add_argument("--inference-repeats", type=int, default=3, help="timed volumes per side (default 3)")
    parser.add_argument("--loader-batches", type=int, default=20, help="timed loader batches (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    from speed_harness import format_report, parse_variants, run_benchmark

    from mnseg.engine.build import resolve_device
    from mnseg.errors import MnsegError
    from mnseg.utils.atomic import atomic_write_json

    if args.warmup < 0 or args.iters < 1 or args.inference_repeats < 1 or args.loader_batches < 1:
        parser.error("--warmup must be >= 0 and --iters, --inference-repeats, --loader-batches >= 1")
    try:
        variants = parse_variants(args.variants)
        device = resolve_device(args.device)
        result = run_benchmark(
            args.preset,
            device,
            warmup=args.warmup,
            iters=args.iters,
            compile=args.compile,
            profile=args.profile,
            peak_tflops=args.peak_tflops,
            inference_repeats=args.inference_repeats,
            loader_batches=args.loader_batches,
            seed=args.seed,
            variants=variants,
            compile_mode=args.compile_mode,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except MnsegError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
