"""DeepSpeed JSON configs: find, parse, check and resolve them (no torch import, so the launcher can
check a config before any rank starts).

``--deepspeed-config`` is a path or a preset name from ``mmfast/training/configs`` (zero0..zero3,
zero3_offload). ``"auto"`` entries resolve per device: the micro batch to ``--batch-size``,
``bf16.enabled`` to "on a GPU", offload ``pin_memory`` to "on a GPU", gradient accumulation to 1.
"""
from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ZERO_STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A DeepSpeed config that cannot run; the message names the file and the field."""


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_path(name_or_path: str) -> Path:
    """The JSON file behind ``--deepspeed-config``: a path, else a preset name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = CONFIG_DIR / f"{name_or_path}.json"
    if preset.is_file():
        return preset
    raise FileNotFoundError(f"--deepspeed-config {name_or_path}: no such file or preset ({', '.join(presets())})")


def read_config(name_or_path: str) -> tuple[dict, Path]:
    path = config_path(name_or_path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--deepspeed-config {path}: not UTF-8 text ({e})") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed-config {path}: expected a JSON object, got a {type(cfg).__name__}")
    return cfg, path


def _positive_or_auto(cfg: dict, key: str, where: Path) -> int | None:
    v = cfg.get(key, "auto")
    if v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"--deepspeed-config {where}: {key} must be a positive integer or \"auto\", got {v!r}")
    return v


def check_config(cfg: dict, where: Path, batch_size: int, world_size: int) -> None:
    """Refuse what DeepSpeed would only refuse inside every rank, 30 s later (or never)."""
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"--deepspeed-config {where}: zero_optimization must be an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ConfigError(f"--deepspeed-config {where}: zero_optimization.stage must be one of {ZERO_STAGES}, got {stage!r}")
    for key in ("offload_optimizer", "offload_param"):
        if key in zero and not isinstance(zero[key], dict):
            raise ConfigError(f"--deepspeed-config {where}: zero_optimization.{key} must be an object")
    for key in ("bf16", "fp16"):
        sub = cfg.get(key, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"--deepspeed-config {where}: {key} must be an object, got {type(sub).__name__}")
        if sub.get("enabled", False) not in (True, False, "auto"):
            raise ConfigError(f"--deepspeed-config {where}: {key}.enabled must be true, false or \"auto\"")
    if cfg.get("bf16", {}).get("enabled") is True and cfg.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"--deepspeed-config {where}: bf16 and fp16 are both enabled; pick one")
    micro = _positive_or_auto(cfg, "train_micro_batch_size_per_gpu", where)
    if micro is not None and micro != batch_size:
        raise ConfigError(f"--deepspeed-config {where}: train_micro_batch_size_per_gpu {micro} conflicts with "
                          f"--batch-size {batch_size}; set it to \"auto\" or pass --batch-size {micro}")
    accum = _positive_or_auto(cfg, "gradient_accumulation_steps", where) or 1
    total = _positive_or_auto(cfg, "train_batch_size", where)
    if total is not None and total != batch_size * accum * world_size:
        raise ConfigError(f"--deepspeed-config {where}: train_batch_size {total} != --batch-size {batch_size} x "
                          f"gradient_accumulation_steps {accum} x {world_size} ranks = {batch_size * accum * world_size}")
    ckpt = cfg.get("checkpoint", {})
    if isinstance(ckpt, dict) and ckpt.get("load_universal"):
        # DeepSpeed's universal-checkpoint loader unpickles with weights_only=False.
        raise ConfigError(f"--deepspeed-config {where}: checkpoint.load_universal is not supported "
                          "(its loader would unpickle arbitrary objects)")


def load_config(name_or_path: str, batch_size: int, world_size: int, on_gpu: bool) -> dict:
    """Read, check and resolve the ``"auto"`` entries for this device."""
    cfg, where = read_config(name_or_path)
    check_config(cfg, where, batch_size, world_size)
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = batch_size
    if cfg.get("gradient_accumulation_steps", "auto") == "auto":
        cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)  # implied by micro batch x accumulation x ranks (checked above)
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = on_gpu and key == "bf16"
    for key in ("offload_optimizer", "offload_param"):
        sub = cfg.get("zero_optimization", {}).get(key)
        if sub and sub.get("pin_memory") == "auto":
            sub["pin_memory"] = on_gpu
    return cfg
