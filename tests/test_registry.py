"""Every registered method imports, has a preset whose roles match it, and is documented."""

from pathlib import Path

import pytest

from mnseg.config import PRESET_DIR, load_config
from mnseg.methods import METHODS, list_methods, method_class

DOCS = Path(__file__).resolve().parents[1] / "docs"


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
