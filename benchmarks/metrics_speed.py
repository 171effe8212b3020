"""Speed of mnseg's surface metrics against medpy 0.5.2 on an organ-sized 256x256x128 pair.

medpy is timed as a user calls it (``hd95`` then ``asd``: two calls, three full-volume EDTs);
mnseg as one ``surface_metrics`` call (two EDTs on the padded bounding box). The values must be
identical to 1e-9 or the script fails.

    python benchmarks/metrics_speed.py [--repeats 3] [--spacing 0.8 0.8 2.0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

SHAPE = (256, 256, 128)


def irregular_blob(shape, centre, radii, seed: int) -> np.ndarray:
    """An ellipsoid whose boundary is pushed in and out by smooth noise (a lumpy organ)."""
    from scipy.ndimage import gaussian_filter, zoom

    rng = np.random.default_rng(seed)
    coarse = gaussian_filter(rng.normal(size=tuple(s // 8 for s in shape)), sigma=1.5)
    noise = zoom(coarse / coarse.std(), [s / c for s, c in zip(shape, coarse.shape)], order=1)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return distance <= 1.0 + 0.25 * noise[tuple(slice(0, s) for s in shape)]


def make_pair() -> tuple[np.ndarray, np.ndarray]:
    """Reference and an imperfect prediction: overlapping, shifted, differently lumpy (~80x70x50 voxels)."""
    ref = irregular_blob(SHAPE, centre=(120, 130, 64), radii=(42, 36, 26), seed=1)
    pred = irregular_blob(SHAPE, centre=(125, 126, 66), radii=(40, 38, 25), seed=2)
    return pred, ref


def best_and_median(fn, repeats: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spacing", type=float, nargs=3, default=None,
                        help="voxel spacing in mm (default: voxel units)")
    args = parser.parse_args(argv)

    from medpy.metric import binary as medpy_binary

    from mnseg.evaluation.metrics import surface_metrics

    pred, ref = make_pair()
    spacing = tuple(args.spacing) if args.spacing else None
    corners = np.argwhere(pred | ref)
    box = tuple(int(v) for v in corners.max(0) - corners.min(0) + 1)
    print(f"volume {SHAPE}, pred {int(pred.sum())} voxels, ref {int(ref.sum())} voxels, "
          f"union bounding box {box}, spacing {spacing or 'voxel'}")

    def medpy_calls():
        return {"hd95": medpy_binary.hd95(pred, ref, voxelspacing=spacing),
                "asd": medpy_binary.asd(pred, ref, voxelspacing=spacing)}

    medpy_best, medpy_median, theirs = best_and_median(medpy_calls, args.repeats)
    ours_best, ours_median, ours = best_and_median(lambda: surface_metrics(pred, ref, spacing), args.repeats)

    for name in ("hd95", "asd"):
        diff = abs(ours[name] - theirs[name])
        print(f"{name}: medpy {theirs[name]:.12f}  mnseg {ours[name]:.12f}  |diff| {diff:.1e}")
        if not diff <= 1e-9:
            print(f"FAIL: {name} differs from medpy by {diff}", file=sys.stderr)
            return 1
    print(f"medpy hd95 + asd (2 calls): best {medpy_best:.3f} s, median {medpy_median:.3f} s "
          f"({args.repeats} runs)")
    print(f"mnseg surface_metrics (1 call, hd/hd95/asd/assd): best {ours_best:.3f} s, "
          f"median {ours_median:.3f} s")
    print(f"speed-up (best/best): {medpy_best / ours_best:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
