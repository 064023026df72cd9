"""Batched LLaVA generation, mmfast's serving engine vs transformers' ``generate``: tokens/s, time to first
token, peak memory, every provider side by side in one process on the same weights.

One step = the whole batch: encode the images, prefill the ragged prompts, decode ``--new-tokens`` tokens
per request (EOS ignored, so every provider decodes the same number of tokens). Mode ``generate`` times
that; mode ``ttft`` times the same call with one new token (prefill + first token). Providers:

* ``transformers``: ``LlavaForConditionalGeneration.generate`` (left padding, ``DynamicCache``, SDPA),
  greedy;
* ``transformers-static``: the same with ``cache_implementation="static"`` (transformers compiles the
  decode step on CUDA); GPU only, not run on CPU by default;
* ``mmfast``: the model after ``mmfast.patch`` (every rule), :class:`mmfast.models.serving.ServingEngine`
  with the paged cache (varlen prefill, ``flash_attn_with_kvcache`` with a block table);
* ``mmfast-attn``: the same engine on a model patched with the attention rules only (what the fused
  norm / SwiGLU / rotary rules add on top of the attention);
* ``mmfast-contiguous``: every rule, the contiguous cache.

After timing, each mmfast provider's tokens are compared with transformers' (printed: token-for-token
equal or not). Shapes: ``tiny`` (CPU default): the tiny preset, ``--requests`` 32 text prompts of 16-80
random tokens after one image (16 image tokens), fp32; ``llava7b-trunc`` (GPU default): LLaVA-1.5-7B's
shapes (ViT-L/14-336, 576 image tokens, LLaMA-7B 4096 wide) truncated to ``--layers`` 4 LLM layers,
prompts of 64-256 text tokens after the image, bf16.

    python benchmarks/bench_generate.py --cpu --threads 1 --rounds 2   # tiny, 32 requests, 64 new tokens
    python benchmarks/bench_generate.py --gpu --new-tokens 128      # llava7b-trunc

Rows go to ``benchmarks/results/generate_<device>.csv`` (harness columns); the summary prints tokens/s
(requests · new tokens / median time), TTFT and peak memory, and each provider's speed-up over
transformers.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from mmfast.bench import harness

PROVIDERS = ("transformers", "transformers-static", "mmfast", "mmfast-attn", "mmfast-contiguous")


def build_model(shape: str, layers: int, rules: str, device: str, dtype):
    """(HF LLaVA model, image size, image tokens per image); ``rules``: "none", "attention" or "all"."""
    import mmfast

    if shape == "tiny":
        from mmfast.models import llava as ml

        model = ml.build_llava("tiny", kernels=False, seed=0, device=device).model
    else:
        from mmfast.bench.llava import llava7b_trunc

        model = llava7b_trunc(layers, layers + 1, device)
    model.to(dtype).eval()
    if rules == "all":
        mmfast.patch(model)
    elif rules == "attention":
        mmfast.patch(model, kinds=("attention",))
    v = model.config.vision_config
    return model, v.image_size, (v.image_size // v.patch_size) ** 2


def make_requests(n: int, n_image: int, lo: int, hi: int, vocab: int, image_token: int, seed: int = 0):
    """Token ids per request: ``n_image`` image tokens then lo..hi random text tokens."""
    rng = random.Random(seed)
    text_ids = [t for t in range(3, vocab) if t != image_token]
    return [[1] + [image_token] * n_image + [rng.choice(text_ids) for _ in range(rng.randint(lo, hi))]
            for _ in range(n)]


def _left_padded(rows, pad: int, device):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def _setup(name: str, shared: dict):
    def setup(case: dict, mode: str):
        device, dtype = case["device"], shared["dtype"]
        rules = {"transformers": "none", "transformers-static": "none", "mmfast-attn": "attention"}.get(name, "all")
        model, size, _ = build_model(case["shape"], case["layers"], rules, device, dtype)
        rows = shared["rows"]
        gen = torch.Generator().manual_seed(0)
        pixel = torch.randn(len(rows), 3, size, size, generator=gen).to(device, dtype)
        new = 1 if mode == "ttft" else case["new_tokens"]
        pad = 0
        if name.startswith("transformers"):
            model.generation_config.eos_token_id = None  # every provider decodes `new` tokens per request
            ids, mask = _left_padded(rows, pad, device)
            extra = {"cache_implementation": "static"} if name == "transformers-static" else {}

            def step():
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel, max_new_tokens=new,
                                         do_sample=False, eos_token_id=None, pad_token_id=pad, **extra)
                return out[:, ids.shape[1]:].tolist()
        else:
            from mmfast.models.llava.model import merge_embeddings
            from mmfast.models.serving import ServingEngine

            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # right padded
            engine = ServingEngine(model.model.language_model, model.lm_head,
                                   cache="contiguous" if name == "mmfast-contiguous" else "paged")

            def step():
                with torch.inference_mode():
                    emb = merge_embeddings(model, ids, pixel)  # (B, L, D): the image tower runs here
                    outs = engine.generate([emb[i, : len(r)] for i, r in enumerate(rows)], max_new_tokens=new)
                return [o.token_ids for o in outs]

        if mode == "generate":
            shared["tokens"][name] = step()
        return step

    return setup


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_generate", description=__doc__.split("\n\n")[0])
    harness.add_common_args(p, "generate")
    p.add_argument("--shape", choices=("tiny", "llava7b-trunc"), help="CPU default tiny, GPU llava7b-trunc")
    p.add_argument("--layers", type=int, default=4, help="LLM layers of llava7b-trunc (vision: layers + 1)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, help="new tokens per request (CPU default 64, GPU 128)")
    p.add_argument("--prompt-tokens", default=None, help="text tokens per prompt, lo-hi (tiny 16-80, 7B 64-256)")
    return harness.add_rounds_args(p)


def main(argv: list[str] | None = None) -> int:
    parsed = harness.parse_rounds(_parser(), argv, PROVIDERS, cpu_skip=("transformers-static",))
    if parsed is None:
        return 2
    a, device, names = parsed
    gpu = device == "cuda"
    shape = a.shape or ("llava7b-trunc" if gpu else "tiny")
    new_tokens = a.new_tokens or (128 if gpu else 64)
    lo, hi = (int(x) for x in (a.prompt_tokens or ("64-256" if shape != "tiny" else "16-80")).split("-"))
    dtype = torch.bfloat16 if gpu else torch.float32
    model, _, n_img = build_model(shape, a.layers, "none", "cpu" if shape == "tiny" else "meta", torch.float32)
    vocab, image_token = model.config.text_config.vocab_size, model.config.image_token_id
    del model
    rows = make_requests(a.requests, n_img, lo, hi, vocab, image_token)
    shared = {"rows": rows, "dtype": dtype, "tokens": {}}
    case = {"shape": shape, "layers": a.layers, "requests": a.requests, "new_tokens": new_tokens,
            "prompt_tokens": f"{lo}-{hi}", "device": device, "threads": torch.get_num_threads()}
    out = harness.results_csv(a, "generate", device, Path(__file__).resolve().parent / "results")
    rows_out = harness.run_rounds("generate", names, lambda n: _setup(n, shared), case, x_key="requests",
                                  device=device, modes=("generate", "ttft"), args=a, out=out)
    by = harness.best_of_rounds(rows_out)  # each provider's best round
    base = by.get(("transformers", "generate"))
    ref = shared["tokens"].get("transformers")
    print(f"\n{shape}, {a.requests} requests, prompts {lo}-{hi} text tokens + {n_img} image tokens, {new_tokens} new "
          f"tokens, {device}, {torch.get_num_threads()} threads")
    for n in names:
        g, t = by.get((n, "generate")), by.get((n, "ttft"))
        if g is None or g.error:
            print(f"  {n:<20} {g.error if g else 'not run'}")
            continue
        tps = a.requests * new_tokens / (g.median_ms / 1e3)
        speed = "" if base is None or base.error else f"  {base.median_ms / g.median_ms:.2f}x transformers"
        same = ""
        if ref is not None and n != "transformers" and n in shared["tokens"]:
            same = "  tokens equal to transformers" if shared["tokens"][n] == ref else "  TOKENS DIFFER from transformers"
        ttft = "-" if t is None or t.error else f"{t.median_ms:.1f} ms"
        print(f"  {n:<20} {g.median_ms:9.1f} ms  {tps:9.1f} tokens/s  TTFT {ttft}  peak {g.peak_mem_mib:.0f} MiB"
              f"{speed}{same}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
