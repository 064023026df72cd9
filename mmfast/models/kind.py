"""Which system a saved model directory holds, read from its ``config.json``: what ``mmfast chat`` and the
evaluation adapters (``mmfast.eval.adapters``) dispatch on."""
from __future__ import annotations

from pathlib import Path


def read_model_config(model_dir: str | Path) -> dict:
    from mmfast.utils.io import read_json

    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model directory not found: {d}")
    cfg = read_json(d / "config.json", what="model config")
    if not isinstance(cfg, dict):
        raise TypeError(f"{d / 'config.json'}: expected a JSON object")
    return cfg


def model_kind(model_dir: str | Path) -> str | None:
    """``"llava"``, ``"nextgpt"``, ``"llava-hf"``, an explicit ``"mmfast_adapter"``, or None (not one we know)."""
    cfg = read_model_config(model_dir)
    if isinstance(cfg.get("mmfast_adapter"), str):
        return cfg["mmfast_adapter"]
    ours = cfg.get("mmfast_model")
    mt = str(cfg.get("model_type", ""))
    if ours is None and mt.startswith("mmfast_"):
        ours = mt[len("mmfast_"):]
    if ours is not None:
        return str(ours)
    if mt == "llava":
        return "llava-hf"
    return None


__all__ = ["model_kind", "read_model_config"]
