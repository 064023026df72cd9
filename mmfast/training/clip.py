"""Train CLIP (or SigLIP) with DeepSpeed ZeRO 0-3 on the global-batch contrastive loss.

    mmfast train clip --nproc 2 --config tiny --data WORLD_DIR --out runs/clip --steps 300 --batch-size 64
    deepspeed --num_gpus 2 --module mmfast.training.clip --config tiny ...    (DeepSpeed's launcher directly)

Backend: NCCL + bf16 on GPU, gloo + fp32 on CPU (``"auto"`` entries in the DeepSpeed JSON resolve
to those). Every rank computes its share of the global-batch loss with ``mmfast.ops.clip_loss(...,
group=)``; feature gradients are scaled by the world size so that DeepSpeed's gradient averaging
yields the gradient of the global-batch loss. The learnable temperature is clamped to ln 100.

Outputs under ``--out``: ``metrics.jsonl`` (rank 0), ``checkpoints/stepN`` (see
:mod:`mmfast.training.checkpoint`), ``final/`` (open_clip_config.json + safetensors, loadable by
``mmfast.models.clip.create_model(None, pretrained=...)``) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from mmfast.training import engine as E

MAX_LOGIT_SCALE = math.log(100.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmfast train clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--config", dest="model", default="tiny", help="preset or open_clip model name")
    p.add_argument("--pretrained", default=None, help="local checkpoint to start from")
    p.add_argument("--data", required=True, help="image-text CSV, world folder, or webdataset shards")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="caption")
    E.add_common_args(p, batch_size=64, ds_config="zero2", steps=None)
    p.add_argument("--lr", type=E.positive_float, default=5e-4)
    p.add_argument("--wd", type=E.nonneg_float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--warmup", type=E.nonneg_int, default=None, help="warmup steps (default 5%% of the run)")
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    p.add_argument("--loss-backend", default=None, help="backend for mmfast.ops.clip_loss (default auto)")
    p.add_argument("--no-kernels", action="store_true", help="plain open_clip modules (no mmfast.patch)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-export", action="store_true")
    return p.parse_args(argv)


def precheck(args) -> None:
    """Before any rank starts: the data path, the checkpoint to start from and the model preset."""
    data = args.data
    if not any(c in data for c in "*?[{") and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if args.pretrained is not None and not Path(args.pretrained).exists():
        raise FileNotFoundError(f"--pretrained {args.pretrained}: no such file or folder (nothing is downloaded)")
    if not (args.pretrained and Path(args.pretrained).is_dir()):
        from mmfast.models.clip.model import model_config

        model_config(args.model)


class ContrastiveModel(torch.nn.Module):
    """The engine's module: returns normalised features, the clamped scale and the bias."""

    def __init__(self, clip: torch.nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images, texts):
        img = self.clip.encode_image(images, normalize=True)  # (B, E)
        txt = self.clip.encode_text(texts, normalize=True)  # (B, E)
        scale = self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        # A fresh tensor, not the parameter: ZeRO-3 may re-partition parameters after forward.
        bias = self.clip.logit_bias * 1.0 if getattr(self.clip, "logit_bias", None) is not None else None
        return img, txt, scale, bias


def param_groups(model: torch.nn.Module, wd: float):
    """No weight decay on gains, biases, the temperature and embeddings (1-D / scalar tensors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_" in name or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def contrastive_loss(kind, img, txt, scale, bias, group, world, backend):
    from mmfast import ops

    if world > 1:
        from mmfast.distributed.collectives import scale_grad

        # The distributed loss hands each rank d L / d(its features); DeepSpeed averages gradients
        # over ranks, so scale by W to land on the global-batch gradient (scale/bias are already global).
        img, txt = scale_grad(img, float(world)), scale_grad(txt, float(world))
    if kind == "siglip":
        if bias is None:
            raise ValueError("--loss siglip needs a model with logit_bias (e.g. the tiny-siglip preset)")
        return ops.siglip_loss(img, txt, scale, bias, group=group, backend=backend)
    return ops.clip_loss(img, txt, scale, bias, group=group, backend=backend)


@torch.no_grad()
def reference_loss(kind, img, txt, scale, bias, world):
    """The plain-PyTorch loss over the gathered global batch (fp32), to check the fused one."""
    import torch.distributed as dist

    from mmfast.ops import clip_loss_reference, siglip_loss_reference

    if world > 1:
        imgs, txts = [torch.empty_like(img) for _ in range(world)], [torch.empty_like(txt) for _ in range(world)]
        dist.all_gather(imgs, img.contiguous())
        dist.all_gather(txts, txt.contiguous())
        img, txt = torch.cat(imgs), torch.cat(txts)
    img, txt, scale = img.float(), txt.float(), scale.float()
    bias = None if bias is None else bias.float()
    if kind == "siglip":
        return float(siglip_loss_reference(img, txt, scale, bias))
    return float(clip_loss_reference(img, txt, scale, bias))


def build(args, run):
    """The model (same initial weights on every rank), its dataset and the step count."""
    from mmfast.models.clip import model as mclip
    from mmfast.training.data import open_source

    # (1,)-shaped temperature: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
    clip = mclip.create_model(args.model, pretrained=args.pretrained, device=run.device, kernels=not args.no_kernels,
                              nonscalar_logit_scale=True)
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    base = open_source(args.data, mclip.get_transforms(clip, is_train=True), mclip.get_tokenizer(clip),
                       args.csv_img_key, args.csv_caption_key)
    total = args.steps or max(1, int(args.epochs * (len(base) // (args.batch_size * run.world))))
    return clip, base, total


def export(clip, state, args, run) -> None:
    import open_clip

    from mmfast.models.clip import model as mclip

    if not args.no_export:
        run.export(lambda d: mclip.save_pretrained(state, d, model_cfg=clip.mmfast_config["model_cfg"],
                                                   preprocess_cfg=open_clip.model.get_model_preprocess_cfg(clip)))


@E.entry
def main(argv=None) -> int:
    import torch.distributed as dist

    from mmfast.distributed.deepspeed_shm import buffer_path
    from mmfast.ops.contrastive import CLIP_OP, SIGLIP_OP, select_backend
    from mmfast.training.data import ResumableBatches, SeededPairs

    args = parse_args(argv)
    run = E.Run(args, "train_clip")
    clip, base, total = build(args, run)
    model = ContrastiveModel(clip)
    # On CPU, torch's fused AdamW is one vectorised pass (about 6x faster than the per-tensor loop here, where
    # the 49408-row token embedding dominates the parameters); GPUs keep torch's default implementation.
    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, args.beta2), eps=1e-6,
                                  fused=True if run.device.type == "cpu" else None)
    warmup = args.warmup if args.warmup is not None else max(1, total // 20)
    engine = run.initialize(model, optimizer, E.cosine_with_warmup(optimizer, warmup, total))
    sampler = ResumableBatches(len(base), args.batch_size, run.rank, run.world, args.seed, run.start, total, keyed=True)
    loader = torch.utils.data.DataLoader(SeededPairs(base, args.seed), batch_sampler=sampler, num_workers=args.workers)
    group = dist.group.WORLD if run.world > 1 else None
    op = SIGLIP_OP if args.loss == "siglip" else CLIP_OP
    backend = select_backend(op, torch.empty(1, 1, device=run.device, dtype=run.dtype), args.loss_backend)
    banner = f"{args.model}, {len(base)} pairs, loss {args.loss} ({backend}), kernels {clip.mmfast_kernels or 'none'}"
    for step, (images, texts) in run.steps(loader, total, "train clip", banner):
        img, txt, scale, bias = engine(images.to(run.device, dtype=run.dtype), texts.to(run.device))
        loss = contrastive_loss(args.loss, img, txt, scale, bias, group, run.world, args.loss_backend)
        ref = reference_loss(args.loss, img, txt, scale, bias, run.world) if step == run.start + 1 else None
        run.backward(loss, samples=args.batch_size * run.world)
        if run.should_log(step) or ref is not None:
            grad_norm = engine.get_global_grad_norm()  # after DeepSpeed's averaging, before clipping
            run.log(step, {"loss": loss.item(), "lr": run.scheduler.get_last_lr()[0],
                           "logit_scale": scale.detach().item(),
                           **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                           **({"loss_reference": ref} if ref is not None else {})}, rate="samples_per_s")
    state = run.gather_state(clip)
    export(clip, state, args, run)
    return run.finish({
        "model": args.model, "loss_backend": backend, "kernels": clip.mmfast_kernels,
        "final": None if args.no_export else str(run.out / "final"),
        # DeepSpeed's CPU shm allreduce files of this run still in /dev/shm (released after init).
        "shm_buffers_left": [p.name for p in map(buffer_path, range(run.world)) if p.exists()],
        # The open_clip transformers that recompute activations in backward (read off the modules).
        "grad_checkpointing": sorted(n for n, m in clip.named_modules() if getattr(m, "grad_checkpointing", False)),
    }, state)


if __name__ == "__main__":
    E.exit_rank(main())
