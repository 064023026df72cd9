"""The batched serving engine (mmfast.models.serving) on the tiny LLaVA: token for token equal to
transformers' greedy ``generate`` on the same weights, paged == contiguous, early finishers free their
pages for waiting requests, stop strings, streaming, seeded top-p."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from llava_helpers import square_image as _image

from mmfast.models import serving
from mmfast.models.llava import generate as lg
from mmfast.models.llava import model as ml


def _inputs(llava):
    """Four ragged rows, two with an image (the image rows are the long ones)."""
    images = [_image(), None, _image((30, 200, 30), (30, 50)), None]
    prompts = [llava.prompt("What is it?"), llava.prompt("Hello there, how are you today, my friend?", with_image=False),
               llava.prompt("Where is the green square in this picture?"), llava.prompt("Hi", with_image=False)]
    return images, prompts


def _run(llava, images, prompts, **kw):
    kw.setdefault("stop", "")
    kw.setdefault("ignore_eos", True)
    return lg.generate_llava(llava, images, prompts, return_completions=True, **kw)


def _hf_greedy(plain, images, prompts, n):
    """transformers' own generate (left padding, DynamicCache, SDPA) on the unpatched twin."""
    from mmfast.models.llava.generate import _pad, _rows

    rows, pixel = _rows(plain, images, prompts)
    ids, mask = _pad(rows, plain.pad_token_id, True, plain.device)
    with torch.inference_mode():
        out = plain.model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel, max_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=plain.pad_token_id)
    return out[:, ids.shape[1]:].tolist()


def test_greedy_equals_transformers_generate(fast, plain):
    images, prompts = _inputs(fast)
    ours = _run(fast, images, prompts, max_new_tokens=10)
    ref = _hf_greedy(plain, images, prompts, 10)
    assert [c.token_ids for c in ours] == ref
    assert len({tuple(r) for r in ref}) > 1  # the rows differ: a real ragged batch
    assert all(c.finish_reason == "length" for c in ours)
    # The usual entry point takes this path on a patched model (EOS and the separator stop rows there) and
    # returns what the right-padded contiguous path returns.
    texts = fast.generate(images, prompts, max_new_tokens=10)
    assert fast._serving_stats["decode_steps"] >= 1
    assert texts == fast.generate(images, prompts, max_new_tokens=10, cache="mmfast")


def test_paged_equals_contiguous_and_small_pool(fast):
    images, prompts = _inputs(fast)
    paged = _run(fast, images, prompts, max_new_tokens=9, cache="paged", page_size=4)
    contiguous = _run(fast, images, prompts, max_new_tokens=9, cache="contiguous")
    assert [c.token_ids for c in paged] == [c.token_ids for c in contiguous]
    # Two requests at a time (slots / pages): the same tokens, the later ones admitted as others finish.
    two = _run(fast, images, prompts, max_new_tokens=9, cache="contiguous", max_batch=2)
    assert [c.token_ids for c in two] == [c.token_ids for c in paged]
    assert fast._serving_stats["max_running"] == 2 and fast._serving_stats["prefills"] >= 2


def test_early_finishers_free_pages_for_waiting_requests(fast):
    images, prompts = _inputs(fast)
    embeds, _ = lg.llava_prompt_embeds(fast, images, prompts)
    lm, head = fast.model.model.language_model, fast.model.lm_head
    page = 4
    budgets = [2, 12, 12, 12]
    need = [-(-(e.shape[0] + m) // page) for e, m in zip(embeds, budgets)]
    num_pages = need[0] + need[1]  # rows 0 and 1 fit; rows 2 and 3 wait for pages
    assert need[2] > need[0] and need[2] <= num_pages
    engine = serving.ServingEngine(lm, head, cache="paged", page_size=page, num_pages=num_pages)
    events = []

    def on_token(i, tok, delta):
        events.append((i, engine.pool.num_free))

    outs = engine.generate(embeds, max_new_tokens=budgets, tokenizer=fast.tokenizer, on_token=on_token)
    full = serving.ServingEngine(lm, head, cache="paged", page_size=page).generate(embeds, max_new_tokens=budgets)
    assert [o.token_ids for o in outs] == [o.token_ids for o in full]  # waiting changed no token
    assert [len(o.token_ids) for o in outs] == budgets
    first_of_2 = next(k for k, (i, _) in enumerate(events) if i == 2)
    last_of_0 = max(k for k, (i, _) in enumerate(events) if i == 0)
    assert last_of_0 < first_of_2  # row 2 started only once row 0 had finished
    assert engine.stats["prefills"] >= 2 and engine.stats["peak_pages"] <= num_pages
    assert engine.pool.num_free == num_pages  # every page came back


def test_stop_strings_and_streaming(fast):
    images, prompts = _inputs(fast)
    free = _run(fast, images, prompts, max_new_tokens=12)
    tok = fast.tokenizer
    text = tok.decode(free[1].token_ids, skip_special_tokens=False)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip() and len(stop) == 3
    pieces = {}
    outs = _run(fast, images, prompts, max_new_tokens=12, stop=[stop],
                on_token=lambda i, t, d: pieces.__setitem__(i, pieces.get(i, "") + d))
    assert outs[1].finish_reason == "stop"
    assert outs[1].text == text[: text.index(stop)]
    assert len(outs[1].token_ids) < len(free[1].token_ids)
    assert outs[1].token_ids == free[1].token_ids[: len(outs[1].token_ids)]
    for i, c in enumerate(outs):
        assert pieces[i] == c.text  # the stream adds up to the result and never shows the stop string


def test_top_p_seeded(fast):
    images, prompts = _inputs(fast)
    a = _run(fast, images, prompts, max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)
    b = _run(fast, images, prompts, max_new_tokens=8, do_sample=True, top_p=0.9, seed=3)
    c = _run(fast, images, prompts, max_new_tokens=8, do_sample=True, top_p=0.9, seed=4)
    greedy = _run(fast, images, prompts, max_new_tokens=8)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]
    # A nucleus of one token is greedy decoding.
    tiny_p = _run(fast, images, prompts, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3)
    assert [x.token_ids for x in tiny_p] == [x.token_ids for x in greedy]


def test_errors_name_the_argument(fast, plain):
    lm, head = fast.model.model.language_model, fast.model.lm_head
    with pytest.raises(ValueError, match="cache must be one of"):
        serving.ServingEngine(lm, head, cache="ring")
    with pytest.raises(ValueError, match="mmfast attention"):
        serving.ServingEngine(plain.model.model.language_model, plain.model.lm_head)
    engine = serving.ServingEngine(lm, head)
    x = torch.zeros(3, lm.config.hidden_size)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([x], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([x], top_p=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate([x], stop="</s>")
    with pytest.raises(ValueError, match=r"prompt_embeds\[0\]"):
        engine.generate([torch.zeros(4)])
    with pytest.raises(ValueError, match="num_pages"):
        serving.ServingEngine(lm, head, page_size=2, num_pages=1).generate([x], max_new_tokens=4)
    with pytest.raises(ValueError, match="stream="):
        plain.generate([None], [plain.prompt("Hi", with_image=False)], stream=lambda *a: None)


def test_chat_reply_streams(fast):
    import argparse

    from mmfast.models.chat import reply

    args = argparse.Namespace(max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, cache="auto")
    conv = [{"from": "human", "value": "Hello there, how are you?"}]
    pieces = []
    text = reply(fast, conv, None, args, stream=pieces.append)
    assert pieces and "".join(pieces).strip() == text
    assert text == reply(fast, conv, None, argparse.Namespace(**{**vars(args), "cache": "mmfast"}))


@pytest.mark.parametrize("cache", ["paged", "contiguous"])
def test_decode_fast_path_and_cpp_backend_equal_transformers(plain, cache):
    """The decode step's fast path (the step's slots and parameters made once, not re-checked per layer)
    gives the logits of the checked flash_attn_with_kvcache path; on CPU ``auto`` runs the decode
    attention on the ``cpp`` backend (where the extension is built), token for token transformers' greedy."""
    from mmfast.ops._dispatch import fake_env

    auto = ml.build_llava("tiny", kernels=True, seed=0)
    images, prompts = _inputs(auto)
    embeds, _ = lg.llava_prompt_embeds(auto, images, prompts)
    lm, head = auto.model.model.language_model, auto.model.lm_head
    logits = {}
    with fake_env(interpret=False):  # as on a machine without TRITON_INTERPRET (the tests set it)
        for checked in (False, True):
            engine = serving.ServingEngine(lm, head, cache=cache, page_size=4)
            engine.checked_attention = checked
            seen = []
            real = engine._decode_logits
            engine._decode_logits = lambda seqs, tokens, _s=seen, _r=real: _s.append(_r(seqs, tokens)) or _s[-1]
            outs = engine.generate(embeds, max_new_tokens=8)
            logits[checked] = torch.stack(seen)
        assert [o.token_ids for o in outs] == _hf_greedy(plain, images, prompts, 8)
    assert torch.equal(logits[False], logits[True])
