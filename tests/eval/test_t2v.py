"""eval/t2v.py: the judges of text->video. The direction judge reads the way the world's real single movers go
(every one, forwards and reversed, with noise), says None for still frames (noisy too); captions parse into
(class, direction) or fail naming the caption; the frame judge crops each frame to its object, learns the classes
from the world's real frames and averages over every frame; ``evaluate`` judges what the pipeline draws."""
from __future__ import annotations

import json

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


def test_crop_to_object_centres_the_object():
    from mmfast.eval.t2v import crop_to_object

    f = np.full((32, 32, 3), 0.2, np.float32)
    f[2:8, 24:30] = (1.0, 0.0, 0.0)  # a 6 x 6 red square in the top right corner
    c = crop_to_object(f, pad=1.0)  # a 12 x 12 window around it, scaled to 32 x 32: the square fills the middle half
    assert c.shape == (32, 32, 3)
    red = c[..., 0] > 0.6
    ys, xs = np.nonzero(red)
    assert 7 <= ys.min() <= 9 and 23 <= ys.max() <= 25 and 7 <= xs.min() <= 9 and 23 <= xs.max() <= 25
    assert np.allclose(c[0, 0], 0.2, atol=0.01)  # past the frame's edge: the background colour
    blank = np.full((16, 16, 3), 0.5, np.float32)
    assert np.array_equal(crop_to_object(blank), blank)


def test_frame_accuracy_averages_frames_within_each_video():
    from mmfast.eval.t2v import FrameJudge

    # a stand-in net: the class of a (blank, so uncropped) frame is its brightest channel
    judge = FrameJudge(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), ["r", "g", "b"])

    def video(channels):
        v = np.zeros((len(channels), 4, 4, 3), np.float32)
        for f, c in enumerate(channels):
            v[f, :, :, c] = 1.0
        return v

    videos = [video([0] * 6 + [1] * 2), video([2] * 4)]
    assert [p.tolist() for p in judge.predict(videos)] == [[0] * 6 + [1] * 2, [2] * 4]
    assert judge.frame_accuracy(videos, [0, 2]) == pytest.approx((6 / 8 + 1.0) / 2)
    assert judge.frame_accuracy(videos, [1, 0]) == pytest.approx((2 / 8 + 0.0) / 2)


@pytest.fixture(scope="module")
def big_world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    d = tmp_path_factory.mktemp("vworld")
    make_world(d, 40, 32, seed=4, media=True, n_videos=2000, video_frames=4, audio_per_class=1)
    return d


@pytest.mark.slow
def test_frame_judge_learns_the_worlds_classes(big_world):
    from mmfast.eval.t2v import FrameJudge, load_videos

    torch.manual_seed(123)
    judge = FrameJudge.fit(big_world)
    assert torch.rand(()) == torch.rand((), generator=torch.Generator().manual_seed(123))  # fit left torch's RNG
    videos, _, movers = load_videos(big_world, "val")
    labels = [judge.classes.index(m[0][0]) for m in movers]
    acc = judge.frame_accuracy(videos, labels)
    assert len(videos) >= 200 and acc >= 0.6, acc  # chance 1/16; ~960 training videos
    # deterministic for a seed
    a, b, c = (FrameJudge.fit(big_world, epochs=1, max_videos=40, seed=s).net.state_dict() for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_evaluate_judges_what_the_pipeline_draws(big_world, tmp_path):
    # a stand-in pipeline that draws each prompt's real held-out video, or that video reversed: the judges see
    # the real clips' scores in the first case, and every direction wrong in the second
    from mmfast.eval.t2v import FrameJudge, evaluate, load_video, load_videos

    videos, captions, _ = load_videos(big_world, "val")
    by_caption = dict(zip(captions, videos))

    class Pipe:
        reverse = False

        def __call__(self, prompt, num_frames, **kw):
            assert num_frames == 4 and kw["negative_prompt"] == [""] * len(prompt)
            out = np.stack([by_caption[p][::-1] if self.reverse else by_caption[p] for p in prompt])
            return type("Out", (), {"frames": out})

    judge = FrameJudge(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 16)),
                       json.loads((big_world / "classes.json").read_text()))
    pipe = Pipe()
    res = evaluate(pipe, big_world, n=20, frame_judge=judge, save_dir=tmp_path / "gifs")
    assert res["n"] == 20 and res["t2v_top1"] == res["real_top1"] and res["t2v_direction_acc"] == 1.0
    gifs = sorted((tmp_path / "gifs").glob("*.gif"))
    assert len(gifs) == 20 and np.array_equal(load_video(gifs[0]), by_caption[captions[0]])  # world GIFs: exact
    pipe.reverse = True
    assert evaluate(pipe, big_world, n=20, frame_judge=judge)["t2v_direction_acc"] == 0.0


def test_a_still_clip_is_one_gif_frame_and_moves_nowhere():
    from mmfast.eval.t2v import as_gifs, direction_accuracy

    still = np.full((4, 8, 8, 3), 0.25, np.float32)
    still[:, 2:4, 2:4] = 1.0
    moving = np.full((4, 8, 8, 3), 0.25, np.float32)
    for f in range(4):
        moving[f, 2:4, f:f + 2] = 1.0  # to the right
    s, m = as_gifs([still, moving])
    assert s.shape == (1, 8, 8, 3) and m.shape == (4, 8, 8, 3)  # PIL merges identical frames
    assert direction_accuracy([s, m], ["to the right", "to the right"]) == 0.5
