"""The report writer: tables with the right numbers, valid non-trivial figures, working links."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from mnseg.data.io import save_nifti
from mnseg.errors import InputFileError
from mnseg.reporting.curves import read_history
from mnseg.reporting.overlays import class_colour, overlay_figure, overlay_rgb, pick_foreground_slices
from mnseg.reporting.report import MethodResult, format_mean_std, write_report

CLASS_NAMES = {0: "background", 1: "liver", 2: "tumour"}
METRICS = ("dice", "jaccard", "hd95", "asd", "assd")
SHAPE = (24, 20, 16)


def _fake_summary(rng, case_ids, dice_scale):
    """A summary.json-shaped dict with random per-case values and their true mean/std."""
    per_case = []
    for case in case_ids:
        metrics = {}
        for name in ("liver", "tumour"):
            dice = float(rng.uniform(0.3, 1.0) * dice_scale)
            metrics[name] = {
                "dice": dice,
                "jaccard": dice / (2 - dice),
                "hd95": float(rng.uniform(0, 9)),
                "asd": float(rng.uniform(0, 3)),
                "assd": float(rng.uniform(0, 3)),
            }
        per_case.append({"case": case, "metrics": metrics})
    mean, std = {}, {}
    for name in ("liver", "tumour"):
        values = {m: [c["metrics"][name][m] for c in per_case] for m in METRICS}
        mean[name] = {m: float(np.mean(v)) for m, v in values.items()}
        std[name] = {m: float(np.std(v)) for m, v in values.items()}
    fg = {m: float(np.mean([mean[n][m] for n in ("liver", "tumour")])) for m in METRICS}
    return {"metric_per_case": per_case, "mean": mean, "std": std, "foreground_mean": fg, "units": "voxel"}


def _blob_label(rng, shift=0):
    z, y, x = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
    centre = np.array(SHAPE) / 2 + rng.uniform(-2, 2, size=3)
    distance = np.sqrt((z - centre[0] - shift) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[distance < 7] = 1
    label[distance < 3] = 2
    return label


@pytest.fixture
def report_inputs(tmp_path):
    rng = np.random.default_rng(1)
    affine = np.diag([-1.5, 1.2, 2.0, 1.0])  # flipped x: the overlay must reorient without failing
    cases = ["case_001", "case_002", "case_003"]
    test_cases = []
    pred_dirs = {"supervised": tmp_path / "pred_sup", "mn": tmp_path / "pred_mn"}
    for case in cases:
        label = _blob_label(rng)
        image = rng.normal(size=SHAPE).astype(np.float32) + 3.0 * (label > 0)
        image_path = save_nifti(image, affine, tmp_path / "imagesTs" / f"{case}_0000.nii.gz")
        label_path = save_nifti(label, affine, tmp_path / "labelsTs" / f"{case}.nii.gz")
        test_cases.append((case, image_path, label_path))
        save_nifti(_blob_label(rng, shift=2), affine, pred_dirs["supervised"] / f"{case}.nii.gz")
        if case != "case_003":  # one missing prediction must be reported, not crash
            save_nifti(label, affine, pred_dirs["mn"] / f"{case}.nii.gz")

    (tmp_path / "sup_history.csv").write_text(
        "epoch,phase,loss,lr,val_dice,seconds\n"
        + "".join(f"{e},sup,{1.0 / (e + 1):.4f},0.01,{'' if e % 2 else 0.1 * e},1.5\n" for e in range(8))
    )
    (tmp_path / "mn_history.csv").write_text(MN_HISTORY)
    results = [
        MethodResult(
            "supervised",
            _fake_summary(rng, cases, 0.7),
            tmp_path / "sup_history.csv",
            pred_dirs["supervised"],
        ),
        MethodResult("mn", _fake_summary(rng, cases, 1.0), tmp_path / "mn_history.csv", pred_dirs["mn"]),
    ]
    return results, test_cases


def _image_is_nontrivial(path):
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    colours = np.unique(pixels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path} has only {len(colours)} colours"
    return pixels


def test_write_report_files_tables_and_figures(tmp_path, report_inputs):
    results, test_cases = report_inputs
    out = tmp_path / "report"
    md_path = write_report(
        out, "Toy comparison", results, test_cases, CLASS_NAMES, n_overlay_cases=2, notes=["seed 0"]
    )
    assert md_path == out / "report.md"
    markdown = md_path.read_text()
    page = (out / "report.html").read_text()

    # the examples are the best and the worst case by mean foreground Dice over the methods that scored them
    scores = {case: np.mean([np.mean([item["metrics"][n]["dice"] for n in ("liver", "tumour")])
                             for r in results for item in r.summary["metric_per_case"] if item["case"] == case])
              for case, _, _ in test_cases}
    ranked = sorted(scores, key=scores.get, reverse=True)
    shown = [ranked[0], ranked[-1]]
    curves = out / "figures" / "learning_curves.png"
    overlays = [out / "figures" / f"overlay_{case}.png" for case in shown]
    for png in [curves, *overlays]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        _image_is_nontrivial(png)
    assert not (out / "figures" / f"overlay_{ranked[1]}.png").exists()  # only n_overlay_cases pictures
    assert f"### {ranked[0]}: best of 3 by mean foreground Dice" in markdown
    assert f"### {ranked[-1]}: worst of 3 by mean foreground Dice" in markdown
    assert not [p for p in out.rglob(".*")], "temporary files left behind"

    # every number in the table is the summary's, formatted
    for result in results:
        for cls in ("liver", "tumour"):
            mean, std = result.summary["mean"][cls], result.summary["std"][cls]
            expected_row = [cls, result.name]
            cells = [
                format_mean_std(mean[m], std[m], 3 if m in ("dice", "jaccard") else 2)
                for m in ("dice", "jaccard", "hd95", "asd")
            ]
            row = _markdown_row(markdown, cls, result.name)
            assert row[:2] == expected_row
            assert [c.strip("*") for c in row[2:6]] == cells
            assert f"{mean['dice']:.3f} ± {std['dice']:.3f}" in cells[0]
        fg_row = _markdown_row(markdown, "foreground mean", result.name)
        assert fg_row[2].strip("*").startswith(f"{result.summary['foreground_mean']['dice']:.3f} ± ")

    # three test cases cannot give p < 0.05: nothing is bold, whatever the means, and the verdict says why
    for cls in ("liver", "tumour", "foreground mean"):
        for result in results:
            assert not _markdown_row(markdown, cls, result.name)[2].startswith("**")
        assert _markdown_row(markdown, cls, "supervised")[6] == "(baseline)"
    assert "<td><b>" not in page
    assert "mn tied supervised" in markdown and "With 3 test cases no difference could reach p < 0.05" in markdown

    assert "HD95 (voxel)" in markdown and "seed 0" in markdown and "seed 0" in page
    assert ("mn: no prediction found for test case case_003" in markdown) == ("case_003" in shown)
    # the HTML page is self-contained: every picture inlined, none linked
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 and all(src.startswith("data:image/png;base64,") for src in sources)
    import base64

    assert base64.b64decode(sources[0].split(",", 1)[1]) == curves.read_bytes()
    assert "](figures/learning_curves.png)" in markdown


def _markdown_row(markdown, cls, method):
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] == cls and cells[1] == method:
            return cells
    raise AssertionError(f"no table row for {cls} / {method}")


def test_missing_prediction_is_noted_and_drawn_without_overlay(tmp_path, report_inputs):
    results, test_cases = report_inputs
    out = tmp_path / "report"
    write_report(out, "T", results, test_cases[2:], CLASS_NAMES)
    assert "mn: no prediction found for test case case_003" in (out / "report.md").read_text()
    _image_is_nontrivial(out / "figures" / "overlay_case_003.png")


def test_report_without_histories_or_cases(tmp_path, report_inputs):
    results, _ = report_inputs
    bare = [MethodResult(r.name, r.summary, None, None) for r in results]
    write_report(tmp_path / "r", "T", bare, [], CLASS_NAMES)
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "No training history" in markdown and "No test cases" in markdown
    assert not (tmp_path / "r" / "figures" / "learning_curves.png").exists()


def test_prediction_in_wrong_geometry_names_the_file(tmp_path, report_inputs):
    results, test_cases = report_inputs
    bad = results[0].pred_dir / "case_001.nii.gz"
    save_nifti(np.zeros((5, 5, 5), np.uint8), np.eye(4), bad)
    with pytest.raises(InputFileError, match=re.escape(str(bad))):
        write_report(tmp_path / "r", "T", results, test_cases[:1], CLASS_NAMES)


def test_read_history_parses_numbers_and_blanks(tmp_path, report_inputs):
    history = read_history(tmp_path / "sup_history.csv")
    assert set(history) == {"epoch", "loss", "lr", "val_dice", "seconds"}  # "phase" is text
    assert np.isnan(history["val_dice"][1]) and history["val_dice"][2] == pytest.approx(0.2)
    with pytest.raises(InputFileError, match="nothere.csv"):
        read_history(tmp_path / "nothere.csv")


def test_overlay_rgb_colours_classes_but_not_ignore():
    image = np.linspace(0, 1, 64).reshape(8, 8)
    label = np.zeros((8, 8), dtype=int)
    label[1, 1], label[2, 2], label[3, 3] = 1, 2, 3  # 3 = ignore when num_classes == 3
    rgb = overlay_rgb(image, label, num_classes=3)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    grey = rgb[label == 0]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert len({tuple(rgb[1, 1]), tuple(rgb[2, 2])}) == 2
    assert rgb[1, 1, 0] != rgb[1, 1, 1]  # coloured
    assert rgb[3, 3, 0] == rgb[3, 3, 1] == rgb[3, 3, 2]  # ignore stays grey
    blended = overlay_rgb(np.zeros((2, 2)), np.ones((2, 2), int), 2, alpha=1.0)
    np.testing.assert_array_equal(blended[0, 0], np.rint(class_colour(1)).astype(np.uint8))


def test_overlay_figure_and_slice_choice(tmp_path):
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[5:15, 5:12, 9:13] = 1
    slices = pick_foreground_slices(label, SHAPE[2], {1})
    assert len(slices) == 3 and all(9 <= z < 13 for z in slices)
    fallback = pick_foreground_slices(np.zeros(SHAPE), SHAPE[2], {1})
    assert len(fallback) == 3 and 0 < fallback[0] < fallback[1] < fallback[2] < SHAPE[2] - 1
    out = overlay_figure(
        rng.normal(size=SHAPE), [label, None], ["gt", "empty"], CLASS_NAMES, tmp_path / "o.png"
    )
    _image_is_nontrivial(out)
    with pytest.raises(ValueError, match="titles"):
        overlay_figure(np.zeros(SHAPE), [label], ["a", "b"], CLASS_NAMES, tmp_path / "x.png")


def test_format_mean_std_edge_values():
    assert format_mean_std(0.91234, 0.0456, 3) == "0.912 ± 0.046"
    assert format_mean_std(None, 0.1, 2) == "n/a"
    assert format_mean_std(math.nan, None, 2) == "n/a"
    assert format_mean_std(math.inf, math.nan, 2) == "inf"
    assert format_mean_std(3.14159, None, 2) == "3.14"


def test_reorientation_puts_axial_slices_last_with_matching_spacing():
    from mnseg.reporting.overlays import ras_spacing as _ras_spacing
    from mnseg.reporting.overlays import to_ras as _to_ras

    # file axes are (S, A, L): axis 0 runs superior, axis 2 runs to the left
    affine = np.array([[0, 0, -0.5, 0], [0, 2.0, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    oriented = _to_ras(data, affine)
    assert oriented.shape == (6, 5, 4)
    assert _ras_spacing(affine) == (0.5, 2.0, 3.0)
    assert oriented[0, 0, 1] == data[1, 0, 5]  # x flipped (L -> R), z = file axis 0


def _summary_from_dice(per_case_dice):
    """A summary.json-shaped dict from {case: {class: dice}} (other metrics copied from Dice)."""
    per_case = [{"case": case, "metrics": {c: {m: d for m in METRICS} for c, d in classes.items()}}
                for case, classes in per_case_dice.items()]
    names = list(next(iter(per_case_dice.values())))
    mean = {c: {m: float(np.mean([v[c] for v in per_case_dice.values()])) for m in METRICS} for c in names}
    std = {c: {m: float(np.std([v[c] for v in per_case_dice.values()])) for m in METRICS} for c in names}
    fg = {m: float(np.mean([mean[c][m] for c in names])) for m in METRICS}
    return {"metric_per_case": per_case, "mean": mean, "std": std, "foreground_mean": fg, "units": "voxel"}


def test_verdict_sentence_p_value_and_bold_only_where_the_test_supports_it(tmp_path):
    from scipy.stats import wilcoxon

    rng = np.random.default_rng(3)
    cases = [f"c{i:02d}" for i in range(10)]
    base = {c: {"liver": float(rng.uniform(0.6, 0.8)), "tumour": 0.0} for c in cases}
    better = {c: {"liver": base[c]["liver"] + float(rng.uniform(0.02, 0.1)), "tumour": 0.0} for c in cases}
    results = [MethodResult("supervised", _summary_from_dice(base)), MethodResult("mn", _summary_from_dice(better))]
    write_report(tmp_path / "r", "T", results, [], CLASS_NAMES)
    markdown = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "report.html").read_text()

    fg_diff = [np.mean([better[c]["liver"], 0.0]) - np.mean([base[c]["liver"], 0.0]) for c in cases]
    p = wilcoxon(fg_diff).pvalue
    assert p < 0.05
    sentence = f"mn beat supervised by {np.mean(fg_diff):.3f} foreground-mean Dice"
    assert sentence in markdown and f"p = {p:.2g}" in markdown and sentence in page
    assert markdown.index("## Verdict") < markdown.index("## Test metrics")
    # liver and the foreground mean: mn's Dice bold (p < 0.05); tumour 0.000 for both: p = 1, neither bold
    for cls in ("liver", "foreground mean"):
        assert _markdown_row(markdown, cls, "mn")[2].startswith("**")
        assert not _markdown_row(markdown, cls, "supervised")[2].startswith("**")
    for name in ("mn", "supervised"):
        assert not _markdown_row(markdown, "tumour", name)[2].startswith("**")
    assert _markdown_row(markdown, "tumour", "mn")[6:8] == ["+0.000", "1"]
    assert "n/a: HD95 and ASD are undefined" in markdown and "p is n/a with fewer than 2" in markdown

    # the other way round: a loss is a loss, and bold goes to the baseline
    write_report(tmp_path / "r2", "T", results[::-1], [], CLASS_NAMES, baseline="mn")
    markdown = (tmp_path / "r2" / "report.md").read_text()
    assert "supervised trailed mn by" in markdown
    assert _markdown_row(markdown, "liver", "mn")[2].startswith("**")


def test_verdict_module_edge_cases():
    from mnseg.reporting.verdict import compare, smallest_p, verdict_sentence

    one = compare("a", "b", {"x": 0.9}, {"x": 0.8})
    assert one.outcome == "n/a" and "too few for a test (p n/a)" in verdict_sentence(one)
    same = compare("a", "b", {"x": 0.5, "y": 0.5}, {"x": 0.5, "y": 0.5, "z": 0.1})
    assert same.n_pairs == 2 and same.p_value == 1.0 and same.outcome == "tied"
    assert "a tied b: +0.000" in verdict_sentence(same)
    assert compare("a", "b", {}, {"x": 1.0}).n_pairs == 0
    assert smallest_p(5) == 2 / 32 and smallest_p(6) < 0.05


def test_error_map_colours_small_classes_opaque_and_an_error_column_per_method(tmp_path):
    from mnseg.reporting.overlays import ERROR_COLOURS, class_opacity, error_rgb

    ref = np.array([[0, 1, 1, 2]])
    pred = np.array([[1, 0, 1, 1]])  # FP, FN, right, wrong class
    rgb = error_rgb(np.zeros((1, 4)), pred, ref, num_classes=3)
    assert tuple(rgb[0, 0]) == tuple(ERROR_COLOURS["false positive"].astype(np.uint8))
    assert tuple(rgb[0, 1]) == tuple(ERROR_COLOURS["false negative"].astype(np.uint8))
    assert tuple(rgb[0, 2]) == (0, 0, 0)
    assert tuple(rgb[0, 3]) == tuple(ERROR_COLOURS["wrong class"].astype(np.uint8))
    big = np.zeros(SHAPE, np.uint8)
    big[2:20, 2:18, 2:14] = 1
    big[5:7, 5:7, 5:7] = 2  # a lesion: 8 voxels beside thousands
    assert class_opacity(big, {1: "tissue", 2: "lesion"}) == {1: 0.45, 2: 0.9}

    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE)
    plain = overlay_figure(image, [big, big], ["ground truth", "m"], CLASS_NAMES, tmp_path / "plain.png")
    errors = overlay_figure(image, [big, np.roll(big, 2, axis=0)], ["ground truth", "m"], CLASS_NAMES,
                            tmp_path / "errors.png", errors_against=0)
    import matplotlib.image

    assert matplotlib.image.imread(errors).shape[1] > matplotlib.image.imread(plain).shape[1]  # one column more
    perfect = overlay_figure(image, [big, big], ["ground truth", "m"], CLASS_NAMES, tmp_path / "perfect.png",
                             errors_against=0)

    def magenta(png):
        pixels = _image_is_nontrivial(png)
        return int(((pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] > 0.9)).sum())

    assert magenta(errors) > magenta(perfect) + 20  # false positives of the shifted mask (beyond the legend's)


MN_HISTORY = (  # the columns and phases M&N writes: stage 1 trains both models, then they alternate
    "epoch,phase,loss,loss_2d,loss_3d,b_l,b_u,loss_l,loss_u,val_dice\n"
    "0,supervised,3.5,2.0,1.5,2,0,,,\n"
    "1,supervised,3.0,1.8,1.2,2,0,,,0.40\n"
    "2,cotrain-3d,1.1,,,1,1,1.0,0.5,\n"
    "3,cotrain-2d,1.9,,,1,1,1.7,0.9,0.50\n"
    "4,cotrain-3d,0.9,,,1,1,0.8,0.4,\n"
    "5,cotrain-2d,1.6,,,0,2,,0.8,0.55\n"
)


def test_learning_curves_compare_the_3d_models_own_losses_and_validation_dice(tmp_path):
    """Issue 18: M&N's curve is its 3D model's loss on the 3D model's epochs only (no sum of both models, no
    2D/3D zig-zag), validation Dice is drawn for every method, and each panel names each method once."""
    from mnseg.reporting.curves import curves_figure, learning_curves, model_curves, read_history_and_phases

    (tmp_path / "mn.csv").write_text(MN_HISTORY)
    (tmp_path / "sup.csv").write_text(
        "epoch,phase,loss,loss_l,val_dice\n" + "".join(
            f"{e},supervised,{1.5 - 0.1 * e},{1.5 - 0.1 * e},{'' if e % 2 == 0 else 0.1 * e}\n" for e in range(4)))
    curves = {name: model_curves(*read_history_and_phases(tmp_path / f"{csv}.csv"))
              for name, csv in (("Supervised 3D UNet", "sup"), ("M&N", "mn"))}
    mn = curves["M&N"]
    finite = np.isfinite(mn["labelled"])
    assert mn["epoch"][finite].tolist() == [1, 2, 3, 5]  # stage 1 and the 3D model's co-training epochs
    assert mn["labelled"][finite].tolist() == [1.5, 1.2, 1.0, 0.8]  # loss_3d, then the 3D model's loss_l
    assert mn["loss_u"][np.isfinite(mn["loss_u"])].tolist() == [0.5, 0.4]  # never the 2D model's
    fig = curves_figure(curves)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["labelled loss of the predicting model", "loss_u (unlabelled crops)", "validation Dice"]
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        assert len(labels) == len(set(labels)) and set(labels) <= {"Supervised 3D UNet", "M&N"}
    val = fig.axes[2]
    assert sorted(line.get_label() for line in val.get_lines()) == ["M&N", "Supervised 3D UNet"]
    mn_val = next(line for line in val.get_lines() if line.get_label() == "M&N")
    assert mn_val.get_xdata().tolist() == [2, 4, 6] and mn_val.get_ydata().tolist() == [0.40, 0.50, 0.55]
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "loss_u:" in caption and "pseudo-masks" in caption and "3D model's own losses" in caption
    png = learning_curves([type("R", (), {"name": n, "history_csv": tmp_path / f"{c}.csv"})()
                           for n, c in (("sup", "sup"), ("mn", "mn"))], tmp_path / "curves.png", [])
    _image_is_nontrivial(png)
    # without validation the panel says how to get it rather than staying blank
    bare = curves_figure({"sup": {**curves["Supervised 3D UNet"], "val_dice": np.full(4, np.nan)}})
    assert "--num-val" in " ".join(t.get_text() for t in bare.axes[-1].texts)


def test_report_as_one_picture_shows_the_verdict_curves_and_an_overlay(tmp_path, report_inputs):
    """Issue 18: report.png beside report.md/html holds the verdict sentence, the validation curves and the median
    example case's overlay, drawn from a tiny fake run folder."""
    import matplotlib.image

    from mnseg.reporting.picture import pick_overlays, report_figure

    results, test_cases = report_inputs
    out = tmp_path / "report"
    markdown = write_report(out, "Toy comparison", results, test_cases, CLASS_NAMES).read_text()
    png = out / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(report.png)" in markdown
    pixels = _image_is_nontrivial(png)
    curves = matplotlib.image.imread(out / "figures" / "learning_curves.png")
    assert pixels.shape[0] > curves.shape[0] * pixels.shape[1] / curves.shape[1]  # taller than the curves alone
    overlays = [(line[4:], out / "figures" / f"overlay_{line[4:].split(':')[0]}.png")
                for line in markdown.splitlines() if line.startswith("### ")]
    assert len(overlays) == 3 and pick_overlays(overlays) == [overlays[1]]  # the median case
    assert pick_overlays(overlays, 2) == overlays[:2] and pick_overlays(overlays[:1], 3) == overlays[:1]
    verdict = next(line.strip("*") for line in markdown.splitlines() if "tied supervised" in line)
    fig = report_figure("Toy comparison", [verdict], out / "figures" / "learning_curves.png", pick_overlays(overlays))
    texts = " ".join(t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts)
    assert "Toy comparison" in texts and verdict in texts
    assert [ax.get_title(loc="left") for ax in fig.axes[1:]] == ["learning curves",
                                                                 f"example test case {overlays[1][0]}"]
    assert all(ax.get_images() for ax in fig.axes[1:])
