"""The README stays true to the code: every setting and every metric is documented."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvservice.config import Settings
from kvservice.metrics import Metrics

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        rows = [line for line in README.splitlines() if line.startswith(f"| `{name}` |")]
        row = rows[0] if rows else None
        assert row is not None, f"setting {name} missing from the README table"
        assert f"`{flag}" in row
        if field.default not in (None, ()):
            assert f"`{_shown(field.default)}`" in row, (name, row)


def _shown(default: object) -> str:
    """A default as the README writes it: `false`, `10`, `data`, `always`."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_every_kvservice_metric_is_in_the_readme() -> None:
    families = text_string_to_metric_families(generate_latest(Metrics().registry).decode())
    names = {f.name for f in families if f.name.startswith("kvservice_")}
    assert names
    for name in names:
        assert f"`{name}" in README, f"metric {name} is not documented in the README"
