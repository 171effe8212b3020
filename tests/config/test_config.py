"""key.sub=value overrides: YAML values, and clear errors for the slips people make typing them."""

from __future__ import annotations

import pytest

from mnseg.config.schema import apply_overrides, load_config
from mnseg.errors import ConfigError


def test_override_values_are_yaml():
    data = apply_overrides({}, ["models.net.kwargs={depth: 3, base_filters: 4}", "train.epochs=7", "a.b=",
                                "data.patch_size=[32, 32, 16]"])
    assert data["models"]["net"]["kwargs"] == {"depth": 3, "base_filters": 4}
    assert data["train"]["epochs"] == 7 and data["a"]["b"] is None and data["data"]["patch_size"] == [32, 32, 16]
    assert load_config("supervised", ["train.epochs=3"]).train.epochs == 3


@pytest.mark.parametrize("item, message", [
    ("models.net.kwargs={depth: 3", "not valid YAML"),
    ("models.net.kwargs={depth:3, base_filters:4}", "space after each colon, e.g. {depth: 3}"),
    ("train.epochs", "key.sub=value"),
])
def test_bad_overrides_name_the_override_and_the_fix(item, message):
    with pytest.raises(ConfigError, match="override '") as info:
        apply_overrides({}, [item])
    assert message in str(info.value)


def test_a_bad_override_on_the_command_line_is_one_line_not_a_traceback(toy_dataset, capsys):
    from mnseg.cli import main

    assert main(["train", str(toy_dataset), "models.net.kwargs={depth: 3"]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "Traceback" not in err


def test_every_preset_passes_the_value_checks():
    from mnseg.config.checks import check_config
    from mnseg.config.schema import PRESET_DIR

    for path in sorted(PRESET_DIR.glob("*.yaml")):
        check_config(load_config(path))


def test_out_of_range_settings_are_listed_together():
    from mnseg.config.checks import check_config

    cfg = load_config("mn", ["train.batch_size=0", "train.seed=-1", "data.patch_size=[32, 32]", "data.fg_prob=1.5",
                             "infer.overlap=1", "models.net2d.optim.lr=-1", "train.on_nan=ignore"])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    for setting in ("train.batch_size", "train.seed", "data.patch_size", "data.fg_prob", "infer.overlap",
                    "models.net2d.optim.lr", "train.on_nan"):
        assert setting in str(info.value)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "train.batch_size must be at least 1"),
    (["--epochs", "0"], "train.epochs must be at least 1"),
    (["--patch-size", "32,32"], "data.patch_size must be three"),
    (["--patch-size", "a,b,c"], "give whole numbers"),
])
def test_bad_training_settings_stop_before_the_run_folder_exists(toy_dataset, tmp_path, capsys, args, message):
    from mnseg.cli import main

    run = tmp_path / "run"
    assert main(["train", str(toy_dataset), "--run-dir", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()


def test_benchmark_checks_every_methods_settings_before_training(toy_dataset, tmp_path):
    from mnseg.workflows.benchmark import BenchmarkSpec, check_spec

    spec = BenchmarkSpec(toy_dataset, tmp_path / "b", ["supervised", "mean_teacher"], [2], [0],
                         method_overrides={"mean_teacher": ["models.student.optim.lr=-1"]})
    with pytest.raises(ConfigError, match="mean_teacher: invalid settings: models.student.optim.lr"):
        check_spec(spec, need_dataset=False)


def test_a_retired_key_of_an_older_run_config_is_dropped_on_reading():
    from mnseg.config.schema import Config

    d = Config().to_dict()
    d["train"]["overlay_every"] = 0  # written by earlier versions into every run's config.yaml; never did anything
    assert "overlay_every" not in Config.from_dict(d).to_dict()["train"]


def test_the_domain_section_is_typed_and_checked():
    from mnseg.config.checks import check_config

    cfg = load_config("supervised", ["domain.dann_weight=0.5", "domain.target_entropy_weight=0.1"])
    assert cfg.domain.dann_weight == 0.5 and cfg.domain.active
    assert not load_config("supervised").domain.active  # off unless a weight is above 0
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['dann_wieght'\] in 'domain'"):
        load_config("supervised", ["domain.dann_wieght=0.5"])
    with pytest.raises(ConfigError, match="'domain.grl_lambda' must be float"):
        load_config("supervised", ["domain.grl_lambda=strong"])
    bad = load_config("supervised", ["domain.dann_weight=-1", "domain.grl_schedule=linear",
                                     "domain.target_batch_size=0"])
    with pytest.raises(ConfigError) as err:
        check_config(bad)
    for text in ("domain.dann_weight must be >= 0", "domain.grl_schedule must be one of dann, constant",
                 "domain.target_batch_size must be at least 1"):
        assert text in str(err.value)


def test_a_preset_naming_another_model_starts_its_kwargs_afresh(tmp_path):
    from mnseg.config.schema import read_yaml

    (tmp_path / "base.yaml").write_text("models:\n  net2d: {name: effunet, kwargs: {variant: lite0}, finetune: lora}\n"
                                        "  net3d: {name: unet3d, kwargs: {depth: 4}}\n")
    (tmp_path / "child.yaml").write_text(f"base: {tmp_path / 'base.yaml'}\nmodels:\n"
                                         "  net2d: {name: unet2d, kwargs: {depth: 3}}\n"
                                         "  net3d: {kwargs: {base_filters: 8}}\n")
    models = read_yaml(tmp_path / "child.yaml")["models"]
    assert models["net2d"] == {"name": "unet2d", "kwargs": {"depth": 3}, "finetune": "lora"}  # no EfficientNet variant
    assert models["net3d"]["kwargs"] == {"depth": 4, "base_filters": 8}  # the same model: merged as before
