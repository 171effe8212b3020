"""key.sub=value overrides: YAML values, and clear errors for the slips people make typing them."""

from __future__ import annotations

import pytest

from mnseg.config import apply_overrides, load_config
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
