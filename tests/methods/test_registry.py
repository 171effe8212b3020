"""Every registered method imports, has a preset whose roles match it, and is documented."""

from pathlib import Path

import pytest

from mnseg.config.schema import PRESET_DIR, load_config
from mnseg.methods import METHODS, list_methods, method_class

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_has_preset_with_its_roles_and_docs(name):
    cls = method_class(name)
    cfg = load_config(name)
    assert cfg.method.name == name
    assert set(cfg.models) == set(cls.default_models)
    assert (PRESET_DIR / f"{name}.yaml").exists()
    assert (DOCS / "methods.md").read_text().count(f"`{name}`") >= 1


def test_list_methods_has_a_line_each():
    lines = dict(list_methods())
    assert set(lines) == set(METHODS) and all(lines.values())


def test_unknown_method_is_a_clear_error():
    from mnseg.errors import ConfigError

    with pytest.raises(ConfigError, match="known"):
        method_class("nope")


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_names_its_methods_roles(preset):
    cfg = load_config(preset)
    assert set(cfg.models) == set(method_class(cfg.method.name).default_models)
    assert len(cfg.data.patch_size) == 3 and cfg.train.epochs > 0
