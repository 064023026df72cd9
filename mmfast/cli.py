"""`mmfast` command line: a thin router to the module that owns each command.

Each entry maps a command path to ``module:function``; the function takes the remaining argv
and returns an exit code. Modules load only when their command runs.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("info",): ("mmfast.ops._info:info_main", "backends per op, and why the others were refused"),
    ("bench", "contrastive"): ("mmfast.bench.contrastive:main", "benchmark the fused CLIP/SigLIP loss"),
    ("bench", "attention"): ("mmfast.bench.attention:main", "benchmark flash attention"),
    ("bench", "projection"): ("mmfast.bench.projection:main", "benchmark the fused projection ops"),
    ("bench", "norm"): ("mmfast.bench.norm:main", "benchmark the fused norms"),
    ("bench", "host"): ("mmfast.bench.host:main", "host time of each op's fwd+bwd vs the native op (CPU)"),
    ("data", "synth"): ("mmfast.data.synthetic:main", "generate the synthetic multimodal world"),
    ("train", "clip"): ("mmfast.training.launch:clip_main", "train CLIP with DeepSpeed"),
    ("train", "llava"): ("mmfast.training.launch:llava_main", "train LLaVA with DeepSpeed"),
    ("train", "nextgpt"): ("mmfast.training.launch:nextgpt_main", "train NExT-GPT with DeepSpeed"),
    ("train", "decoder"): ("mmfast.training.launch:decoder_main", "train NExT-GPT's tiny image or audio decoder"),
    ("eval", "zeroshot"): ("mmfast.eval.zeroshot:main", "zero-shot classification"),
    ("eval", "t2i"): ("mmfast.eval.t2i:main", "text-to-image top-1 of a decoder on held-out captions"),
    ("eval", "t2a"): ("mmfast.eval.t2a:main", "text-to-audio top-1 of a decoder on held-out clips' captions"),
    ("eval", "t2v"): ("mmfast.eval.t2v:main", "text-to-video class and direction of a decoder on held-out captions"),
    ("eval", "linear-probe"): ("mmfast.eval.zeroshot:linear_probe_main", "linear probe on frozen features"),
    ("eval", "pope", "build"): ("mmfast.eval.pope:build_main", "build POPE question files"),
    ("eval", "pope", "score"): ("mmfast.eval.pope:score_main", "score POPE answers"),
    ("eval", "pope"): ("mmfast.eval.pope_poll:main", "poll a model on POPE questions"),
    ("eval", "chair"): ("mmfast.eval.chair:main", "CHAIR_i / CHAIR_s of captions"),
    ("chat",): ("mmfast.models.chat:main", "chat with a LLaVA or NExT-GPT model"),
    ("demo",): ("mmfast.demo:main", "the main job on the embedded synthetic world"),
}


def _usage(prefix: tuple[str, ...] = ()) -> str:
    rows = [f"  mmfast {' '.join(k):<22} {help_}" for k, (_, help_) in COMMANDS.items() if k[:len(prefix)] == prefix]
    head = " ".join(("mmfast", *prefix))
    return f"usage: {head} COMMAND [ARGS]\n\ncommands:\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    # Longest matching command path wins ("eval pope build" before "eval pope").
    for n in range(min(3, len(argv)), 0, -1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            mod, _, fn = COMMANDS[key][0].partition(":")
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name and mod.startswith(e.name):
                    print(f"mmfast {' '.join(key)}: not available in this build ({e.name} missing)", file=sys.stderr)
                    return 2
                raise
            return int(getattr(module, fn)(argv[n:]) or 0)
    # A command group ("mmfast train", "mmfast eval pope --help"): list what it holds.
    for n in range(min(3, len(argv)), 0, -1):
        prefix = tuple(argv[:n])
        if any(k[:n] == prefix for k in COMMANDS):
            rest = argv[n:]
            if not rest or rest[0] in ("-h", "--help", "help"):
                print(_usage(prefix))
                return 0
            print(f"mmfast: unknown command {' '.join(argv[:n + 1])!r}\n\n{_usage(prefix)}", file=sys.stderr)
            return 2
    print(f"mmfast: unknown command {' '.join(argv[:3])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
