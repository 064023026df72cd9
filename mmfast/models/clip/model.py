"""CLIP models: every open_clip architecture plus mmfast's JSON presets, built offline.

``create_model(name, pretrained=PATH)`` never downloads: ``pretrained`` is a local checkpoint, either
an exported directory (``open_clip_config.json`` + weights, the layout open_clip's ``local-dir:`` reads
and :func:`save_pretrained` writes) or a weights file (open_clip or OpenAI key names; safetensors,
a ``weights_only`` torch pickle, or an OpenAI TorchScript archive).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mmfast.utils.io import atomic_open, atomic_write_json

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "clip"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # optional dependency: only the CLIP system needs it
        raise ImportError("mmfast.models.clip needs open_clip_torch (pip install 'mmfast[train]')") from e
    return open_clip


def list_presets() -> list[str]:
    """mmfast's own presets (``mmfast/configs/clip/*.json``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def list_models() -> list[str]:
    """Every architecture ``create_model`` can build: our presets, then open_clip's configs."""
    return list_presets() + [m for m in _open_clip().list_models() if m not in set(list_presets())]


def _check_model_cfg(cfg: Any, where: str) -> dict:
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"{where}: a CLIP config needs the keys embed_dim, vision_cfg and text_cfg")
    return cfg


def model_config(name: str) -> dict:
    """The architecture config (open_clip's dict layout) for a preset or open_clip model name."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    preset = PRESET_DIR / f"{name}.json"
    if preset.is_file():
        try:
            return _check_model_cfg(json.loads(preset.read_text(encoding="utf-8")), str(preset))
        except json.JSONDecodeError as e:
            raise ValueError(f"{preset}: malformed JSON ({e})") from e
    cfg = _open_clip().get_model_config(name.replace("/", "-"))
    if cfg is None:
        raise ValueError(
            f"unknown CLIP model {name!r}; presets: {', '.join(list_presets())}; "
            f"open_clip models include {', '.join(_open_clip().list_models()[:8])}, ... "
            "(mmfast.models.clip.list_models() lists all)"
        )
    return copy.deepcopy(cfg)


def _read_export_dir(path: Path) -> tuple[dict, dict, Path | None]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"pretrained directory {path} has no {CONFIG_NAME}")
    try:
        blob = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: malformed JSON ({e})") from e
    if "model_cfg" not in blob:
        raise ValueError(f"{cfg_path}: missing 'model_cfg'")
    model_cfg = _check_model_cfg(blob["model_cfg"], str(cfg_path))
    weights = None
    for suffix in _WEIGHT_SUFFIXES:
        found = sorted(path.glob(f"*{suffix}"))
        if found:
            weights = found[0]
            break
    return model_cfg, blob.get("preprocess_cfg", {}), weights


def _is_torchscript(path: Path) -> bool:
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A CLIP state dict from safetensors, a weights-only pickle or an OpenAI TorchScript archive."""
    from mmfast.utils.io import load_state_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.suffix != ".safetensors" and _is_torchscript(p):
        # OpenAI releases TorchScript archives; loading one runs no Python code, unlike a pickle.
        sd = torch.jit.load(str(p), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(key, None)
        return dict(sd)
    sd = load_state_dict(p)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{p}: expected a state dict of tensors")
    if next(iter(sd)).startswith("module."):  # saved from a DDP/DeepSpeed wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def create_model(
    name: str | None,
    pretrained: str | os.PathLike | None = None,
    precision: str = "fp32",
    device: str | torch.device | None = None,
    kernels: bool = True,
    backend: str | None = None,
    **overrides,
) -> torch.nn.Module:
    """Build a CLIP model; nothing is downloaded.

    ``name``: a preset (``list_presets()``) or any open_clip architecture; may be None when
    ``pretrained`` is an exported directory (its config names the architecture).
    ``pretrained``: local directory or weights file (see the module docstring).
    ``precision``: open_clip's precision names (fp32, bf16, fp16, pure_bf16, ...).
    ``kernels``: apply ``mmfast.models.patch`` (fused attention/norm/projection) when available,
    with ``backend`` (None: automatic) for the patched ops.
    ``overrides``: keyword arguments for the open_clip model constructor (e.g. ``output_dict=True``).
    """
    open_clip = _open_clip()
    preprocess_cfg: dict = {}
    weights: Path | None = None
    if pretrained is not None:
        p = Path(pretrained)
        if p.is_dir():
            model_cfg, preprocess_cfg, weights = _read_export_dir(p)
            if weights is None:
                raise FileNotFoundError(f"pretrained directory {p} has no weights file ({', '.join(_WEIGHT_SUFFIXES)})")
        elif p.is_file():
            if name is None:
                raise ValueError(f"pretrained={p} is a weights file: pass the architecture name too")
            model_cfg, weights = model_config(name), p
        else:
            raise FileNotFoundError(
                f"pretrained={pretrained!r} is not a local file or directory (mmfast never downloads weights)"
            )
    else:
        if name is None:
            raise ValueError("create_model needs a model name or a pretrained directory")
        model_cfg = model_config(name)

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_cfg = copy.deepcopy(model_cfg)
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {})
    if model_cfg.get("text_cfg", {}).get("hf_model_pretrained"):
        model_cfg["text_cfg"]["hf_model_pretrained"] = False  # would download
    saved_cfg = copy.deepcopy(model_cfg) | ({"custom_text": True} if custom_text else {})
    model_cfg.update(overrides)
    if "multimodal_cfg" in model_cfg:
        raise ValueError(f"{name}: CoCa-style models (multimodal_cfg) are not supported by mmfast's CLIP system")
    if "timm_model_name" in model_cfg["vision_cfg"]:
        model_cfg["vision_cfg"]["timm_model_pretrained"] = False  # would download
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**model_cfg)
    if weights is not None:
        sd = load_weights(weights)
        if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
            sd = open_clip.model.convert_to_custom_text_state_dict(sd)
        if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
            sd["logit_bias"] = torch.zeros_like(model.logit_bias)
        for key in ("logit_scale", "logit_bias"):  # scalar vs (1,) (nonscalar_logit_scale=True)
            own = getattr(model, key, None)
            if key in sd and own is not None and sd[key].numel() == own.numel():
                sd[key] = sd[key].reshape(own.shape)
        open_clip.model.resize_pos_embed(sd, model)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{weights} does not match architecture {name or model_cfg}: {e}") from None
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match architecture {name or model_cfg}: "
                f"missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}"
            )
    from dataclasses import asdict

    pp = {**asdict(open_clip.transform.PreprocessCfg()), **preprocess_cfg}
    if getattr(model.visual, "image_size", None) is not None:
        pp["size"] = model.visual.image_size
    open_clip.model.set_model_preprocess_cfg(model, pp)
    model.mmfast_config = {"model_cfg": saved_cfg, "name": name}
    model.to(device=device)
    _set_precision(model, precision)
    model.mmfast_kernels = apply_kernels(model, backend) if kernels else []
    return model


def _set_precision(model: torch.nn.Module, precision: str) -> None:
    if precision in ("fp32", "amp"):
        return
    dtypes = {"bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16, "pure_fp16": torch.float16}
    if precision not in dtypes:
        raise ValueError(f"precision {precision!r}; expected fp32, amp, bf16, pure_bf16, fp16 or pure_fp16")
    if precision.startswith("pure"):
        model.to(dtype=dtypes[precision])
    else:
        # open_clip's "bf16"/"fp16": low-precision weights, fp32 norms (they upcast inside).
        _open_clip().model.convert_weights_to_lp(model, dtype=dtypes[precision])


def apply_kernels(model: torch.nn.Module, backend: str | None = None) -> list[str]:
    """Swap in mmfast's fused modules via ``mmfast.models.patch``; returns the rules applied."""
    try:
        from mmfast.models import patch as patch_mod
    except ImportError:
        log.info("mmfast.models.patch is not available; CLIP runs with open_clip's modules")
        return []
    patch_mod.patch(model, backend=backend)
    return list(patch_mod.patched_rules(model))


def _cfg_of(model_or_cfg) -> dict:
    cfg = getattr(model_or_cfg, "mmfast_config", model_or_cfg)
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        return cfg["model_cfg"]
    if isinstance(cfg, str):
        return model_config(cfg)
    return _check_model_cfg(cfg, "model config")


def get_tokenizer(model_or_name):
    """open_clip's tokenizer with the model's context length (BPE vocabulary ships with open_clip)."""
    open_clip = _open_clip()
    if isinstance(model_or_name, torch.nn.Module) and not hasattr(model_or_name, "mmfast_config"):
        # A model built by open_clip itself: read its text tower's settings.
        text_cfg = open_clip.model.get_model_tokenize_cfg(model_or_name)
    else:
        text_cfg = _cfg_of(model_or_name)["text_cfg"]
    ctx = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def get_transforms(model: torch.nn.Module, is_train: bool):
    """open_clip's image transforms for this model (train: random resized crop; eval: resize+crop)."""
    open_clip = _open_clip()
    cfg = open_clip.transform.PreprocessCfg(**open_clip.model.get_model_preprocess_cfg(model))
    return open_clip.transform.image_transform_v2(cfg, is_train=is_train)


def save_pretrained(model_or_state: torch.nn.Module | dict, out_dir: str | os.PathLike, model_cfg: dict | None = None,
                    preprocess_cfg: dict | None = None) -> Path:
    """Write ``out_dir/{open_clip_config.json, open_clip_model.safetensors}`` (atomically, per file)."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_state, torch.nn.Module):
        model_cfg = model_cfg or _cfg_of(model_or_state)
        if preprocess_cfg is None:
            preprocess_cfg = _open_clip().model.get_model_preprocess_cfg(model_or_state)
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if model_cfg is None:
        raise ValueError("save_pretrained needs model_cfg when given a state dict")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_open(out / WEIGHTS_NAME, "wb") as f:
        f.write(save(tensors))
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in (preprocess_cfg or {}).items()}
    atomic_write_json(out / CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": pp})
    return out


__all__ = [
    "apply_kernels",
    "create_model",
    "get_tokenizer",
    "get_transforms",
    "list_models",
    "list_presets",
    "load_weights",
    "model_config",
    "save_pretrained",
]
