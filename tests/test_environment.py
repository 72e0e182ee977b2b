"""lcnn_zoo.environment: every LCNN_ZOO_* variable the package reads goes through one schema and one
typed reader (issue 31, case 9). A bad value is a warning naming the variable and the default used,
or, for the Hub namespace (where uploads go), a one-line error from the command that uses it; never
a traceback at import."""
import re
import warnings
from pathlib import Path

import pytest

from lcnn_zoo import environment, hub
from lcnn_zoo.environment import VARIABLES, EnvironmentVariableWarning, env
from lcnn_zoo.errors import UserError

PACKAGE = Path(environment.__file__).resolve().parent


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(environment, "_warned", set())  # each test sees its warnings once


@pytest.mark.parametrize("name,value,default", [
    ("LCNN_ZOO_FUSED", "maybe", True),
    ("LCNN_ZOO_TRITON_ON_CPU", "2", False),
    ("LCNN_ZOO_MALLOC", "sytem", "tuned"),
])
def test_a_bad_value_warns_naming_the_variable_and_the_default_used(monkeypatch, name, value, default):
    monkeypatch.setenv(name, value)
    with pytest.warns(EnvironmentVariableWarning, match=f"\\${name}='{re.escape(value)}' is not .*; using the default"):
        assert env(name) == default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env(name) == default  # said once, not at every read (LCNN_ZOO_FUSED is read per call)


@pytest.mark.parametrize("name,value,expected", [
    ("LCNN_ZOO_FUSED", "0", False),
    ("LCNN_ZOO_FUSED", "off", False),
    ("LCNN_ZOO_TRITON_ON_CPU", "1", True),
    ("LCNN_ZOO_MALLOC", "system", "system"),
    ("LCNN_ZOO_HUB_NAMESPACE", "me/", "me"),
    ("LCNN_ZOO_PUBLISHED", "", None),  # empty is unset: the default below LCNN_ZOO_CACHE
])
def test_good_values_and_empty_ones(monkeypatch, tmp_path, name, value, expected):
    monkeypatch.setenv("LCNN_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = env(name)
    assert got == (tmp_path / "published.json" if expected is None else expected)


@pytest.mark.parametrize("value", ["a b", "a/b", "x" * 100, "--me"])
def test_a_bad_hub_namespace_is_refused_where_it_is_used_not_at_import(monkeypatch, value):
    monkeypatch.setenv("LCNN_ZOO_HUB_NAMESPACE", value)
    with pytest.raises(UserError, match="LCNN_ZOO_HUB_NAMESPACE=.* is not a Hugging Face user or organisation name"):
        hub.hub_id("lcnn_resnet20", "fmnist")  # what push uploads to: never silently the default's namespace


def test_the_schema_is_the_only_reader_of_the_packages_variables():
    """No module reads an LCNN_ZOO_* variable from os.environ itself, and every one the package
    names is declared in the schema."""
    named = set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        named |= set(re.findall(r"LCNN_ZOO_[A-Z_]*[A-Z]", text))
        if path.name != "environment.py":
            for line in text.splitlines():
                if re.search(r"environ|getenv", line):
                    assert "LCNN_ZOO_" not in line, f"{path.name}: {line.strip()}"
    assert named <= set(VARIABLES), named - set(VARIABLES)
