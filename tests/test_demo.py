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
    # Running again reuses the data and the finished runs.
    mtime = (out / "runs" / "mn" / "checkpoints" / "last.pt").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--quick", "--no-progress", "--device", "cpu"]) == 0
    assert (out / "runs" / "mn" / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
