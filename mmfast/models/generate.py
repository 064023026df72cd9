"""Batched generation for :class:`mmfast.models.llava.Llava`: left-padded prompts, a KV cache, greedy or
top-p sampling, stopping at the template's separator (or EOS).

With ``use_cache=True`` the prompt is run once and each new token attends over the cached keys and
values (transformers' ``DynamicCache``; under ``mmfast.patch`` the attention is mmfast's). With
``use_cache=False`` every step recomputes the whole sequence: slower, and the oracle the cached path
is tested against.
"""
from __future__ import annotations

import torch

from mmfast.models.llava_templates import IMAGE_TOKEN, get_template


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or nucleus sampling over the top-p mass."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)  # (B, 1)
    return order.gather(-1, pick).squeeze(-1)


def _batch(llava, images, prompts):
    """Left-padded ids (B, L), attention mask (B, L) and the stacked images of the rows that have one."""
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
        rows.append(ids)
        if img is not None:
            pixel.append(llava.image_processor(img))
    length = max(len(r) for r in rows)
    pad = llava.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, mask, (torch.stack(pixel) if pixel else None)


@torch.inference_mode()
def generate(llava, images, prompts, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, use_cache: bool = True, seed: int | None = None, stop: str | None = None) -> list[str]:
    """Continue each prompt (already formatted with the template); returns the new text of each row,
    cut before the stop string (default: the template's separator)."""
    from transformers import DynamicCache

    from mmfast.models.llava import forward_hidden, merge_embeddings

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; they pair one to one")
    if not prompts:
        return []
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    model = llava.model
    device = llava.device
    stop = stop if stop is not None else get_template(llava.template).stop_str
    eos = llava.tokenizer.eos_token_id
    gen = None
    if do_sample:
        gen = torch.Generator(device=device)
        gen.manual_seed(0 if seed is None else seed)
    input_ids, mask, pixel = _batch(llava, images, prompts)
    input_ids, mask = input_ids.to(device), mask.to(device)
    if pixel is not None:
        pixel = pixel.to(device, next(model.model.vision_tower.parameters()).dtype)
    b = input_ids.shape[0]
    embeds = merge_embeddings(model, input_ids, pixel)  # (B, L, D): the images are encoded once
    emb_layer = model.model.get_input_embeddings()
    cache = DynamicCache(config=model.config.text_config) if use_cache else None
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, L): left padding does not shift positions
    out = forward_hidden(model, input_ids, mask, None, image_attention=llava.image_attention, cache=cache,
                         position_ids=positions, use_cache=use_cache, inputs_embeds=embeds)
    new = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    ids_all = input_ids
    for step in range(max_new_tokens):
        logits = model.lm_head(out.last_hidden_state[:, -1])  # (B, V)
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
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], 1)
        ids_all = torch.cat([ids_all, nxt[:, None]], 1)
        step_emb = emb_layer(nxt[:, None])  # (B, 1, D)
        if use_cache:
            pos = positions[:, -1:] + 1
            positions = torch.cat([positions, pos], 1)
            out = forward_hidden(model, nxt[:, None], mask, None, image_attention=llava.image_attention, cache=cache,
                                 position_ids=pos, use_cache=True, inputs_embeds=step_emb)
        else:
            embeds = torch.cat([embeds, step_emb], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = forward_hidden(model, ids_all, mask, None, image_attention=llava.image_attention,
                                 position_ids=positions, inputs_embeds=embeds)
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


__all__ = ["generate"]
