"""Process-level tuning done by the ``lcnn-zoo`` command (and only there)."""
import sys

from lcnn_zoo.cli import keep_freed_memory


def test_keep_freed_memory_applies_only_where_asked(monkeypatch):
    monkeypatch.setenv("LCNN_ZOO_MALLOC", "system")
    assert keep_freed_memory() is False
    monkeypatch.delenv("LCNN_ZOO_MALLOC")
    assert keep_freed_memory() is (sys.platform == "linux")
