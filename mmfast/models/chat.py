"""``mmfast chat``: talk to a saved LLaVA (ours or any llava-hf checkpoint), one shot or interactively.

    mmfast chat --model runs/demo/llava_stage2/final --image world/images/val_000001.png --prompt "What is it?"
    mmfast chat --model DIR --image IMG          # interactive: one question per line, empty line or EOF ends

Multi-turn: earlier turns stay in the prompt (the model's template), the image goes with the first.
A NExT-GPT directory (``"mmfast_model": "nextgpt"``) is handed to ``mmfast.models.nextgpt.chat_main``.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmfast chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--image", default=None, help="image file (omit for text only)")
    p.add_argument("--prompt", default=None, help="one question; without it, read questions from stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="auto", choices=("auto", "paged", "mmfast", "dynamic"),
                   help="KV cache: the batched paged engine (auto when the model runs mmfast kernels; streams "
                        "the answer as it is generated), mmfast's contiguous one, or transformers' DynamicCache")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    return p


def reply(llava, conversations: list[dict], image, args, *, stream=None) -> str:
    """The answer to the last turn; ``stream(text_delta)`` is called as it is generated (paged engine only)."""
    from mmfast.models.llava.generate import cache_kind
    from mmfast.models.llava.templates import format_conversation

    prompt = format_conversation(conversations, llava.template)
    cache = getattr(args, "cache", "auto")
    kw = {}
    if stream is not None and cache_kind(llava, cache) == "paged":
        kw["stream"] = lambda row, token, delta: stream(delta)
    return llava.generate([image], [prompt], max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                          temperature=max(args.temperature, 1e-5), top_p=args.top_p, seed=args.seed,
                          cache=cache, **kw)[0]


def _printer(shown: list[str]):
    def show(delta: str) -> None:
        shown.append(delta)
        print(delta, end="", flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # NExT-GPT's own options (--audio, --out-dir, ...) pass through
    from mmfast.models.kind import model_kind

    try:
        kind = model_kind(args.model)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"mmfast chat: {e}", file=sys.stderr)
        return 2
    if kind == "nextgpt":
        from mmfast.models.nextgpt import model as nextgpt

        return int(nextgpt.chat_main(argv) or 0)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if kind not in ("llava", "llava-hf"):
        print(f"mmfast chat: {args.model} holds a {kind!r} model; chat knows llava and nextgpt", file=sys.stderr)
        return 2
    from mmfast.models.llava.model import load_pretrained
    from mmfast.models.nextgpt.generate import user_turns
    from mmfast.utils.io import open_image

    try:
        llava = load_pretrained(args.model, device=args.device, dtype=args.dtype)
        image = open_image(args.image) if args.image else None
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"mmfast chat: {e}", file=sys.stderr)
        return 2
    conv: list[dict] = []
    interactive = args.prompt is None
    for q in user_turns(args.prompt):
        value = f"<image>\n{q}" if image is not None and not conv else q
        conv.append({"from": "human", "value": value})
        if interactive:
            print("ASSISTANT: ", end="", flush=True)
            shown: list[str] = []
            text = reply(llava, conv, image, args, stream=_printer(shown))
            # The stream shows the raw text; the reply is stripped (and printed whole when nothing streamed).
            print("" if shown else text, flush=True)
        else:
            text = reply(llava, conv, image, args)
            print(text, flush=True)
        conv.append({"from": "gpt", "value": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
