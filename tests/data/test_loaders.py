"""Generic loaders: good files load, bad ones fail with errors that name the file and record."""

import io
import json
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfast.data.coco import load_coco, load_objects_jsonl
from mmfast.data.imagetext import ImageTextDataset, read_image_text_csv
from mmfast.data.llava import LlavaDataset, LlavaFormatError, load_llava_json
from mmfast.data.media import load_t2x_json, read_video, read_wav
from mmfast.data.webdataset import TarImageTextDataset, csv_to_shards, expand_shards, write_shards


def _png(path: Path, seed: int, size=(9, 7)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def root(tmp_path) -> Path:
    for i in range(3):
        _png(tmp_path / "imgs" / f"{i}.png", i)
    return tmp_path


# ---- image-text CSV ----


def test_csv_dataset_reads_pairs_with_transform_and_tokenizer(root):
    (root / "pairs.csv").write_text(
        'filepath,caption\nimgs/0.png,a red star\nimgs/1.png,"two cups, one car"\n'
    )
    ds = ImageTextDataset(
        root / "pairs.csv",
        transform=lambda im: np.asarray(im).shape,
        tokenizer=lambda caps: [len(c) for c in caps],
    )
    assert len(ds) == 2 and ds.captions == ["a red star", "two cups, one car"]
    assert ds[0] == ((7, 9, 3), len("a red star"))
    plain = ImageTextDataset(root / "pairs.csv")
    image, text = plain[1]
    assert image.mode == "RGB" and np.array_equal(
        np.asarray(image), np.asarray(Image.open(root / "imgs/1.png"))
    )
    assert text == "two cups, one car"


def test_csv_tsv_with_other_keys_and_root(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("csvs") / "t.tsv"
    elsewhere.write_text("title\timg\nhello\timgs/2.png\n")
    ds = ImageTextDataset(elsewhere, root=root, img_key="img", caption_key="title", sep="\t")
    assert ds[0][1] == "hello" and ds.image_path(0) == (root / "imgs/2.png").resolve()


def test_csv_errors_name_file_and_line(root):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ImageTextDataset(root / "nope.csv")
    (root / "a.csv").write_text("path,caption\nimgs/0.png,x\n")
    with pytest.raises(ValueError, match=r"a\.csv line 1: .*'filepath'"):
        read_image_text_csv(root / "a.csv")
    (root / "b.csv").write_text("filepath,caption\nimgs/0.png,x\nimgs/1.png,y,extra\n")
    with pytest.raises(ValueError, match=r"b\.csv line 3: 3 fields, expected 2"):
        read_image_text_csv(root / "b.csv")
    (root / "c.csv").write_text("filepath,caption\nimgs/0.png,\n")
    with pytest.raises(ValueError, match=r"c\.csv line 2: empty 'caption'"):
        read_image_text_csv(root / "c.csv")
    (root / "d.csv").write_text("filepath,caption\n")
    with pytest.raises(ValueError, match="no rows"):
        read_image_text_csv(root / "d.csv")


def test_csv_path_escape_and_missing_image(root, tmp_path_factory):
    for name, rel in (("up", "../outside.png"), ("abs", "/etc/passwd"), ("mid", "imgs/../../x.png")):
        (root / f"{name}.csv").write_text(f"filepath,caption\nimgs/0.png,ok\n{rel},x\n")
        with pytest.raises(
            ValueError, match=rf"{name}\.csv line 3: filepath '{re.escape(rel)}' must be a path inside"
        ):
            ImageTextDataset(root / f"{name}.csv")
    # A symlink that leaves the root passes the string check and is caught when the file is read.
    outside = tmp_path_factory.mktemp("outside")
    _png(outside / "secret.png", 99)
    (root / "imgs" / "link").symlink_to(outside)
    (root / "e.csv").write_text("filepath,caption\nimgs/link/secret.png,x\nimgs/9.png,z\n")
    ds = ImageTextDataset(root / "e.csv")
    with pytest.raises(ValueError, match=r"e\.csv line 2 filepath 'imgs/link/secret\.png' escapes"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="9.png"):
        ds[1]


# ---- LLaVA JSON ----


def _conv(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_llava_valid_records(root):
    recs = [
        {
            "id": 1,
            "image": "imgs/0.png",
            "conversations": _conv("<image>\nWhat?", "A star.", "Colour?", "Red."),
        },
        {"id": "t", "conversations": _conv("Text only?", "Yes."), "type": "text"},
    ]
    out = load_llava_json(_write(root / "l.json", recs))
    assert out[0]["image_path"] == str((root / "imgs/0.png").resolve()) and "image_path" not in out[1]
    assert out[1]["type"] == "text"
    ds = LlavaDataset(root / "l.json", transform=lambda im: im.size)
    assert ds[0]["image"] == (9, 7) and ds[1]["image"] is None and len(ds[0]["conversations"]) == 4


@pytest.mark.parametrize(
    "rec, match",
    [
        ({"image": "imgs/0.png", "conversations": _conv("<image>", "a")}, r"record 1: missing field 'id'"),
        ({"id": 2, "image": "imgs/0.png"}, r"record 1: missing field 'conversations'"),
        (
            {"id": 2, "conversations": [{"from": "bot", "value": "x"}]},
            r"record 1: field 'conversations\[0\]\.from' is 'bot'",
        ),
        ({"id": 2, "conversations": [{"from": "gpt", "value": "x"}]}, r"turns must alternate"),
        ({"id": 2, "conversations": [{"from": "human"}]}, r"'conversations\[0\]\.value' must be a string"),
        (
            {"id": 2, "image": "imgs/0.png", "conversations": _conv("no token", "a")},
            r"must hold <image> once",
        ),
        (
            {"id": 2, "image": "imgs/0.png", "conversations": _conv("<image>", "a", "<image>", "b")},
            r"'conversations\[2\]\.value' holds <image>",
        ),
        ({"id": 2, "conversations": _conv("<image>", "a")}, r"the record has no 'image'"),
        (
            {"id": 2, "image": "../x.png", "conversations": _conv("<image>", "a")},
            r"record 1 field 'image'.*escapes",
        ),
        ({"id": 2, "image": 5, "conversations": _conv("<image>", "a")}, r"field 'image' must be"),
    ],
)
def test_llava_malformed_records(root, rec, match):
    good = {"id": 1, "image": "imgs/0.png", "conversations": _conv("<image>\nq", "a")}
    with pytest.raises(LlavaFormatError, match=match):
        load_llava_json(_write(root / "bad.json", [good, rec]))


def test_llava_file_errors(root):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_llava_json(root / "missing.json")
    (root / "broken.json").write_text('[{"id": 1,\n "conversations": [}]')
    with pytest.raises(ValueError, match=r"broken\.json is malformed JSON at line 2"):
        load_llava_json(root / "broken.json")
    with pytest.raises(LlavaFormatError, match="expected a list"):
        load_llava_json(_write(root / "obj.json", {"id": 1}))
    gone = [{"id": 1, "image": "imgs/7.png", "conversations": _conv("<image>", "a")}]
    with pytest.raises(FileNotFoundError, match=r"record 0 field 'image'.*7\.png"):
        load_llava_json(_write(root / "gone.json", gone))
    assert load_llava_json(root / "gone.json", check_images=False)[0]["id"] == 1


# ---- COCO and POPE objects ----


def _coco(**over):
    d = {
        "images": [{"id": 1, "file_name": "imgs/0.png", "width": 9, "height": 7}],
        "categories": [{"id": 2, "name": "star"}, {"id": 1, "name": "circle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 3, 3], "area": 9, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [4, 1, 2, 2], "area": 4, "iscrowd": 0},
        ],
    }
    d.update(over)
    return d


def test_coco_loads_and_indexes(root):
    c = load_coco(_write(root / "c.json", _coco()))
    assert c.class_names == ["circle", "star"]
    assert c.objects_records() == [{"image": "imgs/0.png", "objects": ["star", "circle"]}]
    assert c.image_path(1) == (root / "imgs/0.png").resolve()
    assert len(c.to_pycocotools().getAnnIds(imgIds=[1])) == 3


@pytest.mark.parametrize(
    "over, match",
    [
        ({"images": None}, r"missing list field 'images'"),
        (
            {"annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\]: image_id 5 is not in 'images'",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}]},
            r"annotations\[0\]: category_id 9",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]},
            r"annotations\[0\]: field 'bbox'",
        ),
        ({"annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}, r"annotations\[0\]: field 'bbox'"),
        ({"images": [{"id": 1}]}, r"images\[0\]: missing string field 'file_name'"),
        ({"categories": [{"id": 1}]}, r"categories\[0\]"),
    ],
)
def test_coco_malformed(root, over, match):
    with pytest.raises(ValueError, match=match):
        load_coco(_write(root / "c.json", _coco(**over)))


def test_coco_image_path_escape(root):
    c = load_coco(_write(root / "c.json", _coco(images=[{"id": 1, "file_name": "../../x.png"}])))
    with pytest.raises(ValueError, match="escapes"):
        c.image_path(1)


def test_objects_jsonl_errors_name_the_line(root):
    p = root / "o.jsonl"
    p.write_text('{"image": "a.png", "objects": ["star"]}\n\n{"image": "b.png", "objects": "star"}\n')
    with pytest.raises(ValueError, match=r"o\.jsonl line 3: field 'objects'"):
        load_objects_jsonl(p)
    p.write_text('{"image": "a.png", "objects": ["star"]}\n{"image": "b.png", \n')
    with pytest.raises(ValueError, match=r"o\.jsonl line 2 is malformed JSON"):
        load_objects_jsonl(p)
    p.write_text('{"objects": ["star"]}\n')
    with pytest.raises(ValueError, match=r"line 1: missing string field 'image'"):
        load_objects_jsonl(p)
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
        load_objects_jsonl(root / "none.jsonl")


# ---- webdataset shards ----


def test_webdataset_round_trip_is_exact_and_deterministic(tmp_path):
    samples = [
        (f"s/{i:04d}", _png(tmp_path / "src" / f"{i}.png", 10 + i), "png", f"caption {i}") for i in range(7)
    ]
    paths = write_shards(samples, tmp_path / "a", maxcount=3)
    again = write_shards(samples, tmp_path / "b", maxcount=3)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    ds = TarImageTextDataset(str(tmp_path / "a" / "shard-{000000..000002}.tar"))
    assert len(ds) == 7
    for i, (key, img, _, cap) in enumerate(samples):
        k, image, caption = ds.sample(i)
        assert k == key and caption == cap
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(img)).convert("RGB")))
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers get copies without open handles
    assert clone[6][1] == "caption 6"
    tok = TarImageTextDataset(
        paths, transform=lambda im: im.size, tokenizer=lambda caps: [c.upper() for c in caps]
    )
    assert tok[0] == ((9, 7), "CAPTION 0")


def test_webdataset_from_csv_and_errors(root, tmp_path):
    (root / "p.csv").write_text("filepath,caption\nimgs/0.png,zero\nimgs/2.png,two\n")
    shards = csv_to_shards(root / "p.csv", tmp_path / "sh")
    assert [c for _, c in TarImageTextDataset(shards)] == ["zero", "two"]
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        TarImageTextDataset(tmp_path / "nope.tar")
    lonely = tmp_path / "lonely.tar"
    with tarfile.open(lonely, "w") as tf:
        info = tarfile.TarInfo("k1.png")
        data = (root / "imgs/0.png").read_bytes()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"lonely\.tar sample 'k1' has no caption"):
        TarImageTextDataset(lonely)
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 30)
    with pytest.raises(ValueError, match="junk.tar is not a readable tar"):
        TarImageTextDataset(tmp_path / "junk.tar")
    with pytest.raises(ValueError, match="no dot"):
        write_shards([("a.b", b"", "png", "x")], tmp_path / "z")
    assert [p.name for p in expand_shards("d/x-{08..10}.tar")] == ["x-08.tar", "x-09.tar", "x-10.tar"]


# ---- audio, video, text->media ----


def test_media_readers_and_t2x_errors(tmp_path):
    from mmfast.data._media import write_wav

    x = np.sin(np.linspace(0, 100, 1600)).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", x)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and np.abs(y - x).max() < 1e-4
    (tmp_path / "bad.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(ValueError, match="bad.wav is not a readable WAV"):
        read_wav(tmp_path / "bad.wav")
    frames = tmp_path / "clip"
    for i in range(3):
        _png(frames / f"{i:03d}.png", i)
    assert len(read_video(frames)) == 3
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "none.gif")
    good = [{"id": "1", "caption": "a tone", "audio": "a.wav"}]
    assert load_t2x_json(_write(tmp_path / "t.json", good))[0]["path"] == str((tmp_path / "a.wav").resolve())
    with pytest.raises(ValueError, match=r"record 0: missing string field 'caption'"):
        load_t2x_json(_write(tmp_path / "t.json", [{"id": "1", "audio": "a.wav"}]))
    with pytest.raises(ValueError, match=r"record 0 field 'audio'.*escapes"):
        load_t2x_json(_write(tmp_path / "t.json", [{"caption": "x", "audio": "../a.wav"}]))
    with pytest.raises(ValueError, match=r"record 1: missing field 'audio_name'"):
        load_t2x_json(_write(tmp_path / "t.json", good + [{"caption": "x", "video": "v.gif"}]))
    nextgpt = [{"caption": "a tone", "audio_name": "a.wav"}]
    assert load_t2x_json(_write(tmp_path / "n.json", nextgpt))[0]["path"] == str(
        (tmp_path / "a.wav").resolve()
    )
    with pytest.raises(FileNotFoundError, match=r"record 0 field 'audio_name'.*b\.wav"):
        load_t2x_json(_write(tmp_path / "n.json", [{"caption": "x", "audio_name": "b.wav"}]))


def test_package_exports_resolve():
    from mmfast import data

    for name in data.__all__:
        assert callable(getattr(data, name)), name
    with pytest.raises(AttributeError, match="no_such"):
        _ = data.no_such
