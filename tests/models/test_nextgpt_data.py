"""mmfast.models.nextgpt.data: dialogue validation, label masking, media loading and stage builders."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from mmfast.models.nextgpt import data as nd


def _rec(**over):
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat?"},
                             {"from": "gpt", "value": "a cat " + nd.signal_run("audio")}],
           "media": {"image": ["images/a.png"]}, "targets": {"audio": ["the sound of a cat"]}}
    rec.update(over)
    return rec


@pytest.mark.parametrize("bad, match", [
    ("not a dict", "expected an object"),
    ({"conversations": []}, "non-empty list"),
    (_rec(conversations=[{"from": "human", "value": "hi"}]), "human/gpt pairs"),
    (_rec(conversations=[{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]), r"conversations\[0\]"),
    (_rec(conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]), r"conversations\[0\]"),
    (_rec(media={"image": []}), "1 <image> placeholders but 0"),
    (_rec(media={"smell": ["x"]}), "'media' must map"),
    (_rec(targets={}), "1 audio signal-token runs but 0"),
    (_rec(target_media={"audio": ["a.wav", "b.wav"]}), "but 2 target_media"),
    (_rec(conversations=[{"from": "human", "value": "<image>"},
                         {"from": "gpt", "value": "[AUD0][AUD1]"}], targets={}), "complete runs"),
    (_rec(conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<video>"}]),
     "gpt turn holds <video>"),
])
def test_malformed_dialogues_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        nd.validate_record(bad, "record 7")
    with pytest.raises(ValueError, match="record 7"):
        nd.validate_record(bad, "record 7")


def _tok():
    from mmfast.models.nextgpt.model import _build_llm

    _, tok, _ = _build_llm("tiny")
    tok.add_tokens([t for m in nd.MODALITIES for t in nd.SIGNAL_TOKENS[m]] + ["<audio>", "<video>"],
                   special_tokens=True)
    return tok


def test_labels_cover_only_assistant_turns():
    tok = _tok()
    item = nd.tokenize_dialogue(_rec(), tok, n_input_tokens=3)
    ids, labels = item["input_ids"], item["labels"]
    assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == 3
    sup = ids[labels != nd.IGNORE_INDEX].tolist()
    assert sup[-1] == tok.eos_token_id
    assert tok.decode(sup[:-1], skip_special_tokens=False).strip() == "a cat " + nd.signal_run("audio")
    gen = nd.tokenize_dialogue(_rec(), tok, 3, generation=True)
    assert tok.decode(gen["input_ids"][-6:]).endswith("### Assistant:")
    assert (gen["labels"] == nd.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="exceeds max_length"):
        nd.tokenize_dialogue(_rec(), tok, 3, max_length=5)


def test_stage_builders_and_media(tmp_path):
    from mmfast.data.synthetic import make_world
    from mmfast.models.llava.data import ImageProcessor

    make_world(tmp_path, 12, 32, seed=0, media=True, n_videos=3, audio_per_class=2)
    mods = ("image", "audio", "video")
    s1 = nd.stage_records(tmp_path, 1, mods)
    s2 = nd.stage_records(tmp_path, 2, mods)
    s3 = nd.stage_records(tmp_path, 3, mods, n_dialogues=10)
    for recs in (s1, s2, s3):
        for i, r in enumerate(recs):
            nd.validate_record(r, f"record {i}")
    assert all(r["media"] and "targets" not in r for r in s1)
    t2x = [r for r in s2 if r.get("targets")]
    assert all(not r.get("media") and r["conversations"][1]["value"] in map(nd.signal_run, mods) for r in t2x)
    n_pairs = sum(len(nd.t2x_pairs(tmp_path, m)) for m in mods)
    assert len(t2x) == n_pairs and len(s2) == 2 * n_pairs  # by default every pair is also an X->text negative
    half = nd.stage_records(tmp_path, 2, mods, negatives=0.5)
    assert n_pairs < len(half) < 2 * n_pairs
    assert all(r["media"] and len(r["media"]) == 1 for r in s2 if not r.get("targets"))
    assert len(nd.stage_records(tmp_path, 2, mods, negatives=0.0)) == n_pairs
    # One share per modality: captioning negatives for images only; an unnamed modality keeps 1.0.
    per = nd.stage_records(tmp_path, 2, mods, negatives={"audio": 0.0, "video": 0.0})
    neg = [next(k for k in r["media"]) for r in per if not r.get("targets")]
    assert neg == ["image"] * len(nd.t2x_pairs(tmp_path, "image")) and len(per) == n_pairs + len(neg)
    assert len(nd.stage_records(tmp_path, 2, mods, negatives={"image": 0.0, "audio": 0.0})) == n_pairs + len(
        nd.t2x_pairs(tmp_path, "video"))
    with pytest.raises(ValueError, match="share in \\[0, 1\\], got 2.0 for audio"):
        nd.stage_records(tmp_path, 2, mods, negatives={"audio": 2.0})
    # Stage 3: two-turn dialogues (the run alone as the second reply, as stage 2 taught) shuffled among stage 2's
    # records, making up the mosit_share of them; n_dialogues overrides their count; share 1: dialogues only.
    is_dialogue = lambda r: len(r["conversations"]) == 4
    for r in filter(is_dialogue, s3):
        m = next(iter(r["targets"]))
        assert r["conversations"][3]["value"] == nd.signal_run(m) and r["media"] and r["target_media"][m]
    single = [r for r in s3 if not is_dialogue(r)]
    assert sum(map(is_dialogue, s3)) == 10 and len(single) == len(s2) and not all(map(is_dialogue, s3[-10:]))
    assert sorted(map(json.dumps, single)) == sorted(map(json.dumps, nd.stage_records(tmp_path, 2, mods, seed=1)))
    quarter = nd.stage_records(tmp_path, 3, mods, mosit_share=0.25, negatives=0.0)
    assert sum(map(is_dialogue, quarter)) == round(n_pairs / 3) and len(quarter) == n_pairs + round(n_pairs / 3)
    only = nd.stage_records(tmp_path, 3, mods, mosit_share=1.0)
    assert all(map(is_dialogue, only)) and len(only) == max(len(nd.t2x_pairs(tmp_path, m)) for m in mods)
    with pytest.raises(ValueError, match="mosit_share must be in \\(0, 1\\], got 0.0"):
        nd.stage_records(tmp_path, 3, mods, mosit_share=0.0)
    # --repeat audio=3: every audio pair three times (with its negatives), the other modalities once
    rep = nd.stage_records(tmp_path, 2, mods, negatives=0.0, repeats={"audio": 3})
    n_audio = len(nd.t2x_pairs(tmp_path, "audio"))
    assert len(rep) == n_pairs + 2 * n_audio
    audio = [r["targets"]["audio"][0] for r in rep if "audio" in r["targets"]]
    assert sorted(audio) == sorted(3 * [p["caption"] for p in nd.t2x_pairs(tmp_path, "audio")])
    # Diffusion-loss targets: one per signal run, in each decoder's input layout.
    one = [next(r for r in t2x if m in r["targets"]) for m in mods]
    ds = nd.DialogueDataset(one + one[:1], _tok(), nd.MediaLoader(tmp_path, ImageProcessor(32, aspect="resize"),
                                                                  video_frames=3, audio_samples=4000), 1,
                            target_sizes={"image": 16, "video": 8, "audio": 0})
    tm = nd.collate([ds[i] for i in range(len(ds))], 0)["target_media"]
    assert tm["image"].shape == (2, 3, 16, 16) and tm["video"].shape == (1, 3, 3, 8, 8) and tm["audio"].shape == (1, 4000)
    for m in ("image", "video"):
        assert -1 <= float(tm[m].min()) and float(tm[m].max()) <= 1 and float(tm[m].std()) > 0
    assert nd.collate([ds[0]], 0)["target_media"].keys() == {"image"}
    plain = nd.DialogueDataset(one, _tok(), nd.MediaLoader(tmp_path, ImageProcessor(32, aspect="resize")), 1)
    assert plain[0]["target_media"] == {}  # loaded only when asked for
    with pytest.raises(ValueError, match="unknown modalities"):
        nd.DialogueDataset(one, _tok(), plain.media, 1, target_sizes={"text": 8})
    assert sum(len(r["conversations"]) == 4 for r in s3) == 10  # the dialogues, among stage 2's records
    loader = nd.MediaLoader(tmp_path, ImageProcessor(32, aspect="resize"), video_frames=4, audio_samples=8000)
    by_mod = {m: next(r for r in s1 if m in r["media"]) for m in mods}
    assert loader.load("image", by_mod["image"]["media"]["image"][0]).shape == (3, 32, 32)
    assert loader.load("video", by_mod["video"]["media"]["video"][0]).shape == (4, 3, 32, 32)
    assert loader.load("audio", by_mod["audio"]["media"]["audio"][0]).shape == (8000,)
    with pytest.raises(ValueError):
        loader.load("image", "../outside.png")
    # A world made without media still gives image pairs (from captions_train.csv).
    make_world(tmp_path / "nomedia", 12, 32, seed=0, media=False)
    assert nd.t2x_pairs(tmp_path / "nomedia", "image")
    with pytest.raises(FileNotFoundError, match="t2x_audio.json"):
        nd.t2x_pairs(tmp_path / "nomedia", "audio")


def test_collate_pads_and_stacks():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3]),
         "media": {"image": [torch.zeros(3, 4, 4)]}, "captions": {"image": ["x"]}}
    b = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([-100, 2]), "media": {}, "captions": {}}
    out = nd.collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [1, 2, 0]]
    assert out["labels"][1, 2] == nd.IGNORE_INDEX and out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["media"]["image"].shape == (1, 3, 4, 4) and out["captions"] == {"image": ["x"]}


def test_stage2_image_negatives_end_like_the_world_descriptions(tmp_path):
    """Half the image negatives reply with the world's detailed description of that image (the style the
    LLaVA-tuned LLM generates), the rest with the caption; without LLaVA files only captions are used."""
    import json

    from mmfast.data.synthetic import make_world

    make_world(tmp_path, 40, 32, seed=0, media=False)
    described = nd.image_descriptions(tmp_path)
    detail = [r for r in json.loads((tmp_path / "llava_instruct_train.json").read_text()) if r["type"] == "detail"]
    assert described and described == {r["image"]: r["conversations"][1]["value"] for r in detail}
    captions = {p["path"]: p["caption"] for p in nd.t2x_pairs(tmp_path, "image")}
    recs = nd.stage_records(tmp_path, 2, ("image",), negatives=1.0)
    replies = [(r["media"]["image"][0], r["conversations"][1]["value"]) for r in recs if "media" in r]
    assert len(replies) == len(captions)
    n_desc = sum(text == described[path] for path, text in replies)
    n_capt = sum(text == captions[path] for path, text in replies)
    assert n_desc + n_capt == len(replies) and 0 < n_desc < len(replies), (n_desc, n_capt)
    (tmp_path / "llava_instruct_train.json").unlink()
    assert nd.image_descriptions(tmp_path) == {}
    recs = nd.stage_records(tmp_path, 2, ("image",), negatives=1.0)
    assert all(r["conversations"][1]["value"] == captions[r["media"]["image"][0]] for r in recs if "media" in r)


@pytest.mark.parametrize("arg, ok", [("audio=8", {"audio": 8}), ("audio=8,image=2", {"audio": 8, "image": 2}),
                                     ("video=2", None), ("audio=0", None), ("audio", None)])
def test_repeat_argument(arg, ok, capsys):
    from mmfast.training.nextgpt import parse_args

    argv = ["--stage", "2", "--data", ".", "--out", "x", "--modalities", "image,audio", "--repeat", arg]
    if ok is None:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--repeat" in capsys.readouterr().err
    else:
        assert parse_args(argv).repeat == ok


@pytest.mark.parametrize("flag, arg, ok", [
    ("--negatives", "0.5", 0.5), ("--negatives", "image=1,audio=0", {"image": 1.0, "audio": 0.0}),
    ("--negatives", "1.5", None), ("--negatives", "audio=x", None), ("--negatives", "video=1", None),
    ("--rows", "audio", ("audio",)), ("--rows", "", ()), ("--rows", "sound", None),
    ("--head-rows", "image,audio", ("image", "audio")), ("--head-rows", "x", None),
    ("--projections", "image,audio", ("image", "audio")), ("--projections", "sound", None)])
def test_stage2_choice_arguments(flag, arg, ok, capsys):
    from mmfast.training.nextgpt import parse_args

    argv = ["--stage", "2", "--data", ".", "--out", "x", "--modalities", "image,audio", flag, arg]
    if ok is None:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert flag in capsys.readouterr().err
    else:
        assert getattr(parse_args(argv), flag[2:].replace("-", "_")) == ok
    with pytest.raises(SystemExit):  # stage 1 trains neither rows nor output projections
        parse_args(["--stage", "1", "--data", ".", "--out", "x", flag if flag != "--negatives" else "--rows", "audio"])
