"""One interface for asking any vision-language model about images: ``answer(images, questions) -> texts``.

``get_adapter(model_dir)`` reads ``model_dir/config.json`` and picks the adapter:

* ``"mmfast_adapter": KIND`` in the config names a registered kind explicitly (tests, custom models);
* ``"model_type": "llava"`` is a llava-hf checkpoint (transformers ``LlavaForConditionalGeneration`` +
  ``AutoProcessor``), loaded from the local directory only;
* ``"mmfast_model": "llava" | "nextgpt"`` (or ``"model_type": "mmfast_llava" | "mmfast_nextgpt"``) is
  one of our models, loaded through ``mmfast.models.<name>.load_pretrained(model_dir, device=, dtype=)``
  whose result must have ``answer(images, questions, max_new_tokens=) -> list[str]``.

New kinds join with ``register_adapter(kind, factory)``; ``factory(model_dir, **options)`` returns an
``Adapter``. Batching is the caller's choice: ``answer`` gets a whole batch at once.
"""
from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmfast.models.kind import model_kind, read_model_config

DEFAULT_MAX_NEW_TOKENS = 16
# LLaVA-1.5's prompt without a chat template (llava-hf checkpoints without one).
LLAVA_FALLBACK_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class Adapter(abc.ABC):
    """A model that answers one question about each image of a batch."""

    kind: str = ""
    model_id: str = ""

    @abc.abstractmethod
    def answer(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        """``images[i]`` is a PIL RGB image, ``questions[i]`` the prompt text; returns one text each."""

    def __call__(self, images: Sequence[Any], questions: Sequence[str]) -> list[str]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions; they pair one to one")
        texts = self.answer(images, questions)
        if not isinstance(texts, (list, tuple)) or len(texts) != len(questions) or not all(
            isinstance(t, str) for t in texts
        ):
            raise TypeError(
                f"adapter {self.kind or type(self).__name__} must return {len(questions)} strings, got {texts!r:.200}"
            )
        return list(texts)


_REGISTRY: dict[str, Callable[..., Adapter]] = {}


def register_adapter(kind: str, factory: Callable[..., Adapter] | None = None):
    """Register ``factory(model_dir, **options) -> Adapter`` under ``kind``; usable as a decorator."""

    def add(f: Callable[..., Adapter]) -> Callable[..., Adapter]:
        _REGISTRY[kind] = f
        return f

    return add(factory) if factory is not None else add


def adapter_kinds() -> list[str]:
    return sorted(_REGISTRY)


def detect_kind(model_dir: str | Path) -> str:
    kind = model_kind(model_dir)
    if kind is not None:
        return kind
    mt = str(read_model_config(model_dir).get("model_type", ""))
    raise ValueError(
        f"{Path(model_dir) / 'config.json'}: cannot tell which adapter to use (model_type={mt or None!r}); "
        f"set 'mmfast_adapter' to one of {adapter_kinds()} or pass the kind explicitly"
    )


def get_adapter(model_dir: str | Path, kind: str | None = None, **options) -> Adapter:
    """The adapter for ``model_dir`` (kind read from its config unless given)."""
    kind = kind or detect_kind(model_dir)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown adapter kind {kind!r} for {model_dir}; registered: {adapter_kinds()}")
    adapter = _REGISTRY[kind](model_dir, **options)
    adapter.kind = adapter.kind or kind
    adapter.model_id = adapter.model_id or Path(model_dir).name
    return adapter


def _resolve(device: str | None, dtype: str | None):
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {None: None, "auto": None, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(k for k in names if k)}, got {dtype!r}")
    dt = names[dtype]
    if dt is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dt


# --------------------------------------------------------------------------- llava-hf
@register_adapter("llava-hf")
class LlavaHFAdapter(Adapter):
    """A llava-hf checkpoint through transformers, greedy decoding, left-padded batches."""

    kind = "llava-hf"

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **_unused):
        try:
            from transformers import AutoProcessor, LlavaForConditionalGeneration
        except ImportError as e:  # optional dependency
            raise ImportError("the llava-hf adapter needs transformers (pip install transformers)") from e
        self.device, self.dtype = _resolve(device, dtype)
        self.max_new_tokens = int(max_new_tokens)
        # Local files only: evaluation never downloads, and never runs repository code.
        self.processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.model = LlavaForConditionalGeneration.from_pretrained(
            str(model_dir), local_files_only=True, dtype=self.dtype
        ).to(self.device).eval()
        tok = self.processor.tokenizer
        tok.padding_side = "left"  # generation continues from the right edge of every row
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

    def prompt(self, question: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(conv, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return LLAVA_FALLBACK_PROMPT.replace("<image>", image_token).format(question=question)

    def answer(self, images, questions):
        import torch

        prompts = [self.prompt(q) for q in questions]
        inputs = self.processor(images=list(images), text=prompts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]


# --------------------------------------------------------------------------- ours
class OursAdapter(Adapter):
    """One of our models (``mmfast.models.llava`` / ``mmfast.models.nextgpt``)."""

    def __init__(self, model_dir: str | Path, module: str, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **_unused):
        self.kind = module
        name = f"mmfast.models.{module}"
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):
                raise NotImplementedError(
                    f"adapter {module!r} needs {name}, which is not in this build yet"
                ) from e
            raise
        load = getattr(mod, "load_pretrained", None)
        if load is None:
            raise NotImplementedError(f"adapter {module!r} needs {name}.load_pretrained(model_dir, device=, dtype=)")
        self.device, self.dtype = _resolve(device, dtype)
        self.max_new_tokens = int(max_new_tokens)
        self.model = load(str(model_dir), device=self.device, dtype=self.dtype)
        if not callable(getattr(self.model, "answer", None)):
            raise NotImplementedError(
                f"adapter {module!r} needs the model from {name}.load_pretrained to have "
                "answer(images, questions, max_new_tokens=) -> list[str]"
            )

    def answer(self, images, questions):
        return self.model.answer(list(images), list(questions), max_new_tokens=self.max_new_tokens)


register_adapter("llava", lambda model_dir, **kw: OursAdapter(model_dir, "llava", **kw))
register_adapter("nextgpt", lambda model_dir, **kw: OursAdapter(model_dir, "nextgpt", **kw))
