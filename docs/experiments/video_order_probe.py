"""Issue #24 experiment (not part of the package): does a video UNet (velocity prediction at zero terminal SNR)
know which frame is first? Two measures on held-out single-mover clips:

* order: the UNet on a noised clip and on the same clip played backwards (the same noise, reversed); if it
  ignored the order of the frames, its output for the reversed clip would be its output for the clip, reversed.
  Printed: |f(rev x) - rev f(x)| / |f(x)| per timestep (0: blind to the order), for the clip's own caption.
* the clean clip it draws from nothing: at the last training step (t = 999, where zero terminal SNR leaves only
  noise) the velocity is minus the clean latents, so -f(noise) is the UNet's whole guess of the clip; decoded,
  the foreground's centroid per frame, averaged over 8 captions a direction (guidance 3).

    python docs/experiments/video_order_probe.py WORLD [CKPT [ema]]

CKPT: a "ckpt" file of video_decoder_sweep.py run with "pred": "v_prediction", "zsnr": true (its weights, or with
``ema`` its EMA); none: the start (the image decoder on every frame, the motion modules' frame-position start)."""
import sys

import torch

from mmfast.models.nextgpt.shipped import read_pipeline
from mmfast.training import diffusion_parts as D
from mmfast.training.video_decoder import WorldVideos, build_pipeline

torch.set_num_threads(1)
world = sys.argv[1]
ck = sys.argv[2] if len(sys.argv) > 2 else None
pipe = build_pipeline(read_pipeline("mmfast/models/nextgpt/weights/image"), "v_prediction")
m = D.UNetModule(pipe, 0.0, 0.0, context_per_frame=True)
if ck:
    st = torch.load(ck, weights_only=True)
    m.load_state_dict(st["module"])
    if len(sys.argv) > 3 and sys.argv[3] == "ema":
        for p, s in zip([p for p in m.parameters() if p.requires_grad], st["ema"]["shadow_params"], strict=True):
            p.data.copy_(s)
    print("step", st["step"])
m.eval()
data = WorldVideos(world, 32, 4, split="val")
keep = [i for i, c in enumerate(data.captions) if " and " not in c]
pix, caps = data.pixels[keep], [data.captions[i] for i in keep]
sched, vae = pipe.scheduler, pipe.vae
g = torch.Generator().manual_seed(0)
with torch.no_grad():
    n = 32
    mean = vae.encode(pix[:n].flatten(0, 1)).latent_dist.mean * vae.config.scaling_factor
    lat = mean.view(n, 4, *mean.shape[1:]).transpose(1, 2)  # (n, 4, F, 16, 16)
    cond = m.text_encoder(D.token_ids(pipe, caps[:n]))[0].repeat_interleave(4, 0)
    noise = torch.randn(lat.shape, generator=g)
    for t in (999, 900, 700, 500, 200):
        tt = torch.full((n,), t)
        x = sched.add_noise(lat, noise, tt)
        f = m.unet(x, tt, encoder_hidden_states=cond).sample
        fr = m.unet(x.flip(2), tt, encoder_hidden_states=cond).sample
        print(f"order t={t}: |f(rev x) - rev f(x)| / |f(x)| = {float((fr - f.flip(2)).norm() / f.norm()):.4f}", flush=True)
    by: dict[str, list[str]] = {}
    for c in caps:
        by.setdefault(c.split(" moving ")[1], []).append(c)
    xs = torch.arange(32.0)
    for d, cs in sorted(by.items()):
        cs = cs[:8]
        k = len(cs)
        cond = m.text_encoder(D.token_ids(pipe, cs + [""] * k))[0].repeat_interleave(4, 0)
        x = torch.randn(k, 4, 4, 16, 16, generator=g)
        vc, vu = m.unet(torch.cat([x, x]), torch.full((2 * k,), 999), encoder_hidden_states=cond).sample.chunk(2)
        x0 = -(vu + 3.0 * (vc - vu))
        fr = vae.decode((x0 / vae.config.scaling_factor).transpose(1, 2).flatten(0, 1)).sample.view(k, 4, 3, 32, 32)
        border = torch.cat([fr[..., 0, :], fr[..., -1, :], fr[..., :, 0], fr[..., :, -1]], -1)
        w = (fr - border.median(-1).values[..., None, None]).norm(dim=2)
        mass = w.sum((2, 3))
        cx = ((w.sum(2) * xs).sum(-1) / mass).mean(0)
        cy = ((w.sum(3) * xs).sum(-1) / mass).mean(0)
        print(f"t=999 x0 {d:14s} cx {cx.numpy().round(1)} cy {cy.numpy().round(1)}", flush=True)
