"""The synthetic world: determinism, valid formats, and the statistics it promises."""

import csv
import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from mmfast.data import synthetic
from mmfast.data._worldfiles import YESNO_TURNS
from mmfast.data.coco import load_coco, load_objects_jsonl
from mmfast.data.imagetext import ImageTextDataset
from mmfast.data.llava import load_llava_json
from mmfast.data.media import load_t2x_json, read_video, read_wav
from mmfast.data.synthetic import CLASSES, make_world
from mmfast.eval.pope import parse_pope

N = 40


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    make_world(out, n_images=N, seed=3, n_videos=6, audio_per_class=2)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes(world, tmp_path):
    again = tmp_path / "again"
    # Two worker processes instead of one: the bytes must not depend on it either.
    make_world(again, n_images=N, seed=3, n_videos=6, audio_per_class=2, workers=2)
    a, b = _files(world), _files(again)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.startswith("images/")]) == N
    for k in a:
        assert a[k] == b[k], f"{k} differs between two runs with the same seed"


def test_other_seed_gives_other_world(world, tmp_path):
    other = tmp_path / "other"
    make_world(other, n_images=N, seed=4, media=False)
    a, b = _files(world), _files(other)
    differing = [k for k in b if k.startswith("images/") and a[k] != b[k]]
    assert len(differing) == N


def test_coco_loads_in_pycocotools_and_boxes_fit(world):
    from pycocotools.coco import COCO

    total = 0
    for split in ("train", "val"):
        coco = COCO(str(world / "annotations" / f"instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == CLASSES
        for ann in coco.loadAnns(coco.getAnnIds()):
            im = coco.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0, ann
            assert x + w <= im["width"] and y + h <= im["height"], ann
            assert 0 < ann["area"] <= w * h + 1e-6 and ann["iscrowd"] == 0
            assert (world / im["file_name"]).is_file()
            total += 1
        ours = load_coco(world / "annotations" / f"instances_{split}.json")
        assert ours.class_names == CLASSES
        assert len(ours.to_pycocotools().getAnnIds()) == len(coco.getAnnIds())
    assert total >= N  # every image has at least one object
    assert json.loads((world / "classes.json").read_text()) == CLASSES


def test_objects_jsonl_matches_coco(world):
    coco = load_coco(world / "annotations" / "instances_val.json")
    assert load_objects_jsonl(world / "objects_val.jsonl") == coco.objects_records()


def _scenes(n: int, seed: int = 0) -> list[dict]:
    return [synthetic.sample_scene(seed, i, 64)[0] for i in range(n)]


def test_class_frequencies_follow_the_zipf_skew():
    scenes = _scenes(600)
    counts = Counter(o["cls"] for s in scenes for o in s["objects"])
    obs = np.array([counts[c] for c in CLASSES], dtype=np.float64)
    prior = synthetic.class_prior()
    n = obs.sum()
    # Each class count within 4 binomial standard deviations of the promised prior.
    sd = np.sqrt(n * prior * (1 - prior))
    assert np.all(np.abs(obs - n * prior) <= 4 * sd + 1), (obs, n * prior)
    # The prior itself is strongly skewed (Zipf over category ids, reshuffled a little by the themes).
    assert prior[0] / prior.min() > 8
    # The four most frequent classes are drawn over 4x as often as the bottom four.
    assert np.sort(obs)[-4:].sum() > 4 * np.sort(obs)[:4].sum()


def test_theme_objects_co_occur():
    scenes = _scenes(2000, seed=1)  # the sky theme's true mean lift is ~1.55: 600 scenes were too noisy
    sets = [{o["cls"] for o in s["objects"]} for s in scenes]
    p = {c: np.mean([c in s for s in sets]) for c in CLASSES}
    # Lift of a pair = P(a and b together) / (P(a) P(b)); 1 means independent.
    for theme, (members, _) in synthetic.THEMES.items():
        lifts = [
            np.mean([a in s and b in s for s in sets]) / (p[a] * p[b]) for a, b in combinations(members, 2)
        ]
        assert np.mean(lifts) > 1.5, (theme, lifts)


def test_objects_sit_on_the_patch_grid():
    """Small objects are centred in one cell of the 4x4 grid, the main one in a 2x2 block (its centre on a
    grid crossing); every cell is used, the border ones included."""
    small, main, cells = [], [], set()
    for s in _scenes(200):
        cell = s["size"] / synthetic.GRID
        for k, o in enumerate(s["objects"]):
            x, y, w, h = o["bbox"]
            cx, cy = (x + w / 2) / cell, (y + h / 2) / cell
            if k == 0:
                main += [abs(c - round(c)) for c in (cx, cy)]
                assert 1 <= round(cx) <= synthetic.GRID - 1 and 1 <= round(cy) <= synthetic.GRID - 1
            else:
                small += [abs(c - (int(c) + 0.5)) for c in (cx, cy)]
                cells.add((int(cx), int(cy)))
    small, main = np.array(small), np.array(main)
    assert len(small) > 300 and len(main) == 400
    # Drawn shapes are centred in their box up to the rasterised outline (about a pixel at 32 px: 1/8 cell).
    assert small.max() <= 0.2 and np.median(small) <= 0.05, (small.max(), np.median(small))
    assert main.max() <= 0.2 and np.median(main) <= 0.05, (main.max(), np.median(main))
    assert cells == {(i, j) for i in range(synthetic.GRID) for j in range(synthetic.GRID)}


def test_main_object_is_the_largest_and_captions_name_it(world):
    for s in _scenes(100):
        assert 1 <= len(s["objects"]) <= 5
        assert all(s["objects"][0]["area"] > o["area"] for o in s["objects"][1:])
    with open(world / "zeroshot_val.csv", newline="") as f:
        labels = {r["filepath"]: r for r in csv.DictReader(f)}
    ds = ImageTextDataset(world / "captions_val.csv")
    assert len(ds) >= len(labels)
    for i, (path, cap) in enumerate(ds.rows):
        assert labels[path]["class"] in cap, (path, cap)
        assert CLASSES[int(labels[path]["label"])] == labels[path]["class"]
    image, text = ds[0]
    assert image.size == (64, 64) and isinstance(text, str)


def _names_all(caption: str, scene: dict) -> bool:
    return all(o["cls"] in caption for o in scene["objects"])  # plurals contain the singular ("crosses")


def test_captions_of_busy_scenes_name_every_object():
    from mmfast.data import _text

    scenes = [s for s in _scenes(600) if len(s["objects"]) > 1]
    rng = np.random.default_rng(0)
    firsts = []
    for s in scenes:
        caps = _text.captions(s, rng, 2)
        assert len(set(caps)) == 2 and s["objects"][0]["cls"] in caps[0]
        # The small objects are named in at least one caption: the CLIP learns them only from those.
        assert any(_names_all(c, s) for c in caps), caps
        firsts.append(_names_all(caps[0], s))
        more = _text.captions(s, rng, 7)  # past the listings come the other phrasings, still distinct
        assert len(more) == len(set(more)) >= 4
    main_only = 1 - np.mean(firsts)
    # A main-only first caption with probability MAIN_CAPTION_P (a "big X with ..." listing names all too).
    se = np.sqrt(_text.MAIN_CAPTION_P * (1 - _text.MAIN_CAPTION_P) / len(scenes))
    assert abs(main_only - _text.MAIN_CAPTION_P) < 4 * se + 0.02, (main_only, len(scenes))
    single = next(s for s in _scenes(50) if len(s["objects"]) == 1)
    assert all(single["objects"][0]["cls"] in c for c in _text.captions(single, rng, 4))


def test_llava_files_parse_and_yes_no_answers_are_grounded_and_independent(world):
    objects = {
        r["image"]: set(r["objects"])
        for split in ("train", "val")
        for r in load_objects_jsonl(world / f"objects_{split}.jsonl")
    }
    kinds, answers, pairs = Counter(), Counter(), Counter()
    for split in ("train", "val"):
        recs = load_llava_json(world / f"llava_instruct_{split}.json", world)
        assert len({r["id"] for r in recs}) == len(recs)
        for r in recs:
            first = r["conversations"][0]
            assert first["from"] == "human" and "<image>" in first["value"]
            kinds[r["type"]] += 1
            if r["type"] != "yesno":
                continue
            asked, said = [], []
            for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
                name = q["value"].replace("<image>", "").split("Is there a")[-1].strip()
                name = name.removeprefix("n ").split(" in the image")[0]
                yes = parse_pope(a["value"]) == "yes"
                assert a["value"] == (f"A{'n' if name[0] in 'aeiou' else ''} {name}" + (", yes." if yes else "? No."))
                assert yes == (name in objects[r["image"]]), (q, a, objects[r["image"]])
                asked.append(name)
                said.append(yes)
                answers[yes] += 1
            n_present = len(objects[r["image"]])
            assert 1 <= len(said) <= YESNO_TURNS and len(set(asked)) == len(asked), r
            if len(said) < YESNO_TURNS:  # it stops once every present class was asked about
                assert sum(said) == n_present and said[-1], r
            pairs[tuple(said[:2])] += 1
        pre = load_llava_json(world / f"llava_pretrain_{split}.json", world)
        assert all(len(r["conversations"]) == 2 and "<image>" in r["conversations"][0]["value"] for r in pre)
    assert set(kinds) == {"conversation", "detail", "reasoning", "yesno"}
    assert len(set(kinds.values())) == 1
    total = answers[True] + answers[False]
    assert total >= 2 * N and 0.35 <= answers[True] / total <= 0.65, answers
    # No shortcut: a later answer is not the negation of the earlier one (both agreeing pairs occur).
    assert pairs[(True, True)] > 0 and pairs[(False, False)] > 0, pairs


def test_audio_video_and_t2x(world):
    audio = load_t2x_json(world / "t2x_audio.json")
    assert len(audio) == 2 * len(CLASSES)
    peaks = {}
    for rec in audio:
        x, rate = read_wav(rec["path"])
        assert rate == 16000 and x.shape == (16000,) and np.abs(x).max() <= 1.0
        cls = rec["id"].rsplit("_", 1)[0]
        spectrum = np.abs(np.fft.rfft(x))
        peaks.setdefault(cls, []).append(int(spectrum.argmax()))
    # Every class's strongest frequency (Hz, 1 s clips) is its own, and stable across variants.
    base = {c: np.median(v) for c, v in peaks.items()}
    assert len(base) == len(CLASSES)
    assert min(abs(a - b) for a, b in combinations(base.values(), 2)) >= 10
    videos = load_t2x_json(world / "t2x_video.json")
    assert len(videos) == 6 and {r["split"] for r in videos} == {"train", "val"}
    frames = read_video(videos[0]["path"])
    assert len(frames) == 8 and frames[0].size == (64, 64)
    assert np.abs(np.asarray(frames[0], np.int16) - np.asarray(frames[-1], np.int16)).sum() > 0
    assert "moving" in videos[0]["caption"]
    images = load_t2x_json(world / "t2x_image.json")
    assert len(images) == N
    readme = (world / "README.md").read_text()
    assert "t2x_{image,audio,video}.json" in readme and "audio/CLASS_NN.wav" in readme


def test_cli_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--images", "5", "--seed", "1", "--no-media", "--shard-size", "3"]
    assert synthetic.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_train"] == 4 and summary["shards_train"] == 3  # 4 images x 2 captions / 3
    assert (out / "captions_train.csv").is_file() and not (out / "audio").exists()
    from mmfast.data.webdataset import TarImageTextDataset

    shards = TarImageTextDataset(sorted((out / "shards").glob("train-*.tar")))
    csv_rows = ImageTextDataset(out / "captions_train.csv")
    assert [c for _, c in shards] == csv_rows.captions
    assert np.array_equal(np.asarray(shards[7][0]), np.asarray(csv_rows[7][0]))
    assert "shards/{train,val}" in (out / "README.md").read_text()
    assert synthetic.main(["--out", str(out), "--images", "4"]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_images"):
        make_world(tmp_path / "x", n_images=1)
    with pytest.raises(ValueError, match="image_size"):
        make_world(tmp_path / "x", n_images=4, image_size=8)
    with pytest.raises(ValueError, match="captions_per_image"):
        make_world(tmp_path / "x", n_images=4, captions_per_image=0)
    with pytest.raises(ValueError, match="audio_per_class"):
        make_world(tmp_path / "x", n_images=4, audio_per_class=0)
    tiny = make_world(tmp_path / "y", n_images=2, val_fraction=0.9, media=False)
    assert (tiny["n_train"], tiny["n_val"]) == (1, 1)


def test_pope_popular_and_adversarial_negatives_are_more_plausible():
    """POPE's harder settings ask about absent objects that this world makes likely."""
    from mmfast.eval.pope import build_questions, object_of

    def records(scenes):
        return [
            {"image": str(i), "objects": list(dict.fromkeys(o["cls"] for o in s["objects"]))}
            for i, s in enumerate(scenes)
        ]

    train, val = records(_scenes(400, seed=5)), records(_scenes(400, seed=6))
    n = len(train)
    freq = Counter(o for r in train for o in r["objects"])
    pair = Counter((a, b) for r in train for a in r["objects"] for b in r["objects"] if a != b)
    objects = {r["image"]: r["objects"] for r in val}

    def plausibility(q):  # P(neg | the likeliest present object), estimated on other images
        neg = object_of(q["text"])
        return max(pair[(p, neg)] / freq[p] for p in objects[q["image"]]), freq[neg] / n

    stats = {}
    for setting in ("random", "popular", "adversarial"):
        qs = build_questions(val, setting, num_images=100, num_positive=3, seed=0)
        negs = [plausibility(q) for q in qs if q["label"] == "no"]
        stats[setting] = np.mean(negs, axis=0)  # (conditional, marginal)
    assert stats["adversarial"][0] > 1.5 * stats["random"][0], stats
    assert stats["popular"][1] > 1.5 * stats["random"][1], stats


def test_audio_only_writes_the_worlds_audio_and_cli_sets_the_clip_count(world, tmp_path, capsys):
    # the demo's world: images without media, then the audio alone (mmfast.data._media.write_audio)
    from mmfast.data._media import write_audio

    out = tmp_path / "a"
    make_world(out, n_images=N, seed=3, media=False)
    assert write_audio(out, 3, 2) == {"n_audio": 2 * len(CLASSES)}
    assert (out / "t2x_audio.json").read_bytes() == (world / "t2x_audio.json").read_bytes()
    for f in sorted((world / "audio").iterdir()):
        assert (out / "audio" / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (out / "t2x_image.json").exists() and not (out / "video").exists()
    cli = tmp_path / "cli"
    assert synthetic.main(["--out", str(cli), "--images", "4", "--seed", "3", "--audio-per-class", "3"]) == 0
    audio = load_t2x_json(cli / "t2x_audio.json")
    assert len(audio) == 3 * len(CLASSES) and sum(r["split"] == "val" for r in audio) == len(CLASSES)
    assert json.loads(capsys.readouterr().out)["n_audio"] == 3 * len(CLASSES)


def test_videos_only_writes_the_worlds_videos_and_cli_sets_count_and_frames(world, tmp_path, capsys):
    # the demo's world with --videos: images without media, then the videos alone (write_videos), the same files
    from mmfast.data._media import write_videos
    from mmfast.data.media import read_video

    out = tmp_path / "v"
    make_world(out, n_images=N, seed=3, media=False)
    size = read_video(next((world / "video").iterdir()))[0].size[0]
    assert write_videos(out, 3, size, 6, frames=8) == {"n_videos": 6}
    assert (out / "t2x_video.json").read_bytes() == (world / "t2x_video.json").read_bytes()
    for f in sorted((world / "video").iterdir()):
        assert (out / "video" / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (out / "t2x_audio.json").exists()
    cli = tmp_path / "cli"
    assert synthetic.main(["--out", str(cli), "--images", "4", "--seed", "3", "--videos", "10",
                           "--video-frames", "3"]) == 0
    videos = load_t2x_json(cli / "t2x_video.json")
    assert len(videos) == 10 and sum(r["split"] == "val" for r in videos) == 2
    assert all(len(read_video(r["path"])) == 3 for r in videos)
    assert json.loads(capsys.readouterr().out)["n_videos"] == 10
    assert synthetic.main(["--out", str(tmp_path / "bad"), "--images", "4", "--video-frames", "1"]) == 2
    assert "video_frames (--video-frames) must be >= 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"n_videos \(--videos\)"):
        make_world(tmp_path / "x", n_images=4, n_videos=0)
