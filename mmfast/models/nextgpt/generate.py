"""NExT-GPT inference: greedy decoding with a KV cache, signal-token runs, decoding and saving media.

When the LLM emits the first token of a signal run (``[IMG0]``), the rest of the run is appended as is
(NExT-GPT's runs are fixed-length; the later tokens of a run are never sampled on their own); after generation one full forward gives every run's hidden states,
the output projection turns them into decoder conditioning and the frozen pipeline produces PNG / GIF /
WAV files under ``out_dir``.

    mmfast chat --model DIR --prompt "Draw a red cat." --out-dir gen/
    mmfast chat --model DIR --image cat.png --prompt "What is this?"
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mmfast.models.nextgpt import data as nd
from mmfast.models.nextgpt import decoders as ndec


def _media_tensors(model, images, audios, videos) -> dict:
    loader = model.media_loader()
    out = {}
    for m, items in (("image", images), ("audio", audios), ("video", videos)):
        xs = []
        for x in items or []:
            if isinstance(x, (str, Path)):
                xs.append(loader.load(m, str(x)))
            elif m == "image" and not isinstance(x, torch.Tensor):
                xs.append(loader.ip(x))  # a PIL image
            else:
                t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
                if m == "audio":
                    t = torch.nn.functional.pad(t[: loader.samples], (0, max(0, loader.samples - t.shape[0])))
                xs.append(t)
        if xs:
            out[m] = torch.stack(xs).to(model.device)
    return out


def _save(modality: str, arrays, out_dir: Path, stem: str, sample_rate: int) -> list[str]:
    from PIL import Image

    from mmfast.data._media import write_wav

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if modality == "image":
            p = out_dir / f"{stem}_image{i}.png"
            Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).save(p)
        elif modality == "video":
            p = out_dir / f"{stem}_video{i}.gif"
            frames = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in a]
            frames[0].save(p, save_all=True, append_images=frames[1:], duration=125, loop=0)
        else:
            p = out_dir / f"{stem}_audio{i}.wav"
            write_wav(p, a.reshape(-1).astype(np.float32), sample_rate)
        paths.append(str(p))
    return paths


CACHES = ("auto", "paged", "dynamic")


def _cache(self, cache: str) -> str:
    """``"paged"`` (mmfast's batched engine; ``auto`` on an LLM patched with mmfast attention) or ``"dynamic"``
    (one request at a time through transformers' ``DynamicCache``; ``auto`` otherwise)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    patched = getattr(self.llm.config, "_attn_implementation", None) == "mmfast"
    if cache == "paged" and not patched:
        raise ValueError("cache='paged' decodes through mmfast's flash_attn_with_kvcache and needs the LLM patched "
                         "with mmfast attention (build with kernels=True); use cache='dynamic'")
    return ("paged" if patched else "dynamic") if cache == "auto" else cache


def _prompt(self, text: str, images, audios, videos, history) -> tuple[torch.Tensor, dict]:
    """The dialogue's token ids (1, L) with the media placeholders, and the media tensors."""
    media = _media_tensors(self, images, audios, videos)
    seen = "".join(t["value"] for t in history or []) + text  # placeholders already written stay as they are
    prefix = "".join(nd.PLACEHOLDERS[m] + "\n" for m, x in media.items() for _ in range(len(x))
                     if nd.PLACEHOLDERS[m] not in seen)
    conv = list(history or []) + [{"from": "human", "value": prefix + text}]
    rec = {"conversations": conv + [{"from": "gpt", "value": ""}]}
    ids = nd.tokenize_dialogue(rec, self.tokenizer, self.n_input_tokens, max_length=10**6,
                               generation=True)["input_ids"].to(self.device)[None]  # (1, L)
    return ids, media


def _later_run_tokens(self) -> list[int]:
    """A run's later tokens: appended with its first one, they may never start a step themselves."""
    return [i for m in nd.MODALITIES for i in self.signal_ids[m][1:]]


def _decode_dynamic(self, ids: torch.Tensor, media: dict, max_new_tokens: int) -> list[int]:
    """Greedy new tokens of one request through transformers' DynamicCache; a signal run is appended whole."""
    from transformers import DynamicCache

    from mmfast.models.kv_cache import cache_kwargs

    llm = self.llm
    cache = DynamicCache(config=llm.config)
    kw = cache_kwargs(llm.model, cache)
    out = llm.model(inputs_embeds=self.embed(ids, media), use_cache=True, **kw)
    first = {self.signal_ids[m][0]: m for m in nd.MODALITIES}
    rest = torch.tensor(_later_run_tokens(self), device=self.device)
    eos = self.tokenizer.eos_token_id
    new: list[int] = []
    while len(new) < max_new_tokens:
        logits = llm.lm_head(out.last_hidden_state[:, -1])  # (1, V)
        logits[:, rest] = float("-inf")
        nxt = int(logits.argmax(-1))
        if nxt == eos:
            break
        step = [nxt] + (self.signal_ids[first[nxt]][1:] if nxt in first else [])
        new += step
        if "###" in self.tokenizer.decode(new[-4:], skip_special_tokens=True):
            break
        t = torch.tensor([step], device=self.device)
        out = llm.model(inputs_embeds=llm.get_input_embeddings()(t), use_cache=True, **kw)
    return new


def _decode_paged(self, prompts: list[tuple[torch.Tensor, dict]], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of every request at once through :class:`mmfast.models.serving.ServingEngine`: the same
    tokens as :func:`_decode_dynamic` (a run's tail is forced one token per step instead of in one forward)."""
    from mmfast.models.serving import ServingEngine

    engine = ServingEngine(self.llm.model, self.llm.lm_head, cache="paged")
    embeds = [self.embed(ids, media)[0] for ids, media in prompts]  # (L_i, D) each
    eos = self.tokenizer.eos_token_id
    outs = engine.generate(embeds, max_new_tokens=max_new_tokens, eos_token_id=eos, stop="###",
                           tokenizer=self.tokenizer, banned_token_ids=_later_run_tokens(self),
                           runs={self.signal_ids[m][0]: self.signal_ids[m][1:] for m in nd.MODALITIES})
    return [o.token_ids[:-1] if o.finish_reason == "eos" else o.token_ids for o in outs]


@torch.inference_mode()
def generate(self, text: str, images=None, audios=None, videos=None, history: list | None = None,
             max_new_tokens: int = 64, decode: bool = True, out_dir=None, steps: int = 10, seed: int = 0,
             stem: str = "gen", cache: str = "auto", guidance_scale: float = 4.0) -> dict:
    """``{"text", "token_ids", "conditions": {m: (R, Q, C)}, "<modality>": arrays or saved paths}``.
    ``cache``: see :func:`_cache`; both give the same tokens. ``guidance_scale``: the decoders' classifier-free
    guidance (the unconditional branch is the decoder's own embedding of "")."""
    kind = _cache(self, cache)
    ids, media = _prompt(self, text, images, audios, videos, history)
    if kind == "paged":
        new = _decode_paged(self, [(ids, media)], max_new_tokens)[0]
    else:
        new = _decode_dynamic(self, ids, media, max_new_tokens)
    return _finish(self, ids, media, new, decode, out_dir, steps, seed, stem, guidance_scale)


def _finish(self, ids, media, new: list[int], decode: bool, out_dir, steps: int, seed: int, stem: str,
            guidance_scale: float = 4.0) -> dict:
    """The reply's text, and each signal run's decoder conditioning (and media, with ``decode``)."""
    text_out = self.tokenizer.decode(new, skip_special_tokens=True).split("###")[0].strip()
    result = {"text": text_out, "token_ids": new, "conditions": {}}
    full = torch.cat([ids, torch.tensor([new], dtype=torch.long, device=self.device)], 1) if new else ids
    runs = {m: sum(t == self.signal_ids[m][0] for t in new) for m in nd.MODALITIES}
    if not any(runs.values()):
        return result
    hidden, emb = self.hidden(full, None, media)
    n_in = {m: int((ids == self.signal_ids[m][0]).sum()) for m in nd.MODALITIES}  # runs already in the prompt
    for m, r in runs.items():
        if not r:
            continue
        cond = self.output_proj[m](self.signal_states(m, full, hidden, emb))[n_in[m]:]  # (R, Q, C)
        result["conditions"][m] = cond
        if decode:
            arrays = ndec.decode(m, self.pipes[m], cond, steps=steps, seed=seed, guidance_scale=guidance_scale)
            sr = getattr(getattr(self.pipes[m], "vocoder", None), "config", None)
            result[m] = _save(m, arrays, Path(out_dir), stem, getattr(sr, "sampling_rate", 16000)) \
                if out_dir is not None else arrays
    return result


@torch.inference_mode()
def answer(self, images, questions, max_new_tokens: int = 16, cache: str = "auto") -> list[str]:
    """One greedy answer per (image, question); ``images[i]`` may be None (text only). No media decoding.
    On a patched LLM (``cache="paged"``) every question decodes in one batch."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions; they pair one to one")
    if _cache(self, cache) == "dynamic":
        return [self.generate(q, images=[img] if img is not None else None, max_new_tokens=max_new_tokens,
                              decode=False, cache="dynamic")["text"] for img, q in zip(images, questions)]
    prompts = [_prompt(self, q, [img] if img is not None else None, None, None, None)
               for img, q in zip(images, questions)]
    news = _decode_paged(self, prompts, max_new_tokens)
    return [self.tokenizer.decode(new, skip_special_tokens=True).split("###")[0].strip() for new in news]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast chat", description="chat with a saved NExT-GPT")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", default=None, help="image file (repeatable)")
    p.add_argument("--audio", action="append", default=None, help="WAV file (repeatable)")
    p.add_argument("--video", action="append", default=None, help="GIF or frame folder (repeatable)")
    p.add_argument("--prompt", default=None, help="one message; without it, read messages from stdin")
    p.add_argument("--out-dir", default="nextgpt_outputs", help="where generated PNG / GIF / WAV files go")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=25, help="diffusion steps")
    p.add_argument("--temperature", type=float, default=0.0, help="(greedy only for NExT-GPT)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    return p


def user_turns(prompt: str | None) -> Iterator[str]:
    """``mmfast chat``'s user messages (LLaVA's and NExT-GPT's): ``prompt`` alone when given; else lines
    read from stdin after ``USER: ``, stripped, each read when the previous turn is done, until an empty
    line or EOF."""
    if prompt is not None:
        yield prompt
        return
    while True:
        try:
            q = input("USER: ").strip()
        except EOFError:
            return
        if not q:
            return
        yield q


def chat_loop(model, a) -> int:
    """``mmfast chat``'s turns for a loaded NExT-GPT ``model`` and the options of :func:`_parser`."""
    history: list[dict] = []
    interactive = a.prompt is None
    for turn, q in enumerate(user_turns(a.prompt)):
        first = turn == 0
        try:  # the media stay in every turn's prompt (their placeholders are in the first human turn)
            r = model.generate(q, images=a.image, audios=a.audio, videos=a.video, history=history, max_new_tokens=a.max_new_tokens,
                               out_dir=a.out_dir, steps=a.steps, seed=a.seed, stem=f"turn{turn}")
        except (FileNotFoundError, ValueError) as e:
            print(f"mmfast chat: {e}", file=sys.stderr)
            return 2
        prefix = "".join(nd.PLACEHOLDERS[m] + "\n" for m, xs in (("image", a.image), ("audio", a.audio),
                                                                    ("video", a.video)) if first for _ in (xs or []))
        history += [{"from": "human", "value": prefix + q}, {"from": "gpt", "value": r["text"]}]
        print(("ASSISTANT: " if interactive else "") + r["text"], flush=True)
        for m in nd.MODALITIES:
            for path in r.get(m, []):
                print(f"[{m}] {path}", flush=True)
    return 0


__all__ = ["answer", "chat_loop", "generate", "user_turns"]
