"""A shortened demo (tiny data, tiny models, two epochs) runs to a report with both methods."""

from mnseg.cli import main


def test_quick_demo_writes_a_report_with_both_methods(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--device", "cpu"]) == 0
    report = (out / "report" / "report.md").read_text()
    assert "Supervised 3D UNet" in report and "M&N" in report
    assert "white_matter" in report and "lesion" in report
    pngs = list((out / "report" / "figures").glob("*.png"))
    assert len(pngs) >= 2
    assert (out / "report" / "report.html").exists()
    assert "## Verdict" in report and "tied" in report  # two test cases: no difference can reach p < 0.05
    # one labelled subject is held out, so every method has a validation curve (issue 18)
    import json

    from mnseg.reporting.curves import read_history

    for method in ("supervised", "mn"):
        val = read_history(out / "runs" / method / "history.csv")["val_dice"]
        assert (val >= 0).sum() == len(val)  # validated after every quick epoch
        split = json.loads((out / "runs" / method / "split.json").read_text())
        assert len(split["val"]) == 1 and len(split["labeled"]) == 3 and not set(split["val"]) & set(split["labeled"])
    assert "1 labelled subject(s) held out for the validation curves" in report
    # Running again reuses the data and the finished runs, and reports their training time, not its own.
    mtime = (out / "runs" / "mn" / "checkpoints" / "last.pt").stat().st_mtime_ns
    timing = json.loads((out / "runs" / "mn" / "timing.json").read_text())
    assert timing["train_seconds"] > 0 and f"mn {_seconds(timing['train_seconds'])}" in report
    timing["train_seconds"] = 600.0  # as if it had trained for 10 minutes
    (out / "runs" / "mn" / "timing.json").write_text(json.dumps(timing))
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--device", "cpu"]) == 0
    assert (out / "runs" / "mn" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    report = (out / "report" / "report.md").read_text()
    assert "mn 10.0 min" in report
    # the whole demo's time sums the records (data, the 10 minutes, prediction), however busy this machine is
    import re

    assert float(re.search(r"whole demo ([0-9.]+) min", report).group(1)) >= 10.0


def _seconds(value):
    return f"{value:.0f} s" if value < 60 else f"{value / 60:.1f} min"


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    """The demo resumes whatever runs it finds in --out, so it must not adopt someone else's folder."""
    from mnseg.utils.output_folder import claim_output_folder
    from mnseg.workflows.demo import DEMO_ENTRIES, MARKER

    theirs = tmp_path / "project"
    (theirs / "runs" / "mn").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(theirs), "--quick", "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a demo folder" in err and "--out" in err and "Traceback" not in err
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt", "runs"]  # nothing written
    # new, empty and earlier demo folders (with or without the marker) are taken
    for folder in (tmp_path / "new", tmp_path / "empty", tmp_path / "old_demo"):
        if folder.name == "empty":
            folder.mkdir()
        if folder.name == "old_demo":
            (folder / "runs").mkdir(parents=True)
            (folder / "report").mkdir()
        claim_output_folder(folder, MARKER, DEMO_ENTRIES, "demo", "--out")
        assert (folder / MARKER).exists()
    (theirs / MARKER).touch()  # a demo folder someone added notes to stays a demo folder
    claim_output_folder(theirs, MARKER, DEMO_ENTRIES, "demo", "--out")
