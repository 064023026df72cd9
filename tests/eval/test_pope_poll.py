"""Polling a model on POPE through the adapter interface: answers, resumability, adapter choice."""
import importlib.util
import json

import pytest
from PIL import Image

from mmfast.eval import adapters, pope, pope_poll
from mmfast.eval.adapters import Adapter, get_adapter, register_adapter
from mmfast.eval.pope_poll import poll

OBJECTS = ["person", "car", "dog", "apple", "umbrella", "bench", "cup", "kite"]


def _world(tmp_path, n=6):
    """n images whose red channel encodes their index, and their objects."""
    root = tmp_path / "images"
    root.mkdir()
    ann = []
    for i in range(n):
        Image.new("RGB", (8, 6), (i * 10, 0, 0)).save(root / f"im{i}.png")
        ann.append({"image": f"im{i}.png", "objects": [OBJECTS[(i + k) % len(OBJECTS)] for k in range(3)]})
    return root, ann


class Oracle(Adapter):
    """Sees the image (red channel -> index) and answers truthfully, except it always claims a car."""

    def __init__(self, ann, fail_after=None):
        self.ann, self.calls, self.fail_after, self.seen = ann, 0, fail_after, []

    def answer(self, images, questions):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        out = []
        for im, q in zip(images, questions):
            objs = self.ann[im.getpixel((0, 0))[0] // 10]["objects"]
            obj = pope.object_of(q.split("\n")[0])
            self.seen.append(q)
            out.append("Yes, there is." if obj in objs or obj == "car" else "No, there is not.")
        return out


def _expected(qs, ann):
    objs = {a["image"]: a["objects"] for a in ann}
    preds = ["yes" if pope.object_of(q["text"]) in objs[q["image"]] or pope.object_of(q["text"]) == "car" else "no"
             for q in qs]
    return pope.metrics(preds, [q["label"] for q in qs])


def test_poll_answers_and_scores(tmp_path):
    root, ann = _world(tmp_path)
    qs = pope.build_questions(ann, "popular", num_images=6, seed=0)
    out = tmp_path / "answers.jsonl"
    assert poll(Oracle(ann), qs, root, out, batch_size=4, prompt_suffix="\nOne word.") == len(qs)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in qs]
    assert all(r["prompt"].endswith("\nOne word.") for r in rows)
    m = pope.score(qs, out)
    assert m == _expected(qs, ann) and m["FP"] == sum(pope.object_of(q["text"]) == "car" for q in qs
                                                      if q["label"] == "no")


def test_poll_resumes_after_crash(tmp_path):
    root, ann = _world(tmp_path)
    qs = pope.build_questions(ann, "adversarial", num_images=6, seed=1)
    out = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError, match="simulated crash"):
        poll(Oracle(ann, fail_after=2), qs, root, out, batch_size=5)
    assert len(out.read_text().splitlines()) == 10
    # A torn last line (power cut mid-write) is cut off and asked again.
    with open(out, "a") as f:
        f.write('{"question_id": 11, "te')
    second = Oracle(ann)
    assert poll(second, qs, root, out, batch_size=5) == len(qs) - 10
    assert len(second.seen) == len(qs) - 10
    ids = [json.loads(line)["question_id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [q["question_id"] for q in qs]
    assert poll(Oracle(ann), qs, root, out) == 0  # nothing left
    with pytest.raises(ValueError, match="holds answers from \\['Oracle'\\], not 'other-model'"):
        poll(Oracle(ann), qs, root, out, model_id="other-model")
    assert pope.score(qs, out) == _expected(qs, ann)


def test_poll_refuses_foreign_answers_and_escaping_images(tmp_path):
    root, ann = _world(tmp_path)
    qs = pope.build_questions(ann, "random", num_images=6, seed=0)
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps({"question_id": 999, "text": "yes"}) + "\n")
    with pytest.raises(ValueError, match="not in this question set"):
        poll(Oracle(ann), qs, root, out)
    bad = [dict(qs[0], image="../outside.png")]
    with pytest.raises(ValueError, match="escapes its root"):
        poll(Oracle(ann), bad, root, tmp_path / "other.jsonl")


def test_adapter_output_is_checked(tmp_path):
    class Short(Adapter):
        def answer(self, images, questions):
            return ["yes"]

    with pytest.raises(TypeError, match="must return 2 strings"):
        Short()([None, None], ["a", "b"])
    with pytest.raises(ValueError, match="pair one to one"):
        Short()([None], ["a", "b"])


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    root, ann = _world(tmp_path, n=8)
    ann_file = tmp_path / "objects.jsonl"
    ann_file.write_text("".join(json.dumps(a) + "\n" for a in ann))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"mmfast_adapter": "oracle-test"}))
    made = []

    def factory(model_dir, **options):
        made.append(options)
        made[-1]["adapter"] = Oracle(ann)
        return made[-1]["adapter"]

    register_adapter("oracle-test", factory)
    try:
        argv = ["--model", str(model), "--images", str(root), "--annotations", str(ann_file),
                "--num-images", "8", "--seed", "3", "--out", str(tmp_path / "run"), "--batch-size", "3"]
        assert pope_poll.main(argv) == 0
        table = capsys.readouterr().out
        assert "Accuracy" in table and "adversarial" in table
        scores = json.loads((tmp_path / "run" / "scores.json").read_text())
        assert scores["adapter"] == "oracle-test" and set(scores["results"]) == set(pope.SETTINGS)
        for s in pope.SETTINGS:
            qs = [json.loads(line) for line in (tmp_path / "run" / f"questions_{s}.jsonl").read_text().splitlines()]
            assert qs == pope.build_questions(ann, s, num_images=8, seed=3)
            assert scores["results"][s] == _expected(qs, ann)
        # Re-running asks nothing; a different seed in the same directory is refused.
        assert pope_poll.main(argv) == 0
        assert made[-1]["adapter"].calls == 0
        assert pope_poll.main(argv[:-4] + ["--seed", "4", "--out", str(tmp_path / "run")]) == 2
        assert "different question set" in capsys.readouterr().err
        # Scoring the written files through the score command gives the same numbers.
        files = [str(tmp_path / "run" / f"{k}_{s}.jsonl") for k in ("questions", "answers") for s in pope.SETTINGS]
        assert pope.score_main(["--questions", *files[:3], "--answers", *files[3:], "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == scores["results"]
    finally:
        adapters._REGISTRY.pop("oracle-test", None)


def test_adapter_selection(tmp_path):
    def model_dir(name, cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    assert adapters.detect_kind(model_dir("hf", {"model_type": "llava"})) == "llava-hf"
    assert adapters.detect_kind(model_dir("ours", {"mmfast_model": "nextgpt"})) == "nextgpt"
    assert adapters.detect_kind(model_dir("ours2", {"model_type": "mmfast_llava"})) == "llava"
    with pytest.raises(ValueError, match="cannot tell which adapter"):
        adapters.detect_kind(model_dir("bert", {"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        adapters.detect_kind(tmp_path / "nothing")
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match="model config not found"):
        adapters.detect_kind(tmp_path / "noconfig")
    with pytest.raises(ValueError, match="unknown adapter kind"):
        get_adapter(tmp_path / "hf", kind="nope")
    for kind in ("llava", "nextgpt"):
        if importlib.util.find_spec(f"mmfast.models.{kind}") is not None:
            continue  # the real model is in this build; its own tests cover loading
        with pytest.raises(NotImplementedError, match=f"mmfast.models.{kind}"):
            get_adapter(tmp_path / "ours", kind=kind)


def test_cli_with_question_files(tmp_path, capsys):
    root, ann = _world(tmp_path)
    qfile = tmp_path / "mine_popular.jsonl"
    qs = pope.build_questions(ann, "popular", num_images=6, seed=2)
    pope.write_jsonl(qfile, qs)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "something-else"}))
    register_adapter("oracle-test2", lambda model_dir, **kw: Oracle(ann))
    try:
        argv = ["--model", str(model), "--adapter", "oracle-test2", "--images", str(root), "--questions", str(qfile),
                "--out", str(tmp_path / "run"), "--prompt-suffix", ""]
        assert pope_poll.main(argv) == 0
        scores = json.loads((tmp_path / "run" / "scores.json").read_text())
        assert list(scores["results"]) == ["popular"] and scores["results"]["popular"] == _expected(qs, ann)
        rows = [json.loads(x) for x in (tmp_path / "run" / "answers_popular.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [q["text"] for q in qs]
        # Without --adapter the config says nothing we know: a clear error, exit code 2.
        assert pope_poll.main(argv[:2] + argv[4:]) == 2
        assert "cannot tell which adapter" in capsys.readouterr().err
    finally:
        adapters._REGISTRY.pop("oracle-test2", None)
