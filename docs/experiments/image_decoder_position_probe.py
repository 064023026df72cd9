"""Where does the shipped image decoder put an object for the video world's direction words (and the image world's
position words)? 8 objects x 4 seeds a phrase, guidance 4, 20 DDIM steps; the mean centroid of the foreground
(pixels away from the border's median colour) and the share left of / above the centre.

    python docs/experiments/image_decoder_position_probe.py     # from the repository root, in .venv
"""
import numpy as np

from mmfast.eval import t2i
from mmfast.models.nextgpt import shipped

OBJECTS = ["a red car", "a blue fish", "a yellow star", "a green tree", "a white cup", "an orange heart",
           "a purple house", "a pink flower"]
PHRASES = ["moving to the left", "moving to the right", "moving up", "moving down",
           "on the left", "on the right", "at the top", "at the bottom"]


def centroid(img: np.ndarray) -> tuple[float, float]:
    a = (img * 255).astype(np.int32)
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    fg = np.abs(a - bg).sum(-1) > 60
    if fg.sum() < 3:
        return np.nan, np.nan
    ys, xs = np.nonzero(fg)
    return xs.mean(), ys.mean()


def main() -> None:
    pipe = shipped.load("image")
    for phrase in PHRASES:
        prompts = [f"{o} {phrase}" for o in OBJECTS for _ in range(4)]
        imgs = t2i.generate(pipe, prompts, seed=0, steps=20, guidance_scale=4.0, batch_size=len(prompts)).numpy()
        c, mid = np.array([centroid(x) for x in imgs]), imgs.shape[1] / 2
        print(f"{phrase:22s} x {np.nanmean(c[:, 0]):5.1f}  y {np.nanmean(c[:, 1]):5.1f}  (size {imgs.shape[1]}; "
              f"left of centre {np.nanmean(c[:, 0] < mid):.2f}, above {np.nanmean(c[:, 1] < mid):.2f})", flush=True)


if __name__ == "__main__":
    main()
