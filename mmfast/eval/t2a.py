"""The judge of text->audio (issue #24): a classifier of the world's real clips, to name the class of a generated one.

Each class of the synthetic world sounds its own (pitch, timbre, beats) triple (:func:`mmfast.data._media.class_sound`).
The features say all three without learning anything: the log power spectrum averaged over the clip (pitch and
timbre; 7.8 Hz bins from 100 Hz to 5 kHz, where the classes' partials lie) and the frame energy envelope (the
beats), each standardised per clip so loudness does not count. A logistic regression fitted on the train split's
clips names the class; its accuracy on the held-out clips (``val``) is the ceiling a generated clip can reach.

    judge = AudioJudge.fit(world)                   # the train split's real clips
    judge.accuracy(waves, labels)                   # (N, T) float waveforms at 16 kHz
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 2048
HOP = 256
BAND_HZ = (100.0, 5000.0)
ENVELOPE_FRAMES = 32


def features(waves: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(N, F) float64 features of (N, T) waveforms: the standardised mean log power spectrum in ``BAND_HZ`` and the
    standardised frame-energy envelope resampled to ``ENVELOPE_FRAMES`` frames."""
    if waves.dim() != 2 or waves.shape[1] < N_FFT:
        raise ValueError(f"waves must be (N, T) with T >= {N_FFT} samples, got {tuple(waves.shape)}")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"sample_rate must be {SAMPLE_RATE} (the world's), got {sample_rate}")
    x = waves.double()
    spec = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT, dtype=x.dtype), return_complex=True).abs() ** 2
    freqs = torch.fft.rfftfreq(N_FFT, 1.0 / sample_rate, dtype=x.dtype)
    band = (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])
    profile = torch.log(spec[:, band].mean(-1) + 1e-10)  # (N, bins)
    energy = torch.log(spec.sum(1) + 1e-10)  # (N, frames)
    env = torch.nn.functional.interpolate(energy[:, None], size=ENVELOPE_FRAMES, mode="linear",
                                          align_corners=True)[:, 0]

    def standardise(f):
        return (f - f.mean(-1, keepdim=True)) / (f.std(-1, keepdim=True) + 1e-6)

    return torch.cat([standardise(profile), standardise(env)], 1).numpy()


def load_clips(world: str | Path, split: str) -> tuple[torch.Tensor, list[int], list[str]]:
    """(N, T) waveforms of ``split``'s clips, their class indices and captions, from ``t2x_audio.json``."""
    from mmfast.data.media import read_wav, world_t2x

    records, classes = world_t2x(world, "audio", split)
    index = {c: i for i, c in enumerate(classes)}
    waves, labels, captions = [], [], []
    for r in records:
        cls = r["id"].rsplit("_", 1)[0]
        if cls not in index:
            raise ValueError(f"t2x_audio.json: clip {r['id']!r} names no class of classes.json")
        wav, rate = read_wav(r["path"])
        if rate != SAMPLE_RATE:
            raise ValueError(f"{r['audio_name']}: {rate} Hz, expected {SAMPLE_RATE}")
        waves.append(torch.as_tensor(np.asarray(wav, dtype=np.float32)))
        labels.append(index[cls])
        captions.append(r["caption"])
    if not waves:
        raise ValueError(f"--data {world}: no {split} clips in t2x_audio.json")
    n = min(len(w) for w in waves)
    return torch.stack([w[:n] for w in waves]), labels, captions


class AudioJudge:
    """A logistic regression on :func:`features`, fitted on real clips."""

    def __init__(self, clf):
        self.clf = clf

    @classmethod
    def fit(cls, world: str | Path, split: str = "train", C: float = 1.0) -> AudioJudge:
        from sklearn.linear_model import LogisticRegression

        waves, labels, _ = load_clips(world, split)
        return cls(LogisticRegression(C=C, max_iter=2000).fit(features(waves), labels))

    def predict(self, waves: torch.Tensor) -> np.ndarray:
        return self.clf.predict(features(waves))

    def accuracy(self, waves: torch.Tensor, labels) -> float:
        return float((self.predict(waves) == np.asarray(labels)).mean())


__all__ = ["AudioJudge", "features", "load_clips"]
