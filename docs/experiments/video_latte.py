"""Issue #24 experiment (not part of the package): a tiny Latte video decoder trained from scratch in plain
PyTorch, judged by mmfast.eval.t2v like docs/experiments/video_decoder_sweep.py (same world and judge under
.gpuexp/).

    python docs/experiments/video_latte.py '{"name": "LT1", "lr": 6e-4, "total": 3500}' OUT 4600

Why Latte (diffusers' LatteTransformer3DModel / LattePipeline): its spatial blocks attend over the whole frame
with 2-D positions and, after the first block, every token carries its frame's position (the temporal position
table is added to the stream), so where an object sits in frame k of a clip "moving to the left" is one
cross-attention away; in the AnimateDiff UNet the frame reaches the spatial layers only through what the
motion modules learn to write. The image decoder's VAE (frozen) encodes the frames; a tiny T5 encoder, trained
with it, reads the caption; the transformer predicts noise (its second half of channels, the learned-variance
half LattePipeline drops, is unused). Keys: "lr", "total" (cosine length), "evals", "eval_n", "batch", "dim",
"heads", "layers", "text_dim", "text_layers", "uncond", "single", "save" (a file for the weights at each
judgement)."""

import time

import torch
from video_common import Experiment

X = Experiment()
cfg, out, name, t_start, deadline = X.cfg, X.out, X.name, X.t_start, X.deadline
torch.manual_seed(cfg.get("seed", 0))
from diffusers import DDIMScheduler, DDPMScheduler, LattePipeline, LatteTransformer3DModel
from transformers import T5Config, T5EncoderModel

from mmfast.eval.t2v import evaluate
from mmfast.models.nextgpt.shipped import read_pipeline
from mmfast.training import diffusion_parts as D
from mmfast.training.engine import cosine_with_warmup
from mmfast.training.video_decoder import WorldVideos, video_betas

W = X.world
emit = X.emit


image = read_pipeline("mmfast/models/nextgpt/weights/image")
dev = torch.device(cfg.get("device", "cpu"))
tok, vae = image.tokenizer, image.vae.to(dev).requires_grad_(False).eval()
dm = cfg.get("text_dim", 128)
te = T5EncoderModel(
    T5Config(
        vocab_size=len(tok),
        d_model=dm,
        d_kv=dm // 4,
        d_ff=2 * dm,
        num_layers=cfg.get("text_layers", 2),
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
)
dim, heads = cfg.get("dim", 128), cfg.get("heads", 4)
tr = LatteTransformer3DModel(
    num_attention_heads=heads,
    attention_head_dim=dim // heads,
    in_channels=4,
    out_channels=8,
    num_layers=cfg.get("layers", 4),
    cross_attention_dim=dim,
    sample_size=16,
    patch_size=2,
    activation_fn="gelu-approximate",
    norm_type="ada_norm_single",
    num_embeds_ada_norm=1000,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=dm,
    video_length=4,
)
if cfg.get("zero_out", True):  # DiT's start: the output layer zero
    torch.nn.init.zeros_(tr.proj_out.weight)
    torch.nn.init.zeros_(tr.proj_out.bias)
data = WorldVideos(W, 32, 4)
if cfg.get("single", True):
    keep = [i for i, c in enumerate(data.captions) if " and " not in c]
    data.pixels, data.captions = data.pixels[keep], [data.captions[i] for i in keep]
n, f = data.pixels.shape[:2]
te, tr = te.to(dev), tr.to(dev)
mean, std = D.encode_posteriors(vae, data.pixels.flatten(0, 1).to(dev))
mean, std = (x.reshape(n, f, *x.shape[1:]).transpose(1, 2).contiguous() for x in (mean, std))
scale = vae.config.scaling_factor
enc = tok(
    data.captions,
    padding="max_length",
    max_length=32,
    truncation=True,
    return_attention_mask=True,
    return_tensors="pt",
)
ids, am = enc.input_ids.to(dev), enc.attention_mask.to(dev)
e0 = tok([""], padding="max_length", max_length=32, return_attention_mask=True, return_tensors="pt").to(dev)
sched = DDPMScheduler(**video_betas("epsilon"))
params = list(te.parameters()) + list(tr.parameters())
opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
total = cfg.get("total", 6000)
lrs = cosine_with_warmup(opt, max(1, total // 20), total)
bs = cfg.get("batch", 16)
gen = torch.Generator().manual_seed(0)
fj = X.frame_judge()
emit({"event": "start", "clips": n, "params": sum(p.numel() for p in params), "cfg": cfg})


class LatteAdapter:
    """mmfast.eval.t2v.generate's call (num_frames) on a LattePipeline (video_length; its size defaults to 512 px)."""

    def __init__(self, p):
        self.p = p

    def __call__(self, num_frames, **kw):
        return self.p(video_length=num_frames, clean_caption=False, height=32, width=32, **kw)


def run_eval(step, guidances=(3.0,), save=False):
    te.eval()
    tr.eval()
    ep = LattePipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=vae,
        transformer=tr,
        scheduler=DDIMScheduler(**video_betas("epsilon"), set_alpha_to_one=False),
    )
    ep.set_progress_bar_config(disable=True)
    t0 = time.time()
    for g in guidances:
        r = evaluate(
            LatteAdapter(ep),
            W,
            n=cfg.get("eval_n", 64),
            steps=20,
            guidance_scale=g,
            frame_judge=fj,
            save_dir=f"/tmp/gifs/{name}_s{step}_g{g:g}" if save else None,
        )
        emit(
            {
                "event": "eval",
                "step": step,
                "g": g,
                "top1": round(r["t2v_top1"], 4),
                "dir": round(r["t2v_direction_acc"], 4),
                "eval_s": round(time.time() - t0, 1),
            }
        )
    te.train()
    tr.train()
    return time.time() - t0


evals = set(cfg.get("evals", [500, 1000, 2000, 3000, 4000]))
step, losses, t_log, s_log, eval_cost = 0, [], time.time(), 0, 60.0
perm, pos = torch.randperm(n, generator=gen), 0
te.train()
tr.train()
while True:
    if pos + bs > n:
        perm, pos = torch.randperm(n, generator=gen), 0
    rows = perm[pos : pos + bs].to(dev)
    pos += bs
    x0 = (mean[rows] + std[rows] * torch.randn_like(std[rows])) * scale
    b_ids, b_am = ids[rows].clone(), am[rows].clone()
    drop = torch.rand(bs, device=dev) < cfg.get("uncond", 0.1)
    b_ids[drop], b_am[drop] = e0.input_ids[0], e0.attention_mask[0]
    keep = int(b_am.sum(1).max())
    states = te(b_ids, attention_mask=b_am)[0][:, :keep]
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (bs,), device=dev)
    pred = tr(sched.add_noise(x0, noise, t), timestep=t, encoder_hidden_states=states).sample[:, :4]
    per = (pred - noise).pow(2).mean((1, 2, 3, 4))
    loss = (per * D.snr_weights(sched, t, 5.0)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    lrs.step()
    step += 1
    losses.append(float(loss.detach()))
    if step % 250 == 0:
        emit(
            {
                "event": "train",
                "step": step,
                "loss": round(sum(losses) / len(losses), 5),
                "ms_step": round(1000 * (time.time() - t_log) / (step - s_log), 1),
            }
        )
        losses, t_log, s_log = [], time.time(), step
    last = step >= total or time.time() > deadline - 2.2 * eval_cost - 10
    if step in evals or last:
        took = run_eval(step, (3.0, 5.0) if last else (3.0,), save=last)
        eval_cost = took / 2 if last else took
        t_log, s_log = time.time(), step
        if cfg.get("save"):
            torch.save({"te": te.state_dict(), "tr": tr.state_dict(), "step": step}, cfg["save"])
    if last:
        break
emit({"event": "done", "step": step})
