"""eval/t2v.py: the judges of text->video. The direction judge reads the way the world's real single movers go
(every one, forwards and reversed, with noise), says None for still frames (noisy too); captions parse into
(class, direction) or fail naming the caption; the frame judge averages a classifier over every frame."""
from __future__ import annotations

import numpy as np
import pytest
import torch

OPPOSITE = {"to the right": "to the left", "to the left": "to the right", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    d = tmp_path_factory.mktemp("world")
    make_world(d, 40, 32, seed=3, media=True, n_videos=120, audio_per_class=2)
    return d


def test_direction_of_the_worlds_videos(world):
    from mmfast.eval.t2v import direction_accuracy, load_videos, motion_direction

    for split in ("train", "val"):
        videos, _, movers = load_videos(world, split)
        assert len(videos) >= 10 and all(len(m) == 1 for m in movers) and videos[0].shape == (8, 32, 32, 3)
        dirs = [m[0][1] for m in movers]
        assert len(set(dirs)) == 4
        assert direction_accuracy(videos, dirs) == 1.0
        assert direction_accuracy([v[::-1] for v in videos], [OPPOSITE[d] for d in dirs]) == 1.0
        rng = np.random.default_rng(0)
        noisy = [np.clip(v + rng.normal(0, 0.1, v.shape), 0, 1) for v in videos]
        assert direction_accuracy(noisy, dirs) >= 0.95
        for v in videos:
            still = np.repeat(v[:1], 8, 0)
            assert motion_direction(still) is None
            assert motion_direction(np.clip(still + rng.normal(0, 0.05, still.shape), 0, 1)) is None
    both = load_videos(world, "val", single=False)[2]
    assert any(len(m) == 2 for m in both)


def test_parse_caption_and_bad_input(world, tmp_path):
    from mmfast.eval.t2v import load_videos, motion_direction, parse_caption

    classes = ["car", "star"]
    assert parse_caption("a red car moving to the left and a big star moving up", classes) == [
        ("car", "to the left"), ("star", "up")]
    with pytest.raises(ValueError, match="'a red car' is not"):
        parse_caption("a red car", classes)
    with pytest.raises(ValueError, match="'tree' is not a class"):
        parse_caption("a green tree moving down", classes)
    with pytest.raises(FileNotFoundError, match="--data .*t2x_video.json"):
        load_videos(tmp_path, "val")
    with pytest.raises(ValueError, match="frames must be"):
        motion_direction(np.zeros((1, 8, 8, 3)))


def test_frame_top1_averages_over_every_frame(monkeypatch):
    from mmfast.eval import t2i
    from mmfast.eval import zeroshot as zs
    from mmfast.eval.t2v import frame_top1

    # a stand-in CLIP: a frame's feature is its first pixel's colour, the classes are the three channels
    monkeypatch.setattr(t2i, "clip_image_features", lambda clip, x: x[:, 0, 0, :].double())
    monkeypatch.setattr(zs, "zeroshot_classifier", lambda clip, classes, templates: torch.eye(3, dtype=torch.float64))

    def video(channels):
        v = np.zeros((len(channels), 4, 4, 3), np.float32)
        for f, c in enumerate(channels):
            v[f, :, :, c] = 1.0
        return v

    videos = [video([0] * 6 + [1] * 2), video([2] * 4)]
    assert frame_top1(None, videos, [0, 2], ["r", "g", "b"]) == pytest.approx((6 / 8 + 1.0) / 2)
    assert frame_top1(None, videos, [1, 0], ["r", "g", "b"]) == pytest.approx((2 / 8 + 0.0) / 2)
