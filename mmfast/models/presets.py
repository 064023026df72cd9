"""A system's presets: the JSON files in its folder under ``mmfast/configs/`` (``configs/llava/tiny.json``
is LLaVA's preset ``tiny``)."""
from __future__ import annotations

import json
from pathlib import Path


def preset_names(preset_dir: Path) -> list[str]:
    """The presets in ``preset_dir``, sorted."""
    return sorted(p.stem for p in preset_dir.glob("*.json"))


def read_preset(preset_dir: Path, name: str, system: str, hint: str = "") -> dict:
    """Preset ``name`` of ``preset_dir``; ValueError ``unknown <system> preset ...; presets: [...]<hint>``
    when there is none."""
    path = preset_dir / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown {system} preset {name!r}; presets: {preset_names(preset_dir)}{hint}")
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["preset_names", "read_preset"]
