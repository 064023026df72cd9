"""Batched generation for :class:`mmfast.models.llava.Llava`: a KV cache, greedy or top-p sampling,
stopping at the template's separator (or EOS).

Four ways to compute each step's next-token logits (``cache=`` / ``use_cache=``):

* ``"paged"`` (``"auto"`` picks it when the model is patched with mmfast attention): the batched engine of
  :mod:`mmfast.models.serving`: ragged prompts prefilled without padding (varlen attention), decoding from
  a paged KV cache, finished rows leave the batch; ``stream=`` takes a callback
  ``(row, token_id, text_delta)``.
* ``"mmfast"``: prompts are
  right-padded into a :class:`mmfast.models.kv_cache.MmfastKVCache` preallocated for prompt +
  ``max_new_tokens``. The prefill is causal over the padded batch, so the pad tokens at the end of a row
  never affect its real tokens; each row's logits are read at its own last real token and the cache's
  per-row lengths are set to the prompt lengths. Every decode step then appends one token per row at its
  own position (position id = row length) through :func:`mmfast.ops.flash_attn_with_kvcache`: no
  padding mask, no concatenation.
* ``"dynamic"`` (``"auto"`` for unpatched models): left-padded prompts with a padding mask and
  transformers' ``DynamicCache``.
* ``use_cache=False``: every step recomputes the whole left-padded sequence: slow, the oracle the
  cached paths are tested against.
"""
from __future__ import annotations

import torch

from mmfast.models.llava.templates import IMAGE_TOKEN, get_template
from mmfast.models.serving import _sample  # one sampler for both decoders

CACHES = ("auto", "paged", "mmfast", "dynamic")


def _rows(llava, images, prompts):
    """Token ids of each prompt (``<image>`` expanded to the patch count) and the stacked images of the rows
    that have one."""
    tok = llava.tokenizer
    rows = []
    pixel = []
    for i, (img, p) in enumerate(zip(images, prompts)):
        n_img = p.count(IMAGE_TOKEN)
        if n_img != (img is not None):
            raise ValueError(f"prompt {i} holds {n_img} {IMAGE_TOKEN} tokens but "
                             + ("an image was given (expected exactly 1)" if img is not None else "no image was given"))
        ids = []
        for t in tok(p, add_special_tokens=True)["input_ids"]:
            ids += [t] * llava.n_image_tokens if t == llava.config.image_token_id else [t]
        if not ids:
            raise ValueError(f"prompt {i} is empty (no tokens)")
        rows.append(ids)
        if img is not None:
            pixel.append(llava.image_processor(img))
    return rows, (torch.stack(pixel) if pixel else None)


def _pad(rows, pad: int, left: bool, device):
    """Padded ids (B, L) and attention mask (B, L), padding on the left or the right."""
    length = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (length - len(r))
        ids.append(fill + r if left else r + fill)
        mask.append([0] * len(fill) + [1] * len(r) if left else [1] * len(r) + [0] * len(fill))
    return (torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(mask, dtype=torch.long, device=device))


class _LeftPadded:
    """Left-padded prompts under a padding mask: transformers' DynamicCache, or no cache (recompute)."""

    def __init__(self, llava, rows, pixel, use_cache: bool):
        from transformers import DynamicCache

        self.llava, self.model, self.use_cache = llava, llava.model, use_cache
        self.ids, self.mask = _pad(rows, llava.pad_token_id, True, llava.device)
        self.embeds = llava.embed(self.ids, pixel)  # (B, L, D): the images are encoded once
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)  # (B, L): left padding does not shift positions
        self.cache = DynamicCache(config=self.model.config.text_config) if use_cache else None

    def _logits(self, ids, position_ids, embeds) -> torch.Tensor:
        out = self.llava.hidden(ids, self.mask, None, cache=self.cache, position_ids=position_ids,
                                use_cache=self.use_cache, inputs_embeds=embeds)
        return self.model.lm_head(out.last_hidden_state[:, -1])  # (B, V)

    def prefill(self) -> torch.Tensor:
        return self._logits(self.ids, self.positions, self.embeds)

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        step_emb = self.model.model.get_input_embeddings()(nxt[:, None])  # (B, 1, D)
        if self.use_cache:
            pos = self.positions[:, -1:] + 1
            self.positions = torch.cat([self.positions, pos], 1)
            return self._logits(nxt[:, None], pos, step_emb)
        self.ids = torch.cat([self.ids, nxt[:, None]], 1)
        self.embeds = torch.cat([self.embeds, step_emb], 1)
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        return self._logits(self.ids, self.positions, self.embeds)


class _RightPadded:
    """Right-padded prompts in an :class:`MmfastKVCache`; decode steps go through flash_attn_with_kvcache."""

    def __init__(self, llava, rows, pixel, max_new_tokens: int):
        from mmfast.models.kv_cache import MmfastKVCache

        self.llava, self.model = llava, llava.model
        self.ids, _ = _pad(rows, llava.pad_token_id, False, llava.device)
        self.lens = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=llava.device)  # (B,)
        self.embeds = llava.embed(self.ids, pixel)  # (B, L, D)
        b, length = self.ids.shape
        self.cache = MmfastKVCache(self.model.config, b, length + max_new_tokens)

    def _hidden(self, ids, position_ids, embeds) -> torch.Tensor:
        return self.llava.hidden(ids, None, None, cache=self.cache, position_ids=position_ids, use_cache=True,
                                 inputs_embeds=embeds).last_hidden_state  # (B, S, D)

    def prefill(self) -> torch.Tensor:
        b, length = self.ids.shape
        positions = torch.arange(length, device=self.ids.device).expand(b, length)  # (B, L)
        hidden = self._hidden(self.ids, positions, self.embeds)
        self.cache.set_lengths(self.lens)  # the pad tokens' keys are overwritten by the next tokens
        last = hidden[torch.arange(b, device=hidden.device), self.lens.long() - 1]  # (B, D)
        return self.model.lm_head(last)  # (B, V)

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        pos = self.cache.lengths().long()[:, None]  # (B, 1): each row continues at its own length
        step_emb = self.model.model.get_input_embeddings()(nxt[:, None])  # (B, 1, D)
        return self.model.lm_head(self._hidden(nxt[:, None], pos, step_emb)[:, -1])


def cache_kind(llava, cache: str = "auto", use_cache: bool = True) -> str:
    """``"mmfast"``, ``"dynamic"`` or ``"none"``: the decoding path :func:`generate` takes."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    patched = llava.uses_mmfast_attention
    if not use_cache:
        if cache != "auto":
            raise ValueError(f"use_cache=False recomputes every step; it takes no cache={cache!r}")
        return "none"
    if cache in ("mmfast", "paged") and not patched:
        raise ValueError(f"cache={cache!r} decodes through mmfast's flash_attn_with_kvcache and needs the model "
                         "patched with mmfast attention (build with kernels=True); use cache='dynamic'")
    if cache == "auto":
        return "paged" if patched else "dynamic"
    return cache


@torch.inference_mode()
def generate(llava, images, prompts, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, use_cache: bool = True, seed: int | None = None, stop: str | None = None,
             cache: str = "auto", *, stream=None) -> list[str]:
    """Continue each prompt (already formatted with the template); returns the new text of each row,
    cut before the stop string (default: the template's separator).

    ``cache``: ``"auto"`` (the batched paged engine when the model is patched, else transformers'),
    ``"paged"``, ``"mmfast"`` or ``"dynamic"``; ``use_cache=False`` recomputes every step instead.
    ``stream``: ``callback(row, token_id, text_delta)`` as tokens arrive (``"paged"`` only)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they pair one to one")
    if not prompts:
        return []
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    kind = cache_kind(llava, cache, use_cache)
    if stream is not None and kind != "paged":
        raise ValueError(f"stream= needs the batched engine (cache='paged' on a patched model); this call decodes "
                         f"with {kind!r}")
    if kind == "paged":
        return generate_llava(llava, images, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_p=top_p, seed=seed, stop=stop, on_token=stream)
    model = llava.model
    device = llava.device
    stop = stop if stop is not None else get_template(llava.template).stop_str
    eos = llava.tokenizer.eos_token_id
    gen = None
    if do_sample:
        gen = torch.Generator(device=device)
        gen.manual_seed(0 if seed is None else seed)
    rows, pixel = _rows(llava, images, prompts)
    if pixel is not None:
        pixel = pixel.to(device, next(model.model.vision_tower.parameters()).dtype)
    if kind == "mmfast":
        decoder = _RightPadded(llava, rows, pixel, max_new_tokens)
    else:
        decoder = _LeftPadded(llava, rows, pixel, use_cache=kind == "dynamic")
    b = len(rows)
    logits = decoder.prefill()  # (B, V)
    new = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = _sample(logits, do_sample, temperature, top_p, gen)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, llava.pad_token_id), nxt)
        for i in range(b):
            if not done[i]:
                new[i].append(int(nxt[i]))
                text = llava.tokenizer.decode(new[i], skip_special_tokens=False)
                if int(nxt[i]) == eos or (stop and stop in text):
                    done[i] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decoder.step(nxt)
    texts = []
    for ids in new:
        text = llava.tokenizer.decode(ids, skip_special_tokens=False)
        if stop and stop in text:
            text = text[: text.index(stop)]
        for special in (llava.tokenizer.eos_token, llava.tokenizer.pad_token):
            if special:
                text = text.replace(special, "")
        texts.append(text.strip())
    return texts


# --------------------------------------------------------------------------- the batched engine (mmfast.models.serving)
def llava_prompt_embeds(llava, images, prompts) -> tuple[list[torch.Tensor], list[int] | None]:
    """Per request the (L_i, D) prompt embeddings (images encoded in one batch) and, for
    ``image_attention="bidirectional"``, each request's prefix length."""
    rows, pixel = _rows(llava, images, prompts)
    model = llava.model
    if pixel is not None:
        pixel = pixel.to(llava.device, next(model.model.vision_tower.parameters()).dtype)
    ids, _ = _pad(rows, llava.pad_token_id, False, llava.device)  # (B, L) right padded
    emb = llava.embed(ids, pixel)  # (B, L, D)
    embeds = [emb[i, : len(r)] for i, r in enumerate(rows)]
    prefix = None
    if llava.image_attention == "bidirectional":
        prefix = llava.image_prefix_lengths(ids).tolist()
    return embeds, prefix


def generate_llava(llava, images, prompts, *, max_new_tokens: int = 64, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop: str | None = None,
                   cache: str = "paged", page_size: int = 16, num_pages: int | None = None,
                   max_batch: int | None = None, on_token=None, ignore_eos: bool = False,
                   return_completions: bool = False):
    """:meth:`Llava.generate`'s batched path: texts (cut at the stop string, default the template's
    separator; EOS / pad stripped) or, with ``return_completions``, :class:`Completion` objects."""
    from mmfast.models.serving import ServingEngine

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they pair one to one")
    if not prompts:
        return []
    stop = stop if stop is not None else get_template(llava.template).stop_str
    embeds, prefix = llava_prompt_embeds(llava, images, prompts)
    engine = ServingEngine(llava.model.model.language_model, llava.model.lm_head, cache=cache, page_size=page_size,
                           num_pages=num_pages, max_batch=max_batch)
    tok = llava.tokenizer
    outs = engine.generate(embeds, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_p=top_p, seed=seed, eos_token_id=None if ignore_eos else tok.eos_token_id,
                           stop=stop or None, tokenizer=tok, prefix_lens=prefix, on_token=on_token)
    llava._serving_stats = engine.stats
    if return_completions:
        return outs
    texts = []
    for c in outs:
        text = c.text
        for special in (tok.eos_token, tok.pad_token):
            if special:
                text = text.replace(special, "")
        texts.append(text.strip())
    return texts


__all__ = ["CACHES", "cache_kind", "generate", "generate_llava", "llava_prompt_embeds"]
