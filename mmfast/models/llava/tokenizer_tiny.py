"""The tiny LLaVA preset's tokenizer: byte-level BPE trained offline on the synthetic world's text.

Trained with ``tokenizers`` on every text file of a small synthetic world (captions, LLaVA
conversations) plus the conversation templates' fixed strings, and saved as a transformers tokenizer
directory (``tokenizer.json`` + ``tokenizer_config.json``) with LLaMA's special tokens ``<s>``, ``</s>``,
``<unk>``, a ``<pad>`` and LLaVA's ``<image>``. Byte-level, so any text round-trips; a BOS is prepended
like LLaMA's tokenizer does. The committed copy lives in ``mmfast/configs/llava/tokenizer-tiny``:

    python -m mmfast.models.llava.tokenizer_tiny --out mmfast/configs/llava/tokenizer-tiny
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "configs" / "llava" / "tokenizer-tiny"
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
IMAGE_TOKEN = "<image>"
VOCAB_SIZE = 1024


def world_texts(n_images: int = 400, seed: int = 0) -> list[str]:
    """Every caption and conversation turn of a small synthetic world, and the templates' strings."""
    from mmfast.data.synthetic import make_world
    from mmfast.eval.pope import DEFAULT_TEMPLATE
    from mmfast.eval.pope_poll import LLAVA_SUFFIX
    from mmfast.models.llava.templates import TEMPLATES, format_conversation

    texts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        make_world(tmp, n_images, 32, seed, media=False)
        root = Path(tmp)
        for split in ("train", "val"):
            for name, template in (("instruct", "vicuna_v1"), ("pretrain", "plain")):
                for rec in json.loads((root / f"llava_{name}_{split}.json").read_text()):
                    texts.append(format_conversation(rec["conversations"], template))
                    if name == "instruct":
                        texts.append(format_conversation(rec["conversations"], "v0"))
            texts += (root / f"captions_{split}.csv").read_text().splitlines()
    for t in TEMPLATES.values():
        texts.append(t.system)
    from mmfast.data.synthetic import CLASSES

    texts += [DEFAULT_TEMPLATE.format(c) + LLAVA_SUFFIX for c in CLASSES]
    return texts


def train_tiny_tokenizer(out_dir: str | Path, texts: list[str] | None = None, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the byte-level BPE on ``texts`` (default :func:`world_texts`) and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = world_texts() if texts is None else texts
    specials = [SPECIAL_TOKENS["unk_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"],
                SPECIAL_TOKENS["pad_token"], IMAGE_TOKEN]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # trim_offsets=False: offsets cover the leading space, which the label masking relies on.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, padding_side="right",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN}, **SPECIAL_TOKENS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def load_tiny_tokenizer(path: str | Path | None = None):
    """The committed tiny tokenizer (or one saved by :func:`train_tiny_tokenizer`)."""
    from transformers import AutoTokenizer

    d = Path(path) if path is not None else TINY_TOKENIZER_DIR
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tiny tokenizer not found in {d} (missing tokenizer.json); build it with "
                                "python -m mmfast.models.llava.tokenizer_tiny --out DIR")
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(TINY_TOKENIZER_DIR))
    p.add_argument("--images", type=int, default=400, help="synthetic world size for the training text")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    a = p.parse_args(argv)
    out = train_tiny_tokenizer(a.out, world_texts(a.images), a.vocab_size)
    print(f"tiny tokenizer written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
