"""Packaging: every package under medvol/ (and datasets/) is installed."""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medvol").rglob("__init__.py")}
    found |= {"medvol.datasets." + ".".join(p.parent.relative_to(ROOT / "datasets").parts)
              for p in (ROOT / "datasets").rglob("__init__.py") if p.parent != ROOT / "datasets"}
    found.add("medvol.datasets")
    assert found <= listed, f"not listed in setup.cfg [options] packages: {sorted(found - listed)}"


def test_console_script_entry_point():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "medvol = medvol.cli:main" in cfg["options.entry_points"]["console_scripts"]
