"""Issue #24 experiment (not part of the package): one video-decoder recipe trained in plain PyTorch on one
device (the step of mmfast.training.video_decoder without DeepSpeed), judged by mmfast.eval.t2v at fixed
steps; the figures in docs/nextgpt_decoders.md ("More recipes", "Longer, and other starts") came from it, on a
lent H200 and on the 2-core machine.

    python docs/experiments/video_decoder_sweep.py '{"name": "F", "lr": 5e-4, "single": true, "device": "cpu"}' OUT 3600

argv: a JSON config (keys below), a results folder (OUT/NAME.jsonl), seconds allowed. Needs, under .gpuexp/
(or the config's "world" / "judge"): world/ with the seed-2 video world's video/, t2x_video.json and
classes.json (mmfast data synth --images 200 --size 32 --seed 2 --videos 4096 --video-frames 4), and judge.pt,
the state dict of mmfast.eval.t2v.FrameJudge.fit(world).net.

Config keys beyond the learning rate: "train" (all, motion, motion_text, split with "lr_rest"), "single"
(single movers only), "batch", "total" (cosine length), "evals", "eval_n", "pred", "snr", "trunc"
(truncated-SNR weights instead of Min-SNR), "ema" (an EMA of the weights, diffusers' EMAModel with warm-up,
judged beside the raw weights), "ckpt" (a file: the run saves its state there every 500 steps and at each
judgement, and a run started again resumes from it), "zsnr" (Stable Diffusion's schedule rescaled to zero terminal
SNR with trailing timesteps, for "pred": "v_prediction"; without it every run has SD's own schedule), "init" (start
from another run's "ckpt" weights, with a fresh optimizer), "posmap" (a learned absolute-position map added to the
UNet's conv_in output: not a diffusers option), "reverse" (half of every batch the other half's clips played
backwards, their directions exchanged: the package recipe's --reverse-pairs since 2026-12-05), "hflip" (every clip
also mirrored left-right, its left and right exchanged). The runs before 2026-12-04's frame-position start
(mmfast.models.nextgpt.decoders.video_unet) had diffusers' own motion-module start; every run since has the
frame-position start, as build_pipeline gives it."""
import os
import sys
import time

import torch
from video_common import Experiment

X = Experiment()
cfg, out, name, t_start, deadline = X.cfg, X.out, X.name, X.t_start, X.deadline
dev = torch.device(cfg.get("device", "cuda"))
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(cfg.get("seed", 0))

from diffusers import AnimateDiffPipeline, DDIMScheduler, DDPMScheduler

from mmfast.eval.t2v import evaluate
from mmfast.models.nextgpt.shipped import read_pipeline
from mmfast.training import diffusion_parts as D
from mmfast.training.engine import cosine_with_warmup
from mmfast.training.video_decoder import WorldVideos, build_pipeline, reverse_caption

W = X.world
emit = X.emit


pred = cfg.get("pred", "epsilon")
pipe = build_pipeline(read_pipeline("mmfast/models/nextgpt/weights/image"), pred)
# "zsnr": zero terminal SNR (Lin et al. 2024: rescaled betas, trailing timesteps; needs velocity prediction), so
# that the last training step holds no trace of the clip and its layout must come from the caption.
SCHED = {**D.BETAS, "prediction_type": pred,
         **({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if cfg.get("zsnr") else {})}
pipe.scheduler = DDPMScheduler(**SCHED)  # the runs before zsnr: Stable Diffusion's schedule for either prediction
data = WorldVideos(W, 32, cfg.get("frames", 4), max_samples=cfg.get("max_samples"))
if cfg.get("single"):
    keep = [i for i, c in enumerate(data.captions) if " and " not in c]
    data.pixels, data.captions = data.pixels[keep], [data.captions[i] for i in keep]


def swap_words(caption, pairs):
    """The caption with each pair's words exchanged (hflip: left and right only)."""
    for a, b in pairs:
        caption = caption.replace(a, "\0").replace(b, a).replace("\0", b)
    return caption


LEFT_RIGHT = [("moving to the left", "moving to the right")]
if cfg.get("hflip"):
    # Every clip mirrored left-right, its captions' left and right exchanged: twice the clips (a world mover goes
    # straight across, so its mirror is a world clip too; the classes' shapes mirrored).
    data.pixels = torch.cat([data.pixels, data.pixels.flip(-1)])
    data.captions = data.captions + [swap_words(c, LEFT_RIGHT) for c in data.captions]
vae = pipe.vae.to(dev).requires_grad_(False).eval()
n, f = data.pixels.shape[:2]
mean, std = D.encode_posteriors(vae, data.pixels.flatten(0, 1).to(dev))
mean, std = (x.reshape(n, f, *x.shape[1:]).transpose(1, 2).contiguous() for x in (mean, std))
scale = vae.config.scaling_factor
ids = D.token_ids(pipe, data.captions).to(dev)
# "reverse": half of every batch is the other half's clips played backwards, their captions' directions exchanged
# (a world mover starts at the side opposite its motion, so a reversed clip is a world clip of the opposite
# direction): pairs that differ only in the time order and the direction's words.
ids_rev = D.token_ids(pipe, [reverse_caption(c) for c in data.captions]).to(dev) if cfg.get("reverse") else None
snr = cfg.get("snr", 5.0 if pred == "epsilon" else 0.0)
if cfg.get("trunc"):
    # Truncated-SNR weighting of the noise loss: the clean-latent error weighs max(SNR, 1) (as velocity
    # prediction's loss does), so high-noise steps, where the layout is decided, count; capped at trunc.
    cap = float(cfg["trunc"])

    def _trunc(scheduler, t, gamma):
        ac = scheduler.alphas_cumprod.to(t.device)[t].float()
        return torch.clamp(1.0 / (ac / (1.0 - ac)), min=1.0, max=cap)

    D.snr_weights = _trunc
module = D.UNetModule(pipe, cfg.get("uncond", 0.1), snr, context_per_frame=True).to(dev)
if cfg.get("init"):  # start from another run's weights (its "ckpt" file), fresh optimizer
    module.load_state_dict(torch.load(cfg["init"], weights_only=True)["module"])
te, unet = pipe.text_encoder, pipe.unet
extra = []
if cfg.get("posmap"):
    # Experiment: a learned absolute-position map (C, h, w) added to conv_in's output (not a diffusers option).
    posmap = torch.nn.Parameter(torch.zeros(unet.conv_in.out_channels, *mean.shape[-2:], device=dev))
    module.register_parameter("posmap", posmap)
    _conv_in = unet.conv_in.forward
    unet.conv_in.forward = lambda x: _conv_in(x) + posmap
    extra = [posmap]
train = cfg.get("train", "all")
lr = cfg["lr"]
motion = [p for k, p in unet.named_parameters() if "motion_modules" in k]
spatial = [p for k, p in unet.named_parameters() if "motion_modules" not in k]
text = list(te.parameters())
if train == "all":
    groups = [{"params": motion + spatial + text + extra, "lr": lr}]
elif train == "motion":
    groups = [{"params": motion, "lr": lr}]
elif train == "motion_text":
    groups = [{"params": motion + text, "lr": lr}]
elif train == "split":
    groups = [{"params": motion, "lr": lr}, {"params": spatial + text, "lr": cfg["lr_rest"]}]
else:
    raise ValueError(train)
trained = {id(p) for g in groups for p in g["params"]}
for p in module.parameters():
    p.requires_grad_(id(p) in trained)
opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=dev.type == "cuda")
total = cfg.get("total", 6000)
sched = cosine_with_warmup(opt, max(1, total // 20), total)
ema = None
if cfg.get("ema"):
    from diffusers.training_utils import EMAModel
    ema_params = [p for p in module.parameters() if p.requires_grad]
    ema = EMAModel(ema_params, decay=0.9999, use_ema_warmup=True, power=cfg.get("ema_power", 0.75))
bs = cfg.get("batch", 16)
gen = torch.Generator(device="cpu").manual_seed(cfg.get("seed", 0))
evals = set(cfg.get("evals", [500, 1000, 2000, 3000, 4000, 5000, 6000]))
eval_n = cfg.get("eval_n", 64)
fj = X.frame_judge()
emit({"event": "start", "clips": n, "params_trained": sum(p.numel() for p in module.parameters() if p.requires_grad),
      "cfg": cfg})


def run_eval(step, guidances=(3.0,), save=False):
    took = run_eval1(step, guidances, save, "")
    if ema is not None:
        ema.store(ema_params)
        ema.copy_to(ema_params)
        took += run_eval1(step, guidances, save, "ema")
        ema.restore(ema_params)
    return took


def run_eval1(step, guidances, save, tag):
    module.eval()
    ep = AnimateDiffPipeline(vae=vae, text_encoder=te, tokenizer=pipe.tokenizer, unet=unet, motion_adapter=None,
                             scheduler=DDIMScheduler(**SCHED, set_alpha_to_one=False))
    ep.set_progress_bar_config(disable=True)
    t0 = time.time()
    for g in guidances:
        r = evaluate(ep, W, n=eval_n, steps=20, guidance_scale=g, frame_judge=fj,
                     save_dir=f"/tmp/gifs/{name}{tag}_s{step}_g{g:g}" if save else None)
        emit({"event": "eval" + tag, "step": step, "g": g, "top1": round(r["t2v_top1"], 4),
              "dir": round(r["t2v_direction_acc"], 4), "real_top1": round(r["real_top1"], 4),
              "real_dir": round(r["real_direction_acc"], 4), "eval_s": round(time.time() - t0, 1)})
    module.train()
    vae.eval()
    return time.time() - t0


eval_cost = 40.0
module.train()
vae.eval()
step, losses, t_log, s_log = 0, [], time.time(), 0
perm, pos = torch.randperm(n, generator=gen), 0
ck = cfg.get("ckpt")
if ck and os.path.exists(ck):
    st = torch.load(ck, weights_only=True)
    module.load_state_dict(st["module"])
    opt.load_state_dict(st["opt"])
    sched.load_state_dict(st["sched"])
    if ema is not None:
        ema.load_state_dict(st["ema"])
    step, perm, pos = st["step"], st["perm"], st["pos"]
    gen.set_state(st["gen"])
    torch.set_rng_state(st["rng"])
    emit({"event": "resumed", "step": step})
    if step >= total:
        emit({"event": "done", "step": step})
        sys.exit(0)


def save_ckpt():
    if not ck:
        return
    st = {"module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
          "ema": ema.state_dict() if ema is not None else None, "step": step, "perm": perm, "pos": pos,
          "gen": gen.get_state(), "rng": torch.get_rng_state()}
    torch.save(st, ck + ".tmp")
    os.replace(ck + ".tmp", ck)  # a run killed mid-save keeps the last whole checkpoint


while True:
    if pos + (bs // 2 if ids_rev is not None else bs) > n:
        perm, pos = torch.randperm(n, generator=gen), 0
    take = bs // 2 if ids_rev is not None else bs
    rows = perm[pos:pos + take].to(dev)
    pos += take
    latents = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * scale
    if ids_rev is not None:
        loss = module(torch.cat([latents, latents.flip(2)]), torch.cat([ids[rows], ids_rev[rows]]))
    else:
        loss = module(latents, ids[rows])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if ema is not None:
        ema.step(ema_params)
    step += 1
    losses.append(float(loss.detach()) if step % 50 == 0 else None)
    if step % 250 == 0:
        ls = [x for x in losses if x is not None]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        emit({"event": "train", "step": step, "loss": round(sum(ls) / max(1, len(ls)), 5),
              "ms_step": round(1000 * (time.time() - t_log) / (step - s_log), 1)})
        s_log = step
        losses, t_log = [], time.time()
    last = step >= total or time.time() > deadline - 2.2 * eval_cost - 10
    if step % 500 == 0 and step not in evals and not last:
        save_ckpt()
    if step in evals or last:
        save_ckpt()
        took = run_eval(step, (3.0, 5.0) if last else (3.0,), save=last)
        eval_cost = took / 2 if last else took
        t_log, s_log = time.time(), step
    if last:
        break
emit({"event": "done", "step": step})
