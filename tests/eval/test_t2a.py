"""eval/t2a.py: the judge of text->audio names the class of the world's held-out clips and of fresh, noisy clips
of each class, learns that from the labels (permuted labels: chance or worse), and refuses bad input clearly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    d = tmp_path_factory.mktemp("world")
    make_world(d, 12, 32, seed=5, media=True, n_videos=2, audio_per_class=4)
    return d


@pytest.fixture(scope="module")
def judge(world):
    from mmfast.eval.t2a import AudioJudge

    return AudioJudge.fit(world)


def test_judge_names_the_held_out_clips(world, judge):
    from mmfast.eval.t2a import load_clips

    waves, labels, captions = load_clips(world, "val")
    assert waves.shape == (16, 16000) and sorted(labels) == list(range(16))  # every class held out once
    train_ids = {tuple(w[:64].tolist()) for w in load_clips(world, "train")[0]}
    assert not any(tuple(w[:64].tolist()) in train_ids for w in waves)  # clips the judge never saw
    assert judge.accuracy(waves, labels) >= 15 / 16
    assert all(c.startswith("the sound of ") for c in captions)


def test_judge_names_fresh_noisy_shifted_quiet_clips(judge):
    # what a decoder draws is never the world's clip: another draw of each class, then degraded
    from mmfast.data._media import synth_clip

    rng = np.random.default_rng(1234)
    waves = torch.stack([torch.from_numpy(synth_clip(k, rng)) for k in range(16)])
    noise = torch.randn(waves.shape, generator=torch.Generator().manual_seed(0))
    for w in (waves, waves + 0.1 * noise, torch.roll(waves, 800, 1), 0.1 * waves):
        assert judge.accuracy(w, list(range(16))) >= 15 / 16


def test_judge_learns_from_the_labels(world):
    from sklearn.linear_model import LogisticRegression

    from mmfast.eval.t2a import features, load_clips

    xtr, ytr, _ = load_clips(world, "train")
    xva, yva, _ = load_clips(world, "val")
    perm = np.random.default_rng(0).permutation(ytr)
    assert (perm != np.asarray(ytr)).mean() > 0.8
    clf = LogisticRegression(max_iter=2000).fit(features(xtr), perm)
    assert (clf.predict(features(xva)) == np.asarray(yva)).mean() <= 0.25


def test_bad_input_is_named(tmp_path, judge):
    from mmfast.eval.t2a import features, load_clips

    with pytest.raises(FileNotFoundError, match="--data .*t2x_audio.json"):
        load_clips(tmp_path, "val")
    with pytest.raises(ValueError, match="waves must be"):
        features(torch.zeros(16000))
    with pytest.raises(ValueError, match="sample_rate"):
        features(torch.zeros(1, 16000), sample_rate=22050)
