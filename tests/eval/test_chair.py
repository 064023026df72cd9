"""CHAIR on hand-made captions (values worked out by hand), plural/synonym handling, input formats."""
import json

import pytest

from mmfast.eval import chair as chair_mod
from mmfast.eval.chair import COCO_SYNONYMS, Vocabulary, chair, plural

CLASSES = ["person", "dog", "hot dog", "teddy bear", "bear", "elephant", "toilet", "chair", "dining table",
           "orange", "skis", "car", "knife"]


def _coco():
    objects = {1: ["person", "dog"], 2: ["hot dog", "dining table"], 3: ["elephant"], 4: ["toilet"],
               5: ["teddy bear"], 6: ["skis", "person"]}
    cats = [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]
    anns = [{"id": 100 * im + k, "image_id": im, "category_id": CLASSES.index(c) + 1}
            for im, objs in objects.items() for k, c in enumerate(objs)]
    images = [{"id": im, "file_name": f"COCO_val2014_{im:012d}.jpg"} for im in objects]
    return {"images": images, "annotations": anns, "categories": cats}


CAPTIONS = [
    # (image_id, caption, mentions as classes, hallucinated classes) -- worked out by hand
    (1, "A man walks two dogs past a car.", ["person", "dog", "car"], ["car"]),
    (2, "A hot dog on a table next to a dog.", ["hot dog", "dining table", "dog"], ["dog"]),
    (3, "Two baby elephants playing in the mud.", ["elephant"], []),
    (4, "A toilet seat and some toilet paper.", ["toilet"], []),
    (5, "A teddy bear sitting on a chair with knives.", ["teddy bear", "chair", "knife"], ["chair", "knife"]),
    (6, "A skier holds her skis; people and puppies watch.", ["person", "skis", "person", "dog"], ["dog"]),
]


def test_chair_by_hand():
    rows = [{"image_id": im, "caption": c} for im, c, _, _ in CAPTIONS]
    res = chair(rows, _coco())
    for got, (_, _, mentioned, hall) in zip(res["captions"], CAPTIONS):
        assert [c for _, c in got["mentioned"]] == mentioned, got["caption"]
        assert [c for _, c in got["hallucinated"]] == hall, got["caption"]
    # mentions 3+3+1+1+3+4 = 15, hallucinated 1+1+0+0+2+1 = 5, captions with any 4 of 6
    assert (res["n_mentions"], res["n_hallucinated"], res["n_hallucinated_captions"]) == (15, 5, 4)
    assert res["CHAIR_i"] == pytest.approx(5 / 15)
    assert res["CHAIR_s"] == pytest.approx(4 / 6)
    assert res["captions"][4]["hallucinated_objects"] == ["chair", "knife"]
    assert res["captions"][4]["chair_i"] == pytest.approx(2 / 3)


def test_llava_answer_format_and_file_names(tmp_path):
    coco = _coco()
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    qs = [{"question_id": 7, "image": "COCO_val2014_000000000001.jpg", "text": "Describe the image.", "label": "-"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    answers = [
        {"question_id": 7, "prompt": "Describe the image.", "text": "A dog and an orange.", "model_id": "m"},
        {"image": "val2014/COCO_val2014_000000000003.jpg", "text": "An elephant."},
        {"image_id": "4", "answer": "A toilet."},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    res = chair(tmp_path / "a.jsonl", tmp_path / "instances.json", questions=tmp_path / "q.jsonl")
    assert [c["image_id"] for c in res["captions"]] == [1, 3, 4]
    assert res["captions"][0]["hallucinated_objects"] == ["orange"]
    assert (res["n_mentions"], res["n_hallucinated"]) == (4, 1)
    # The paper's input format {"imgToEval": {id: {"image_id", "caption"}}} works too.
    legacy = {"overall": {}, "imgToEval": {"1": {"image_id": 1, "caption": "a man with a car"}}}
    assert chair(legacy, coco)["CHAIR_s"] == 1.0
    with pytest.raises(ValueError, match="pass the questions file"):
        chair(tmp_path / "a.jsonl", coco)
    with pytest.raises(ValueError, match="not in the instances file"):
        chair([{"image_id": 99, "caption": "x"}], coco)
    with pytest.raises(ValueError, match="needs a 'caption'"):
        chair([{"image_id": 1, "words": "x"}], coco)


def test_cli(tmp_path, capsys):
    (tmp_path / "instances.json").write_text(json.dumps(_coco()))
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"image_id": im, "caption": c}) + "\n"
                                                 for im, c, _, _ in CAPTIONS))
    argv = ["--captions", str(tmp_path / "caps.jsonl"), "--annotations", str(tmp_path / "instances.json"),
            "--out", str(tmp_path / "res.json")]
    assert chair_mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "CHAIR_s 66.67  CHAIR_i 33.33" in out and "dog (2)" in out
    assert json.loads((tmp_path / "res.json").read_text())["n_mentions"] == 15
    assert chair_mod.main(["--captions", str(tmp_path / "nope.jsonl"), "--annotations",
                           str(tmp_path / "instances.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_reference_captions_widen_ground_truth():
    coco = _coco()
    refs = {"annotations": [{"image_id": 1, "caption": "A person and a dog near a parked car."}]}
    rows = [{"image_id": 1, "caption": "A man, a dog and a car."}]
    assert chair(rows, coco)["n_hallucinated"] == 1
    assert chair(rows, coco, gt_captions=refs)["n_hallucinated"] == 0


def test_plurals_and_synonyms():
    assert [plural(w) for w in ["bench", "pony", "skis", "knife", "bus", "toy", "person", "glass", "dog"]] == \
        ["benches", "ponies", "skis", "knives", "buses", "toys", "people", "glasses", "dogs"]
    assert len(COCO_SYNONYMS) == 80
    v = Vocabulary(list(COCO_SYNONYMS))
    cases = {
        "two women riding motorbikes": ["person", "motorcycle"],
        "a hotdog and two hot dogs": ["hot dog", "hot dog"],
        "a polar bear next to teddy bears": ["bear", "teddy bear"],
        "a passenger jet at the bus stop": ["airplane"],
        "mice, a computer mouse and a cellphone": ["mouse", "mouse", "cell phone"],
        "a tv on the dining tables near the sofa": ["tv", "dining table", "couch"],
        "kittens, a puppy and some sheep": ["cat", "dog", "sheep"],
    }
    for text, want in cases.items():
        assert [c for _, c in v.mentions(text)] == want, text
    # Only the instance file's classes count: "orange" is no object in a world without oranges.
    small = Vocabulary(["car", "tree"], synonyms={"tree": ["pine"]})
    assert [c for _, c in small.mentions("an orange car under two pines")] == ["car", "tree"]
    with pytest.raises(ValueError, match="not in the annotations"):
        Vocabulary(["car"], synonyms={"boat": ["ship"]})


def test_synthetic_world(tmp_path):
    synthetic = pytest.importorskip("mmfast.data.synthetic", reason="mmfast.data.synthetic is not in this build")
    if not hasattr(synthetic, "make_world"):
        pytest.skip("mmfast.data.synthetic.make_world is not in this build")
    import csv

    from mmfast.eval import pope

    synthetic.make_world(tmp_path, n_images=60, media=False, seed=0)
    inst = tmp_path / "annotations" / "instances_val.json"
    with open(tmp_path / "captions_val.csv", newline="") as f:
        rows = [{"image": r["filepath"], "caption": r["caption"]} for r in csv.DictReader(f)]
    truth = chair(rows, inst)
    assert truth["n_mentions"] >= len(rows) and truth["CHAIR_i"] == 0.0 and truth["CHAIR_s"] == 0.0
    shifted = [dict(r, caption=rows[(i + 2) % len(rows)]["caption"]) for i, r in enumerate(rows)]
    assert chair(shifted, inst)["CHAIR_s"] > 0
    # POPE builds on the world's objects file and an oracle answering from it scores perfectly.
    objects = pope.load_annotations(tmp_path / "objects_val.jsonl")
    have = {r["image"]: set(r["objects"]) for r in objects}
    qs = pope.build_questions(objects, "adversarial", num_images=len([o for o in objects if len(o["objects"]) >= 2]),
                              num_positive=2, seed=0)
    answers = [{"question_id": q["question_id"], "text": "Yes" if pope.object_of(q["text"]) in have[q["image"]]
                else "No"} for q in qs]
    m = pope.score(qs, answers)
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.5
