"""NExT-GPT data: dialogue records, their validation, tokenization with labels, media loading, collation,
and builders for the three training stages from a synthetic world's text<->media pairs.

A record (MosIT-style, also used for stages 1 and 2)::

    {"conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "a red cat. Here is its sound: [AUD0]...[AUD7]"}],
     "media": {"image": ["images/train_000001.png"]},      # one path per <image>/<audio>/<video>, in order
     "targets": {"audio": ["the sound of a cat: ..."]}}     # one caption per signal-token run, in order

Prompt format (Vicuna v0 style, as NExT-GPT): ``SYSTEM`` then per turn ``### Human: {h}\\n### Assistant:``
(masked) and `` {a}</s>`` (supervised). A placeholder expands to the input projection's token count;
signal tokens are single added tokens that swallow the space before them.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

IGNORE_INDEX = -100
SYSTEM = "You are a helpful assistant that understands and generates text, images, videos and audio."
PLACEHOLDERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
N_SIGNAL = {"image": 4, "video": 24, "audio": 8}
SIGNAL_PREFIX = {"image": "IMG", "video": "VID", "audio": "AUD"}
SIGNAL_TOKENS = {m: [f"[{SIGNAL_PREFIX[m]}{i}]" for i in range(n)] for m, n in N_SIGNAL.items()}
MODALITIES = ("image", "video", "audio")

X2T_PROMPTS = {"image": ["Describe this image.", "What is in this picture?", "Give a short caption."],
               "video": ["Describe this video.", "What happens in this clip?"],
               "audio": ["Describe this sound.", "What do you hear?"]}
T2X_PROMPTS = {"image": ["Generate an image of {c}.", "Show me a picture: {c}.", "Draw {c}."],
               "video": ["Generate a video of {c}.", "Make a clip: {c}."],
               "audio": ["Generate the sound of {c}.", "Play audio: {c}."]}
T2X_REPLIES = {"image": "Here is the image.", "video": "Here is the video.", "audio": "Here is the audio."}


def signal_run(modality: str) -> str:
    return "".join(SIGNAL_TOKENS[modality])


def turn_prefix(human: str) -> str:
    return f"### Human: {human}\n### Assistant:"


# --------------------------------------------------------------------------- validation
def validate_record(rec, where: str = "record") -> dict:
    """Raise ValueError naming ``where`` and the field when ``rec`` is not a well-formed dialogue."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object with 'conversations', got {type(rec).__name__}")  # noqa: TRY004
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of turns")
    if len(conv) % 2:
        raise ValueError(f"{where}: 'conversations' has {len(conv)} turns; expected human/gpt pairs")
    for i, turn in enumerate(conv):
        want = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: conversations[{i}] must be {{'from': '{want}', 'value': str}}, got {turn!r}")
    media, targets, target_media = rec.get("media", {}), rec.get("targets", {}), rec.get("target_media", {})
    for name, d in (("media", media), ("targets", targets), ("target_media", target_media)):
        if not isinstance(d, dict) or any(k not in MODALITIES for k in d):
            raise ValueError(f"{where}: {name!r} must map modalities {MODALITIES} to lists, got {d!r}")
        for k, v in d.items():
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{where}: {name}[{k!r}] must be a list of strings")
    human = "".join(t["value"] for t in conv[0::2])
    gpt = "".join(t["value"] for t in conv[1::2])
    for m in MODALITIES:
        n = human.count(PLACEHOLDERS[m])
        if gpt.count(PLACEHOLDERS[m]):
            raise ValueError(f"{where}: a gpt turn holds {PLACEHOLDERS[m]}; inputs go in human turns")
        if n != len(media.get(m, [])):
            raise ValueError(f"{where}: {n} {PLACEHOLDERS[m]} placeholders but {len(media.get(m, []))} media['{m}'] paths")
        toks = SIGNAL_TOKENS[m]
        runs = gpt.count(signal_run(m))
        if any(gpt.count(t) != runs for t in toks) or human.count(toks[0]):
            raise ValueError(f"{where}: signal tokens {toks[0]}..{toks[-1]} must appear as complete runs in gpt turns")
        if runs != len(targets.get(m, [])):
            raise ValueError(f"{where}: {runs} {m} signal-token runs but {len(targets.get(m, []))} targets['{m}'] captions")
        if m in target_media and len(target_media[m]) != runs:
            raise ValueError(f"{where}: {runs} {m} signal-token runs but {len(target_media[m])} target_media['{m}'] paths")
    return rec


# --------------------------------------------------------------------------- tokenization
def tokenize_dialogue(rec: dict, tokenizer, n_input_tokens: int, max_length: int = 512,
                      generation: bool = False) -> dict:
    """``input_ids`` and ``labels`` (1-D) for one record; ``generation`` ends on the open assistant turn
    (the last gpt turn, if any, is dropped)."""
    conv = rec["conversations"]
    placeholder_ids = {tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in MODALITIES}

    def enc(text):
        out = []
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            out += [t] * n_input_tokens if t in placeholder_ids else [t]
        return out

    ids = [tokenizer.bos_token_id] + enc(SYSTEM + "\n")
    labels = [IGNORE_INDEX] * len(ids)
    pairs = list(zip(conv[0::2], conv[1::2]))
    if generation:
        pairs = pairs[:-1] if len(conv) % 2 == 0 and conv and conv[-1]["from"] == "gpt" else pairs
    for h, a in pairs:
        p = enc(turn_prefix(h["value"]))
        r = enc(" " + a["value"]) + [tokenizer.eos_token_id]
        ids += p + r
        labels += [IGNORE_INDEX] * len(p) + r
    if generation:
        last = conv[-1] if conv[-1]["from"] == "human" else conv[-2]
        p = enc(turn_prefix(last["value"]))
        ids += p
        labels += [IGNORE_INDEX] * len(p)
    if len(ids) > max_length:
        raise ValueError(f"dialogue of {len(ids)} tokens exceeds max_length {max_length}; shorten it or raise "
                         "max_length (truncating would cut placeholders or signal runs)")
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


# --------------------------------------------------------------------------- media
class MediaLoader:
    """Paths -> tensors in each encoder's input layout (root-relative paths stay inside ``root``)."""

    def __init__(self, root, image_processor, video_frames: int = 4, audio_samples: int = 16000):
        self.root = Path(root) if root is not None else None
        self.ip, self.frames, self.samples = image_processor, video_frames, audio_samples

    def _path(self, rel: str) -> Path:
        from mmfast.utils.io import safe_join

        return safe_join(self.root, rel, what="media path") if self.root is not None else Path(rel)

    def image(self, rel) -> torch.Tensor:
        from mmfast.utils.io import open_image

        return self.ip(open_image(self._path(rel)))  # (3, S, S)

    def video(self, rel) -> torch.Tensor:
        from mmfast.data.media import read_video

        frames = read_video(self._path(rel))
        idx = torch.linspace(0, len(frames) - 1, self.frames).round().long().tolist()
        return torch.stack([self.ip(frames[i]) for i in idx])  # (F, 3, S, S)

    def audio(self, rel) -> torch.Tensor:
        from mmfast.data.media import read_wav

        x = torch.from_numpy(read_wav(self._path(rel))[0].copy())
        x = x[: self.samples]
        return torch.nn.functional.pad(x, (0, self.samples - x.shape[0]))  # (T,)

    def load(self, modality: str, rel: str) -> torch.Tensor:
        return getattr(self, modality)(rel)


class DialogueDataset(torch.utils.data.Dataset):
    """Tokenized records with their media; ``target_sizes`` ({modality: pixels}, audio: any value) also loads
    ``target_media`` for the diffusion loss: images (3, S, S) and videos (F, 3, S, S, ``video_frames`` frames)
    in [-1, 1], audio (T,) waveforms cut or padded to ``audio_samples``."""

    def __init__(self, records, tokenizer, media: MediaLoader, n_input_tokens: int, max_length: int = 512,
                 target_sizes: dict | None = None):
        self.records = [validate_record(r, f"record {i}") for i, r in enumerate(records)]
        self.tok, self.media, self.n_in, self.max_length = tokenizer, media, n_input_tokens, max_length
        self.target_sizes = dict(target_sizes or {})
        bad = [m for m in self.target_sizes if m not in MODALITIES]
        if bad:
            raise ValueError(f"target_sizes: unknown modalities {bad}; expected some of {MODALITIES}")

    @staticmethod
    def _pixels(im, size: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, S, S)

    def _target(self, modality: str, rel: str) -> torch.Tensor:
        size = self.target_sizes[modality]
        if modality == "image":
            from mmfast.utils.io import open_image

            return self._pixels(open_image(self.media._path(rel)), size)
        if modality == "video":
            from mmfast.data.media import read_video

            frames = read_video(self.media._path(rel))
            idx = torch.linspace(0, len(frames) - 1, self.media.frames).round().long().tolist()
            return torch.stack([self._pixels(frames[i], size) for i in idx])  # (F, 3, S, S)
        return self.media.audio(rel)  # (T,)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        item = tokenize_dialogue(rec, self.tok, self.n_in, self.max_length)
        item["media"] = {m: [self.media.load(m, p) for p in ps] for m, ps in rec.get("media", {}).items()}
        item["captions"] = rec.get("targets", {})
        item["target_media"] = {m: [self._target(m, p) for p in ps]
                                for m, ps in rec.get("target_media", {}).items() if m in self.target_sizes}
        return item


def collate(samples: list[dict], pad_id: int) -> dict:
    """Right-padded ids / labels / mask; media and target media stacked per modality in sample order;
    captions flattened."""
    length = max(len(s["input_ids"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"], s["labels"], 1
    media, captions = {}, {}
    for m in MODALITIES:
        xs = [x for s in samples for x in s.get("media", {}).get(m, [])]
        if xs:
            media[m] = torch.stack(xs)
        cs = [c for s in samples for c in s.get("captions", {}).get(m, [])]
        if cs:
            captions[m] = cs
    targets = {}
    for m in MODALITIES:
        xs = [x for s in samples for x in s.get("target_media", {}).get(m, [])]
        if xs:
            targets[m] = torch.stack(xs)  # (R_m, ...), in signal-run order
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "media": media, "captions": captions,
            "target_media": targets}


# --------------------------------------------------------------------------- stage data from a world
def t2x_pairs(world, modality: str, split: str = "train") -> list[dict]:
    """``[{"caption", "path"}]`` (path relative to ``world``) from ``t2x_{modality}.json``; for images a world
    made without media falls back to ``captions_{split}.csv`` (first caption per image)."""
    root = Path(world)
    f = root / f"t2x_{modality}.json"
    if f.is_file():
        from mmfast.data.media import load_t2x_json

        recs = load_t2x_json(f, root, modality)
        return [{"caption": r["caption"], "path": r[f"{modality}_name"]} for r in recs if r.get("split", split) == split]
    csv_path = root / f"captions_{split}.csv"
    if modality == "image" and csv_path.is_file():
        seen, out = set(), []
        with open(csv_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row["filepath"] not in seen:
                    seen.add(row["filepath"])
                    out.append({"caption": row["caption"], "path": row["filepath"]})
        return out
    raise FileNotFoundError(f"{f} not found (make the world with media, e.g. mmfast data synth without --no-media)")


def image_descriptions(world, split: str = "train") -> dict[str, str]:
    """Image path (relative to ``world``) -> the world's detailed description of it (the reply of its LLaVA
    ``detail`` record); empty when the world has no ``llava_instruct_{split}.json``."""
    f = Path(world) / f"llava_instruct_{split}.json"
    if not f.is_file():
        return {}
    from mmfast.data.llava import load_llava_json

    return {r["image"]: r["conversations"][1]["value"] for r in load_llava_json(f, world, check_images=False)
            if r.get("type") == "detail" and len(r["conversations"]) >= 2}


def x2t_record(modality: str, pair: dict, rng: random.Random, reply: str | None = None) -> dict:
    """An X->text captioning record: the pair's caption as the reply, or ``reply`` when given."""
    q = rng.choice(X2T_PROMPTS[modality])
    return {"conversations": [{"from": "human", "value": f"{PLACEHOLDERS[modality]}\n{q}"},
                              {"from": "gpt", "value": pair["caption"] if reply is None else reply}],
            "media": {modality: [pair["path"]]}}


def t2x_record(modality: str, pair: dict, rng: random.Random, reply_text: bool = True) -> dict:
    """A text->X request; the reply is ``Here is the image. [IMG0]..[IMG3]``, or with ``reply_text=False``
    only the signal run (stage 2: the LLM is frozen, so the run must follow the prompt directly for the LM
    loss to teach the signal-token rows to start it)."""
    q = rng.choice(T2X_PROMPTS[modality]).format(c=pair["caption"])
    reply = f"{T2X_REPLIES[modality]} {signal_run(modality)}" if reply_text else signal_run(modality)
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": reply}],
            "targets": {modality: [pair["caption"]]}, "target_media": {modality: [pair["path"]]}}


def stage_records(world, stage: int, modalities=("image",), split: str = "train", seed: int = 0,
                  n_dialogues: int | None = None, negatives: float | dict = 1.0,
                  repeats: dict | None = None, mosit_share: float = 0.25) -> list[dict]:
    """Stage 1: X->text captioning; stage 2: text->X answered by the signal run alone (LM loss on the signal
    tokens and the closing ``</s>``) plus X->text captioning records for a ``negatives`` share of the pairs
    (one share, or ``{modality: share}``: unnamed modalities 1.0);
    stage 3: MosIT-style two-turn dialogues (understand one medium, then produce one: the run alone, as stage 2
    taught) making up ``mosit_share`` of the records, shuffled among stage 2's records (same ``negatives`` and
    ``repeats``), so that the LoRA learns to open a run after an exchange without learning to open one after
    every caption; ``n_dialogues`` overrides the dialogues' count. (With dialogues alone, every one ending in a
    run, the tiny model opened runs after captioning prompts and its captions ended in runs; with
    ``Here is the image.`` before the run, as the stage-2 records do not have it, its captions drifted to "The
    image." and fewer requests opened a run: docs/nextgpt_decoders.md.)

    The negatives matter because only the signal-token rows learn in stage 2: without replies that start
    with ordinary text, the cheapest solution is an ``[IMG0]`` row that fires after every prompt.
    ``repeats`` (stage 2): ``{modality: N}`` gives each pair of that modality N times (each time with its own
    prompt template and negative draw), so a modality with few pairs gets a share of the steps."""
    rng = random.Random(seed)
    pairs = {m: t2x_pairs(world, m, split) for m in modalities}
    if stage == 1:
        return [x2t_record(m, p, rng) for m in modalities for p in pairs[m]]
    if stage == 2:
        shares = {m: (negatives.get(m, 1.0) if isinstance(negatives, dict) else negatives) for m in modalities}
        for m, x in shares.items():
            if not 0.0 <= x <= 1.0:
                raise ValueError(f"negatives must be a share in [0, 1], got {x} for {m}")
        described = image_descriptions(world, split) if "image" in modalities else {}
        recs = []
        for m in modalities:  # a negative follows its pair, so a --max-samples prefix keeps the mix
            for p in pairs[m] * (repeats or {}).get(m, 1):
                recs.append(t2x_record(m, p, rng, reply_text=False))
                if rng.random() < shares[m]:
                    # Half the image negatives end like the LLM's own descriptions: the signal rows must lose to
                    # </s> where the frozen LLM ends its replies, not only where short captions end.
                    desc = described.get(p["path"]) if m == "image" else None
                    recs.append(x2t_record(m, p, rng, reply=desc if desc and rng.random() < 0.5 else None))
        return recs
    if stage == 3:
        if not 0.0 < mosit_share <= 1.0:
            raise ValueError(f"mosit_share must be in (0, 1], got {mosit_share}")
        single = [] if mosit_share == 1.0 else stage_records(world, 2, modalities, split, seed + 1,
                                                              negatives=negatives, repeats=repeats)
        n = n_dialogues or (round(len(single) * mosit_share / (1.0 - mosit_share)) if single
                            else max(len(v) for v in pairs.values()))
        recs = single + mosit_dialogues(pairs, rng, n, reply_text=False)
        rng.shuffle(recs)
        return recs
    raise ValueError(f"stage must be 1, 2 or 3, got {stage}")


def mosit_dialogues(pairs: dict, rng: random.Random, n: int, reply_text: bool = True) -> list[dict]:
    """Two-turn modality-switching dialogues: understand one medium, then produce another (or the same); the
    second reply as :func:`t2x_record` writes it (``reply_text``)."""
    mods = [m for m, v in pairs.items() if v]
    if not mods:
        raise ValueError("no text<->media pairs to build dialogues from")
    out = []
    for _ in range(n):
        src, dst = rng.choice(mods), rng.choice(mods)
        a, b = rng.choice(pairs[src]), rng.choice(pairs[dst])
        first = x2t_record(src, a, rng)
        second = t2x_record(dst, b, rng, reply_text=reply_text)
        out.append({"conversations": first["conversations"] + second["conversations"],
                    "media": first["media"], "targets": second["targets"], "target_media": second["target_media"]})
    return out


__all__ = ["IGNORE_INDEX", "MODALITIES", "N_SIGNAL", "PLACEHOLDERS", "SIGNAL_TOKENS", "SYSTEM", "DialogueDataset",
           "MediaLoader", "collate", "mosit_dialogues", "signal_run", "stage_records", "t2x_pairs",
           "tokenize_dialogue", "validate_record"]
