"""The judge of text->audio (issue #24): a classifier of the world's real clips, to name the class of a generated one.

Each class of the synthetic world sounds its own (pitch, timbre, beats) triple (:func:`mmfast.data._media.class_sound`).
The features say all three without learning anything: the log power spectrum averaged over the clip (pitch and
timbre; 7.8 Hz bins from 100 Hz to 5 kHz, where the classes' partials lie) and the frame energy envelope (the
beats), each standardised per clip so loudness does not count. A logistic regression fitted on the train split's
clips names the class; its accuracy on the held-out clips (``val``) is the ceiling a generated clip can reach.

    judge = AudioJudge.fit(world)                   # the train split's real clips
    judge.accuracy(waves, labels)                   # (N, T) float waveforms at 16 kHz

    mmfast eval t2a --pipeline runs/dec/audio/final/pipeline --data WORLD   # a decoder on the val captions

``mmfast eval t2a`` draws one clip per held-out (``val``) clip of the world from its caption, through the decoder
fed its own text encoder (as NExT-GPT's generation conditions it, :func:`mmfast.models.nextgpt.decoders.decode`),
and reports ``t2a_top1``, the judge's accuracy on them, beside ``real_top1`` (the real held-out clips: the
ceiling) and ``vocoder_top1`` (the real clips' log-mels through the pipeline's vocoder: what the vocoder keeps).
The world's captions name the class, its timbre and its beats, so every clip of a class shares its caption:
held out are the clips, not the sentences.
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


def evaluate(pipeline, world: str | Path, seed: int = 0, steps: int = 25, guidance_scale: float = 3.0,
             save_dir: str | Path | None = None) -> dict:
    """Generate a clip for each held-out clip's caption and judge it (see the module's doc)."""
    import time

    from mmfast.models.nextgpt import decoders as nd

    pipe = pipeline
    if isinstance(pipeline, (str, Path)):
        from mmfast.models.nextgpt.shipped import read_pipeline

        if not Path(pipeline).is_dir():
            raise FileNotFoundError(f"--pipeline {pipeline}: no such folder")
        pipe = read_pipeline(pipeline)
    judge = AudioJudge.fit(world)
    waves, labels, captions = load_clips(world, "val")
    seconds = waves.shape[1] / SAMPLE_RATE
    t0 = time.perf_counter()
    gen = torch.as_tensor(nd.decode("audio", pipe, nd.text_condition("audio", pipe, captions), steps=steps, seed=seed,
                                    guidance_scale=guidance_scale, audio_length_in_s=seconds)).float()
    gen_s = time.perf_counter() - t0
    with torch.no_grad():
        resynth = pipe.vocoder(nd.vocoder_mel(pipe, waves)).float()
    if save_dir is not None:
        from mmfast.data._media import write_wav

        for i, w in enumerate(gen):
            write_wav(Path(save_dir) / f"t2a_{i:02d}_{labels[i]:02d}.wav", w.numpy())
    return {"t2a_top1": judge.accuracy(gen, labels), "real_top1": judge.accuracy(waves, labels),
            "vocoder_top1": judge.accuracy(resynth, labels), "n": len(labels), "chance": 1.0 / len(set(labels)),
            "steps": steps, "guidance_scale": guidance_scale, "seed": seed, "generate_seconds": round(gen_s, 1)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    from mmfast.utils.io import atomic_write_json

    p = argparse.ArgumentParser(prog="mmfast eval t2a", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="an AudioLDM pipeline folder (RUN/final/pipeline)")
    p.add_argument("--data", required=True, help="the synthetic world with media (its val clips are held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="DDIM sampling steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--save-dir", default=None, help="write the generated clips here (WAV)")
    p.add_argument("--out", default=None, help="write the result JSON here too")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps {a.steps}: must be >= 1")
    try:
        res = evaluate(a.pipeline, a.data, a.seed, a.steps, a.guidance_scale, a.save_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmfast eval t2a: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if a.out:
        atomic_write_json(a.out, res)
    return 0


__all__ = ["AudioJudge", "evaluate", "features", "load_clips"]
