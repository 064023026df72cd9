"""Issue #24 experiment (not part of the package): does a video UNet take a clip's motion from its caption or from
the trace of a clip that Stable Diffusion's schedule leaves in the noise? On SD's schedule the last training step
keeps 0.068 x the clean latents (DDIM's first step of 20, t = 951: 0.090). For 32 held-out single-mover clips it
samples three ways (guidance 3, 20 DDIM steps): from pure noise with the caption's direction flipped; from the
clip's latents at DDIM's first noise level (sqrt(abar) x the clip + the same noise) with the flipped caption; the
same with the true caption. It prints how often the drawn motion follows the real clip and the flipped caption.

    python docs/experiments/video_leak_probe.py CKPT [ema]

CKPT: a "ckpt" file of docs/experiments/video_decoder_sweep.py trained with noise prediction on SD's schedule (the
recipe before zero terminal SNR). The world: .gpuexp/world."""
import sys

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler

from mmfast.eval.t2v import motion_direction
from mmfast.models.nextgpt.shipped import read_pipeline
from mmfast.training import diffusion_parts as D
from mmfast.training.video_decoder import WorldVideos, build_pipeline, video_betas

torch.set_num_threads(1)
pipe = build_pipeline(read_pipeline("mmfast/models/nextgpt/weights/image"), "epsilon")
m = D.UNetModule(pipe, 0.0, 5.0, context_per_frame=True)
st = torch.load(sys.argv[1], weights_only=True)
m.load_state_dict(st["module"])
if len(sys.argv) > 2 and sys.argv[2] == "ema":
    for p, s in zip([p for p in m.parameters() if p.requires_grad], st["ema"]["shadow_params"], strict=True):
        p.data.copy_(s)
m.eval()
print("step", st["step"])
ep = AnimateDiffPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                         motion_adapter=None, scheduler=DDIMScheduler(**video_betas("epsilon"), set_alpha_to_one=False))
ep.set_progress_bar_config(disable=True)
data = WorldVideos(".gpuexp/world", 32, 4, split="val")
keep = [i for i, c in enumerate(data.captions) if " and " not in c][:32]
caps = [data.captions[i] for i in keep]
real = [c.split(" moving ")[1] for c in caps]
flip = {"to the left": "to the right", "to the right": "to the left", "up": "down", "down": "up"}
flipped = [c.split(" moving ")[0] + " moving " + flip[r] for c, r in zip(caps, real, strict=True)]
vae = pipe.vae
with torch.no_grad():
    mu = vae.encode(data.pixels[keep].flatten(0, 1)).latent_dist.mean * vae.config.scaling_factor
clip = mu.view(len(keep), 4, *mu.shape[1:]).transpose(1, 2)  # (N, 4, F, h, w)
ep.scheduler.set_timesteps(20)
t0 = int(ep.scheduler.timesteps[0])
ab = ep.scheduler.alphas_cumprod[t0]
print(f"DDIM's first step t = {t0}: sqrt(abar) = {float(ab.sqrt()):.3f}")
noise = torch.randn(clip.shape, generator=torch.Generator().manual_seed(0))
leaked = ab.sqrt() * clip + (1 - ab).sqrt() * noise


def draw(prompts, latents):
    out = []
    for i in range(0, len(prompts), 16):
        out.append(ep(prompt=prompts[i:i + 16], negative_prompt=[""] * len(prompts[i:i + 16]), num_frames=4,
                      num_inference_steps=20, guidance_scale=3.0, latents=latents[i:i + 16], output_type="np").frames)
    return np.concatenate(out)


for name, latents, prompts in [("pure noise, flipped caption", noise, flipped),
                               ("the clip leaked, flipped caption", leaked, flipped),
                               ("the clip leaked, true caption", leaked, caps)]:
    dirs = [motion_direction(v) for v in draw(prompts, latents)]
    follows_clip = np.mean([a == b for a, b in zip(dirs, real, strict=True)])
    follows_caption = np.mean([a == flip[b] if prompts is flipped else a == b for a, b in zip(dirs, real, strict=True)])
    print(f"{name}: motion follows the real clip {follows_clip:.2f}, the prompt's caption {follows_caption:.2f}",
          flush=True)
