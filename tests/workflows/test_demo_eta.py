"""Issue 18: the demo holds out a labelled subject for its validation curves, within its time budget, and logs
an overall ETA after each run, estimated from the finished runs' own times (fake runs here, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnseg.errors import ConfigError
from mnseg.workflows.demo import MODES, check_counts, demo_configs, demo_mode
from mnseg.workflows.eta import RunEta, format_left, planned_updates

VALIDATION_COST = 2.6  # training iterations one validation of a demo subject costs on CPU (measured, 3D UNet)


def test_demo_holds_out_one_labelled_subject_and_validates_within_its_budget(tmp_path):
    configs = demo_configs(tmp_path / "data", tmp_path, "cpu", num_labeled=3, seed=0)
    added = trained = 0.0
    for cfg in configs.values():
        assert cfg.data.num_val == 1 and cfg.data.num_labeled == 3
        assert 0 < cfg.train.val_every < cfg.train.epochs
        validations = -(-cfg.train.epochs // cfg.train.val_every)  # every val_every epochs and after the last
        assert validations >= 5  # enough points for a curve
        added += validations * VALIDATION_COST
        trained += planned_updates(cfg)
    assert added < 0.05 * trained  # validation costs under 5 % of the training: the budget hardly moves
    quick = demo_configs(tmp_path / "data", tmp_path, "cpu", 3, 0, "quick")
    assert all(c.data.num_val == 1 and c.train.val_every == 1 for c in quick.values())
    assert all(c.data.num_val == 0 for c in demo_configs(tmp_path, tmp_path, "cpu", 3, 0, "standard", 0).values())


@pytest.mark.parametrize("labeled,val,mode", [(6, 1, "standard"), (4, 1, "quick"), (3, -1, "standard"),
                                              (0, 1, "standard"), (21, 2, "long")])
def test_demo_counts_that_do_not_fit_its_data_fail_at_once(labeled, val, mode):
    with pytest.raises(ConfigError, match="--num-labeled .* --num-val"):
        check_counts(labeled, val, mode)
    check_counts(3, 1, mode)


def test_demo_eta_from_the_finished_runs_own_times(tmp_path):
    configs = demo_configs(Path(tmp_path), tmp_path, "cpu", 3, 0)
    work = {m: planned_updates(c) for m, c in configs.items()}
    assert work == {"supervised": 25 * 20, "mn": (40 + 10) * 20}  # M&N's stage 1 trains both models
    eta = RunEta(work)
    # the supervised run took 3 min (its timing record): M&N's 1000 updates at that pace take 6 min
    assert eta.finished("supervised", 180.0) == "run 1 of 2 done, about 6 min left"
    assert eta.finished("mn", 400.0) == "run 2 of 2 done, no training left"
    three = RunEta({"a": 100, "b": 100, "c": 300})
    assert three.finished("a", None) == "run 1 of 3 done; time left unknown (no finished run has a timing record)"
    assert three.finished("b", 20.0) == "run 2 of 3 done, about 1 min left"  # 300 updates at 0.2 s
    assert format_left(59) == "under a minute left" and format_left(61) == "about 2 min left"
    with pytest.raises(KeyError):
        three.finished("d", 1.0)


def test_demo_logs_the_eta_after_each_run(tmp_path, monkeypatch):
    """run_demo with fake runs: each 'run' leaves only a timing record; the log says how much is left."""
    import json
    import types

    import mnseg.data.synth
    import mnseg.reporting.report
    import mnseg.workflows.pipeline
    from mnseg.workflows.demo import run_demo

    def fake_synth(out, **_):
        (out / "imagesTs").mkdir(parents=True, exist_ok=True)
        (out / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))

    seconds = {"supervised": 120.0, "mn": 300.0}

    def fake_pipeline(cfg, run_dir, **_):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "timing.json").write_text(json.dumps({"train_seconds": seconds[run_dir.name]}))
        return types.SimpleNamespace(summary={}, test_seconds=0.0)

    monkeypatch.setattr(mnseg.data.synth, "synthesize_dataset", fake_synth)
    monkeypatch.setattr(mnseg.workflows.pipeline, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(mnseg.reporting.report, "write_report", lambda out, *a, **k: out / "report.md")
    lines = []
    run_demo(tmp_path / "demo", device="cpu", progress=False, log=lines.append)
    assert "run 1 of 2 done, about 4 min left" in lines  # 1000 updates at 120 s / 500
    assert "run 2 of 2 done, no training left" in lines


@pytest.mark.parametrize("method", ["supervised", "mn"])
def test_the_long_demo_is_the_committed_grid_cell_at_2_labelled_seed_0(tmp_path, method):
    """`mnseg demo --long` trains what the CPU grid's seed-0 cells at 2 labelled trained (the committed configs),
    so its figures are those cells' (docs/results.md) up to thread-count rounding."""
    import yaml

    from mnseg.config.schema import Config
    from mnseg.workflows.benchmark import comparable_config

    cell = Path(__file__).parents[2] / "benchmarks/results/Dataset921_MNIStrong3mm/runs" / method / "n2_seed0"
    grid = comparable_config(Config.from_dict(yaml.safe_load((cell / "config.yaml").read_text())))
    ours = comparable_config(demo_configs(Path(grid["data"]["dataset"]), tmp_path, "cpu", 2, 0, "long", 2)[method])
    for d in (grid, ours):
        d["data"].pop("cache_dir")
    assert ours == grid
    assert MODES["long"].checkpoint == "best"  # the benchmark scores the best-validation checkpoint
    check_counts(2, 2, "long")
    with pytest.raises(ConfigError, match="choose one"):
        demo_mode(quick=True, long=True)
