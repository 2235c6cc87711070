"""Every setting a deployment can change is named in the docs users read (README.md, docs/)."""
from __future__ import annotations

import pathlib

from core.settings import Settings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_setting_is_documented_under_its_environment_name() -> None:
    text = (ROOT / "README.md").read_text() + "".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))
    prefix = Settings.model_config["env_prefix"]
    undocumented = [f"{prefix}{name.upper()}" for name in Settings.model_fields
                    if f"{prefix}{name.upper()}" not in text]
    assert len(Settings.model_fields) > 20  # the settings are read, not an empty list
    assert not undocumented, f"settings no doc names: {undocumented}"
