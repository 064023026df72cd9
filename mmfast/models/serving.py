"""Batched generation for LLaMA-family language models (LLaVA's and NExT-GPT's LLM): ragged prompts
prefilled without padding, decoding from a paged (or contiguous) KV cache, requests that finish early
handing their pages to the ones still waiting.

    engine = ServingEngine(llava.model.model.language_model, llava.model.lm_head, cache="paged")
    outs = engine.generate(prompt_embeds, max_new_tokens=64, eos_token_id=2, tokenizer=tok, stop=["</s>"])
    outs[i].token_ids, outs[i].text, outs[i].finish_reason          # "eos" | "stop" | "length"

``prompt_embeds``: one (L_i, D) tensor per request (LLaVA: the token embeddings with the image features
written over the ``<image>`` tokens). :func:`mmfast.models.llava.generate.generate_llava` builds them and is
what ``Llava.generate(..., cache="paged")`` (``cache="auto"`` on a patched model) calls.

How a step runs (no transformers ``generate``, no padding mask, no HF cache object):

* **prefill**: the admitted prompts are packed into one (1, T, D) sequence with per-request positions;
  each layer writes its keys/values into the cache slots of its request and attends through
  :func:`mmfast.ops.flash_attn_varlen_func` (``cu_seqlens``: causal within each request; the
  prefix-LM mask for ``image_attention="bidirectional"``). Only each request's last hidden state goes
  through the LM head.
* **decode**: one token per running request, (B, 1, D); each layer calls
  :func:`mmfast.ops.flash_attn_with_kvcache` with the new k/v, ``cache_seqlens`` and either the
  ``block_table`` (paged) or ``cache_batch_idx`` (contiguous), which appends in place and attends.
* The decoder layers are the model's own modules (so ``mmfast.patch``'s fused norms / rotary / SwiGLU
  run), called without transformers' mask construction; their attention must be mmfast's
  (``attn_implementation="mmfast"``, i.e. a patched model), which routes to this module's cache through
  the ``mmfast_kv_cache`` keyword argument.

Caches. ``"paged"``: per layer (num_pages, page_size, Hk, D) pages shared by every request; a
:class:`PagePool` hands out pages. A request is admitted when the pool has the pages for its prompt plus
its ``max_new_tokens`` (allocated up front: no request is ever preempted); when it finishes (EOS, a
stop string, its token budget) its pages return to the pool at once and the next waiting request is
prefilled and joins the running batch at the next step. ``"contiguous"``: per layer (slots, max_len, Hk,
D); a request takes one slot. Both give the same tokens (tested).

Sampling: greedy, or temperature + top-p with a seeded ``torch.Generator``; ``banned_token_ids`` are
never sampled; ``runs`` makes fixed-length signal runs (NExT-GPT's ``[IMG0]..[IMG3]``): after a run's first
token the rest is appended one per step without sampling. Streaming: ``on_token(request_index, token_id, text_delta)`` is called as tokens are
accepted; ``text_delta`` holds back the characters that could still begin a stop string.

A CUDA-graph decode step would capture :meth:`ServingEngine._decode_logits` for a few batch-size
buckets (static ``block_table`` / ``cache_seqlens`` buffers of the bucket's size); it is not written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmfast.models.kv_cache import MmfastKVCache
from mmfast.ops._attention_call import _params, _run_forward_only
from mmfast.ops._attention_reference import _window_pair
from mmfast.ops.attention import flash_attn_varlen_func, flash_attn_with_kvcache

CACHE_LAYOUTS = ("paged", "contiguous")


# --------------------------------------------------------------------------- allocator
class PagePool:
    """Free list of ``num_pages`` page indices (``alloc`` / ``free``; ``num_free`` is what is left)."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages} and {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages but only {len(self._free)} of {self.num_pages} are free")
        out = [self._free.pop() for _ in range(n)]
        self.peak_used = max(self.peak_used, self.num_pages - len(self._free))
        return out

    def free(self, pages: list[int]) -> None:
        if len(set(pages)) != len(pages) or any(not 0 <= p < self.num_pages for p in pages):
            raise ValueError(f"freeing invalid pages {pages}")
        self._free.extend(reversed(pages))


# --------------------------------------------------------------------------- the cache the attention sees
class _StepCache(MmfastKVCache):
    """What mmfast's attention function finds under ``mmfast_kv_cache`` for one forward of the engine.

    A subclass of :class:`MmfastKVCache` only so that the attention routes to it (it checks the type);
    it holds no layers of its own: the storage is the engine's, the plan (which slots, which lengths) is
    this forward's, shared by every layer."""

    def __init__(self, engine: ServingEngine, plan: dict):
        self.engine, self.plan = engine, plan

    def update(self, *args, **kwargs):  # the engine never passes this object as transformers' cache
        raise RuntimeError("the serving engine's cache is not a transformers cache")

    def check_consumed(self) -> None:
        return None

    def attend(self, layer_idx: int, q, k, v, *, causal, softmax_scale, window_size, softcap, prefix,
               backend) -> torch.Tensor:
        e, p = self.engine, self.plan
        kc, vc = e.k_cache[layer_idx], e.v_cache[layer_idx]
        if p["kind"] == "prefill":
            kf, vf = k[0], v[0]  # (T, Hk, D)
            if e.layout == "paged":
                kc[p["page"], p["slot"]] = kf
                vc[p["page"], p["slot"]] = vf
            else:
                kc[p["row"], p["pos"]] = kf
                vc[p["row"], p["pos"]] = vf
            out = flash_attn_varlen_func(q[0], kf, vf, p["cu"], p["cu"], p["max_len"], p["max_len"],
                                         softmax_scale=softmax_scale, causal=True, window_size=window_size,
                                         softcap=softcap, prefix_lens=p["prefix"], backend=backend)
            return out[None]  # (1, T, H, D)
        if k.shape[1] == 1 and not e.checked_attention:
            return self._decode_fast(q, k, v, kc, vc, (softmax_scale, window_size, softcap, backend))
        if e.layout == "paged":
            return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=p["lens"], block_table=p["table"],
                                           softmax_scale=softmax_scale, causal=True, window_size=window_size,
                                           softcap=softcap, backend=backend)
        return flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=p["lens"], cache_batch_idx=p["rows"],
                                       softmax_scale=softmax_scale, causal=True, window_size=window_size,
                                       softcap=softcap, backend=backend)


    def _decode_fast(self, q, k, v, kc, vc, key) -> torch.Tensor:
        """What ``flash_attn_with_kvcache`` does for this step's call, without re-checking per layer what the
        engine built itself (the block table, lengths, rows): the new k/v go to the slots computed once per
        step, and the backend runs with the step's :class:`AttnParams` (made at the first layer). Same
        backend, same parameters, same result (tested against ``checked_attention=True``)."""
        p = self.plan
        fast = p.get("fast")
        if fast is None or fast[0] != key:
            scale, window, softcap, _backend = key
            extra = ({"block_table": p["table"], "page_size": kc.shape[1]} if self.engine.layout == "paged"
                     else {"kv_batch_idx": p["rows"]})
            capacity = p["table"].shape[1] * kc.shape[1] if self.engine.layout == "paged" else kc.shape[1]
            params = _params(q, kc, scale, True, _window_pair(window), softcap, 0.0, 0, 1, capacity, None,
                             seqused_k=p["ends"], **extra)
            p["fast"] = fast = (key, params)
        kc[p["at"]] = k[:, 0]
        vc[p["at"]] = v[:, 0]
        out, _ = _run_forward_only(q, kc, vc, fast[1], key[3], False)
        return out


# --------------------------------------------------------------------------- requests
@dataclass
class Completion:
    """One request's result: the new token ids (the EOS that ended it included), their text (without that
    EOS, cut before a stop string) and why it ended."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class _Seq:
    index: int
    prompt_len: int
    max_new: int
    pages: list[int] = field(default_factory=list)
    row: int = -1  # contiguous slot
    length: int = 0  # tokens in the cache
    new: list[int] = field(default_factory=list)
    emitted: int = 0  # characters already streamed
    finish: str | None = None
    budget: int = 0  # new tokens before "length" (max_new less the room kept for a signal run's tail)
    forced: list[int] = field(default_factory=list)  # the rest of a signal run, appended one per step


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or nucleus sampling over the top-p mass."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the first token always stays
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    pick = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)  # (B, 1)
    return order.gather(-1, pick).squeeze(-1)


def _decoder_parts(lm):
    """(embed, layers, rotary, norm) of a LLaMA-family decoder (``LlamaModel`` and alike)."""
    base = getattr(lm, "base_model", None)
    if base is not None and hasattr(base, "model") and not hasattr(lm, "layers"):
        lm = base.model  # a peft wrapper
    missing = [a for a in ("embed_tokens", "layers", "rotary_emb", "norm") if not hasattr(lm, a)]
    if missing:
        raise TypeError(f"lm must be a LLaMA-family decoder (embed_tokens, layers, rotary_emb, norm); "
                        f"{type(lm).__name__} lacks {missing}")
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl != "mmfast":
        raise ValueError(f"the serving engine needs the language model on mmfast attention "
                         f"(attn_implementation='mmfast', e.g. mmfast.patch / build_llava(kernels=True)); "
                         f"this one runs {impl!r}")
    return lm.embed_tokens, lm.layers, lm.rotary_emb, lm.norm


# --------------------------------------------------------------------------- engine
class ServingEngine:
    """Batched generation over a LLaMA-family decoder ``lm`` and its ``lm_head``; see the module docstring.

    ``cache``: ``"paged"`` or ``"contiguous"``. ``page_size``: tokens per page (paged). ``num_pages`` /
    ``max_batch``: the pool's size and the most requests decoding at once (default: every request of a
    call fits at once). The attention backend is the one the model was patched with (``auto`` when none)."""

    def __init__(self, lm, lm_head, *, cache: str = "paged", page_size: int = 16, num_pages: int | None = None,
                 max_batch: int | None = None):
        if cache not in CACHE_LAYOUTS:
            raise ValueError(f"cache must be one of {CACHE_LAYOUTS}, got {cache!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if num_pages is not None and num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 or None, got {num_pages}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.embed, self.layers, self.rotary, self.norm = _decoder_parts(lm)
        self.lm_head = lm_head
        cfg = lm.config
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.layout, self.page_size = cache, page_size
        self.num_pages, self.max_batch = num_pages, max_batch
        self.pool: PagePool | None = None
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.stats: dict = {}
        # True: decode layers go through flash_attn_with_kvcache with its argument checks (tests compare)
        self.checked_attention = False

    # ---- storage
    def _allocate(self, seqs: list[_Seq], dtype, device) -> None:
        n_layers = len(self.layers)
        longest = max(s.prompt_len + s.max_new for s in seqs)
        if self.layout == "paged":
            need = [-(-(s.prompt_len + s.max_new) // self.page_size) for s in seqs]
            num_pages = self.num_pages or sum(need)
            if max(need) > num_pages:
                raise ValueError(f"a request needs {max(need)} pages of {self.page_size} tokens but num_pages="
                                 f"{num_pages}; raise num_pages or lower max_new_tokens")
            self.pool = PagePool(num_pages, self.page_size)
            shape = (num_pages, self.page_size, self.n_kv, self.head_dim)
            self._max_pages = max(need)
        else:
            slots = min(self.max_batch or len(seqs), len(seqs))
            self._free_rows = list(range(slots - 1, -1, -1))
            shape = (slots, longest, self.n_kv, self.head_dim)
            self.pool = None
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    def _can_admit(self, s: _Seq, running: int) -> bool:
        if self.max_batch is not None and running >= self.max_batch:
            return False
        if self.layout == "paged":
            return self.pool.num_free >= self.pool.pages_for(s.prompt_len + s.max_new)
        return bool(self._free_rows)

    def _take(self, s: _Seq) -> None:
        if self.layout == "paged":
            s.pages = self.pool.alloc(self.pool.pages_for(s.prompt_len + s.max_new))
        else:
            s.row = self._free_rows.pop()

    def _release(self, s: _Seq) -> None:
        if self.layout == "paged":
            self.pool.free(s.pages)
            s.pages = []
        else:
            self._free_rows.append(s.row)
            s.row = -1

    # ---- forwards
    def _run_layers(self, hidden, positions, plan) -> torch.Tensor:
        cache = _StepCache(self, plan)
        pos_emb = self.rotary(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=pos_emb,
                           mmfast_kv_cache=cache)
            if isinstance(hidden, tuple):  # transformers < 4.56 returned tuples
                hidden = hidden[0]
        return hidden

    def _prefill_logits(self, seqs: list[_Seq], embeds: list[torch.Tensor], prefix: list[int] | None):
        dev = embeds[0].device
        lens = [s.prompt_len for s in seqs]
        cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)  # (N + 1,)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])[None]  # (1, T)
        plan = {"kind": "prefill", "cu": cu, "max_len": max(lens),
                "prefix": None if prefix is None else torch.tensor(prefix, dtype=torch.int32, device=dev)}
        if self.layout == "paged":
            page, slot = [], []
            for s in seqs:
                t = torch.arange(s.prompt_len, device=dev)
                page.append(torch.tensor(s.pages, device=dev)[t // self.page_size])
                slot.append(t % self.page_size)
            plan["page"], plan["slot"] = torch.cat(page), torch.cat(slot)
        else:
            plan["row"] = torch.cat([torch.full((n,), s.row, device=dev) for s, n in zip(seqs, lens)])
            plan["pos"] = positions[0]
        hidden = self._run_layers(torch.cat(embeds)[None], positions, plan)  # (1, T, D)
        last = hidden[0, cu[1:].long() - 1]  # (N, D): each request's last prompt token
        for s in seqs:
            s.length = s.prompt_len
        return self.lm_head(self.norm(last))  # (N, V)

    def _decode_logits(self, seqs: list[_Seq], tokens: torch.Tensor) -> torch.Tensor:
        dev = tokens.device
        lens = torch.tensor([s.length for s in seqs], dtype=torch.int32, device=dev)  # (B,)
        plan = {"kind": "decode", "lens": lens, "ends": lens + 1}
        if self.layout == "paged":
            width = self._max_pages
            plan["table"] = torch.tensor([s.pages + [0] * (width - len(s.pages)) for s in seqs], dtype=torch.int32,
                                         device=dev)  # (B, max_pages)
            # the slot of each row's new token, shared by every layer
            plan["at"] = (torch.tensor([s.pages[s.length // self.page_size] for s in seqs], device=dev),
                          torch.tensor([s.length % self.page_size for s in seqs], device=dev))
        else:
            plan["rows"] = torch.tensor([s.row for s in seqs], dtype=torch.int32, device=dev)
            plan["at"] = (plan["rows"].long(), lens.long())
        hidden = self.embed(tokens[:, None])  # (B, 1, D)
        hidden = self._run_layers(hidden, lens.long()[:, None], plan)
        for s in seqs:
            s.length += 1
        return self.lm_head(self.norm(hidden[:, 0]))  # (B, V)

    # ---- the loop
    @torch.inference_mode()
    def generate(self, prompt_embeds: list[torch.Tensor], *, max_new_tokens: int | list[int] = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 eos_token_id: int | None = None, stop: str | list[str] | None = None, tokenizer=None,
                 banned_token_ids: list[int] | None = None, prefix_lens: list[int] | None = None,
                 on_token=None, runs: dict[int, list[int]] | None = None) -> list[Completion]:
        """Continue every prompt; see the module docstring. ``max_new_tokens`` may differ per request;
        ``eos_token_id=None`` generates until ``max_new_tokens`` or a stop string. ``stop``, streaming text
        and :attr:`Completion.text` need ``tokenizer``. ``prefix_lens``: per request, the length of its
        bidirectional prefix (prefix-LM prefill), or None. ``runs``: fixed-length signal runs (NExT-GPT's
        ``[IMG0]..[IMG3]``): when a request takes a key token, the listed tokens follow it, one per step,
        whatever the logits say, and a run is finished even past ``max_new_tokens``."""
        n = len(prompt_embeds)
        if n == 0:
            return []
        if isinstance(max_new_tokens, int):
            max_new_tokens = [max_new_tokens] * n
        if len(max_new_tokens) != n or any(not isinstance(m, int) or m < 1 for m in max_new_tokens):
            raise ValueError(f"max_new_tokens must be an int >= 1 or one per request, got {max_new_tokens}")
        for i, e in enumerate(prompt_embeds):
            if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] < 1:
                raise ValueError(f"prompt_embeds[{i}] must be a (length >= 1, hidden) tensor, got "
                                 f"{tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stops = [s for s in stops if s]
        if (stops or on_token is not None) and tokenizer is None:
            raise ValueError("stop strings and on_token (streaming text) need tokenizer=")
        if prefix_lens is not None and len(prefix_lens) != n:
            raise ValueError(f"prefix_lens must hold one length per request ({n}), got {len(prefix_lens)}")
        hold = max((len(s) for s in stops), default=1) - 1  # streamed text held back: a stop may begin there
        dev = prompt_embeds[0].device
        gen = None
        if do_sample:
            gen = torch.Generator(device=dev)
            gen.manual_seed(0 if seed is None else seed)
        banned = None if not banned_token_ids else torch.tensor(banned_token_ids, device=dev)

        runs = {int(k): [int(t) for t in v] for k, v in (runs or {}).items()}
        tail = max((len(v) for v in runs.values()), default=0)  # cache room for a run begun on the last token
        seqs = [_Seq(i, int(e.shape[0]), m + tail, budget=m)
                for i, (e, m) in enumerate(zip(prompt_embeds, max_new_tokens))]
        self._allocate(seqs, prompt_embeds[0].dtype, dev)
        waiting, running = list(seqs), []
        steps = admissions = 0
        max_running = 0

        def accept(batch: list[_Seq], logits: torch.Tensor) -> None:
            if banned is not None:
                logits[:, banned] = float("-inf")
            nxt = _sample(logits, do_sample, temperature, top_p, gen).tolist()
            for s, t in zip(batch, nxt):
                if s.forced:
                    t = s.forced.pop(0)
                elif t in runs:
                    s.forced = list(runs[t])
                s.new.append(t)
                text = None
                if t == eos_token_id:
                    s.finish = "eos"
                elif stops or on_token is not None:
                    text = tokenizer.decode(s.new, skip_special_tokens=False)
                    cut = min((text.find(x) for x in stops if x in text), default=-1)
                    if cut >= 0:
                        s.finish, text = "stop", text[:cut]
                if s.finish is None and not s.forced and len(s.new) >= s.budget:
                    s.finish = "length"
                if on_token is not None:
                    if text is None:
                        text = tokenizer.decode(s.new[:-1] if s.finish == "eos" else s.new, skip_special_tokens=False)
                    upto = len(text) if s.finish else max(s.emitted, len(text) - hold)
                    on_token(s.index, t, text[s.emitted:upto])
                    s.emitted = upto

        while waiting or running:
            admit = []
            while waiting and self._can_admit(waiting[0], len(running) + len(admit)):
                s = waiting.pop(0)
                self._take(s)
                admit.append(s)
            if not admit and not running:
                raise RuntimeError("no request can be admitted and none is running (cache too small)")
            if admit:
                admissions += 1
                pre = None if prefix_lens is None else [int(prefix_lens[s.index]) for s in admit]
                logits = self._prefill_logits(admit, [prompt_embeds[s.index] for s in admit], pre)
                accept(admit, logits)
                running += admit
            elif running:
                tokens = torch.tensor([s.new[-1] for s in running], device=dev)
                logits = self._decode_logits(running, tokens)
                accept(running, logits)
                steps += 1
            max_running = max(max_running, len(running))
            for s in [s for s in running if s.finish]:
                self._release(s)
            running = [s for s in running if not s.finish]
        self.stats = {"decode_steps": steps, "prefills": admissions, "max_running": max_running,
                      "peak_pages": self.pool.peak_used if self.pool else None,
                      "num_pages": self.pool.num_pages if self.pool else None,
                      "free_pages": self.pool.num_free if self.pool else None}
        out = []
        for s in seqs:
            ids = s.new[:-1] if s.finish == "eos" else s.new
            text = ""
            if tokenizer is not None:
                text = tokenizer.decode(ids, skip_special_tokens=False)
                cuts = [text.find(x) for x in stops if x in text]
                if cuts:
                    text = text[: min(cuts)]
            out.append(Completion(list(s.new), text, s.finish))
        return out


__all__ = ["CACHE_LAYOUTS", "Completion", "PagePool", "ServingEngine"]
