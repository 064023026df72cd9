"""Issue #24 experiment (not part of the package): does a video UNet know, on average, where each frame puts its
object? For held-out single-mover captions of each direction it predicts the clean latents from pure noise at
t = 950 and 700 (guidance 3), decodes them, and prints the foreground's centroid per frame averaged over 6
captions (the world's movers cross 15-22 px of the 32-px frame; a model that has learnt the direction moves the
centroid that way).

    python docs/experiments/video_direction_probe.py [CKPT [ema]]

CKPT: a "ckpt" file of docs/experiments/video_decoder_sweep.py (its weights, or with ``ema`` its EMA); none: the
start (the image decoder on every frame, the motion modules' frame-position start). The world: .gpuexp/world."""
import sys

import torch

from mmfast.data.media import world_t2x
from mmfast.models.nextgpt.shipped import read_pipeline
from mmfast.training import diffusion_parts as D
from mmfast.training.video_decoder import build_pipeline

torch.set_num_threads(1)
ck = sys.argv[1] if len(sys.argv) > 1 else None
use_ema = len(sys.argv) > 2 and sys.argv[2] == "ema"
pipe = build_pipeline(read_pipeline("mmfast/models/nextgpt/weights/image"), "epsilon")  # the runs it probed
m = D.UNetModule(pipe, 0.0, 5.0, context_per_frame=True)
if ck:
    st = torch.load(ck, weights_only=True)
    m.load_state_dict(st["module"])
    if use_ema:
        params = [p for p in m.parameters() if p.requires_grad]
        for p, s in zip(params, st["ema"]["shadow_params"], strict=True):
            p.data.copy_(s)
    print("step", st["step"])
m.eval()
recs, _ = world_t2x(".gpuexp/world", "video", "val")
by: dict[str, list[str]] = {}
for r in recs:
    if " and " not in r["caption"]:
        by.setdefault(r["caption"].split(" moving ")[1], []).append(r["caption"])
ac, vae = pipe.scheduler.alphas_cumprod, pipe.vae
g = torch.Generator().manual_seed(0)
xs = torch.arange(32.0)
with torch.no_grad():
    for t in (950, 700):
        for d, caps in sorted(by.items()):
            caps = caps[:6]
            k = len(caps)
            cond = m.text_encoder(D.token_ids(pipe, caps + [""] * k))[0].repeat_interleave(4, 0)
            x = torch.randn(k, 4, 4, 16, 16, generator=g)
            ec, eu = m.unet(torch.cat([x, x]), torch.full((2 * k,), t), encoder_hidden_states=cond).sample.chunk(2)
            eps = eu + 3.0 * (ec - eu)
            x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
            fr = vae.decode((x0 / vae.config.scaling_factor).transpose(1, 2).flatten(0, 1)).sample
            fr = fr.view(k, 4, 3, 32, 32)
            border = torch.cat([fr[..., 0, :], fr[..., -1, :], fr[..., :, 0], fr[..., :, -1]], -1)
            w = (fr - border.median(-1).values[..., None, None]).norm(dim=2)  # (k, 4, 32, 32)
            mass = w.sum((2, 3))
            cx = ((w.sum(2) * xs).sum(-1) / mass).mean(0)
            cy = ((w.sum(3) * xs).sum(-1) / mass).mean(0)
            print(f"t={t} {d:14s} cx {cx.numpy().round(1)} cy {cy.numpy().round(1)}", flush=True)
