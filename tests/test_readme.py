"""The README stays true: its settings table names every setting with its real default."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ROWS = dict(re.findall(r"^\| `(GATEWAY_[A-Z_]+)` \| ([^|]+) \|", README, re.M))


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    for name, field in Settings.model_fields.items():
        row = ROWS.get(f"GATEWAY_{name.upper()}")
        assert row is not None, f"GATEWAY_{name.upper()} missing from the README table"
        default = field.default
        shown = row.strip().strip("`")
        if default in ("", None):
            assert shown == "(none)", (name, shown)
        elif isinstance(default, bool):
            assert shown == str(default).lower(), (name, shown)
        elif isinstance(default, float) and default.is_integer():
            assert shown == str(int(default)), (name, shown)
        else:
            assert shown == str(default), (name, shown)


def test_readme_starts_with_the_two_commands() -> None:
    commands = re.findall(r"^    (\S.*)$", README.split("---")[0], re.M)
    assert commands[0].endswith(".venv/bin/python -m gateway")
    assert commands[1] == "./scripts/test"
    assert "./scripts/test" in (Path(__file__).resolve().parent.parent / ".ci/run").read_text()
