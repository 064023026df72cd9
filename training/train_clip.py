"""Train CLIP (or SigLIP) with DeepSpeed ZeRO 0-3 on the global-batch contrastive loss.

    deepspeed --num_gpus 2 training/train_clip.py --model tiny --data WORLD_DIR --out runs/clip \\
        --deepspeed-config training/configs/zero2.json --steps 300 --batch-size 64
    mmfast train clip --nproc 2 --config tiny --data WORLD_DIR ...          (same, via the launcher)

Backend: NCCL + bf16 on GPU, gloo + fp32 on CPU (``"auto"`` entries in the DeepSpeed JSON resolve
to those). Every rank computes its share of the global-batch loss with ``mmfast.ops.clip_loss(...,
group=)``; feature gradients are scaled by the world size so that DeepSpeed's gradient averaging
yields the gradient of the global-batch loss. The learnable temperature is clamped to ln 100.

Outputs under ``--out``: ``metrics.jsonl`` (rank 0), ``checkpoints/stepN`` (DeepSpeed state +
per-rank RNG), ``final/`` (open_clip_config.json + safetensors, loadable by
``mmfast.models.clip.create_model(None, pretrained=...)``) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling clip_data.py, whatever the cwd

from clip_data import SeededPairs, ShardedBatches, open_source

from mmfast.distributed.deepspeed_shm import buffer_path, release_shm_buffer
from mmfast.models import clip as mclip
from mmfast.utils.io import atomic_torch_save, atomic_write_json

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
MAX_LOGIT_SCALE = math.log(100.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--config", dest="model", default="tiny", help="preset or open_clip model name")
    p.add_argument("--pretrained", default=None, help="local checkpoint to start from")
    p.add_argument("--data", required=True, help="image-text CSV, world folder, or webdataset shards")
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="caption")
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoints, final export)")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="ds_config", default="zero2",
                   help="DeepSpeed JSON, or a name in training/configs (zero0..zero3, zero3_offload)")
    p.add_argument("--batch-size", type=int, default=64, help="per-rank micro batch")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the run)")
    p.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    p.add_argument("--loss-backend", default=None, help="backend for mmfast.ops.clip_loss (default auto)")
    p.add_argument("--no-kernels", action="store_true", help="plain open_clip modules (no mmfast.patch)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0: only at the end)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (run_dir/checkpoints/stepN)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- set-up
def init_distributed():
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    acc = get_accelerator()
    backend = acc.communication_backend_name()  # nccl on CUDA, gloo on the CPU accelerator
    deepspeed.init_distributed(dist_backend=backend)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if acc.device_name() == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        dist.barrier()  # every rank has mapped every peer's shm allreduce buffer: the names can go
        release_shm_buffer(rank)
        device = torch.device("cpu")
    return rank, world, device


def load_ds_config(name_or_path: str, batch_size: int, device: torch.device) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise FileNotFoundError(f"--deepspeed-config {name_or_path!r}: no such file or preset ({choices})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    on_gpu = device.type == "cuda"
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg.pop("train_batch_size", None)  # implied by micro batch x accumulation x ranks
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") == "auto":
            cfg[key]["enabled"] = on_gpu and key == "bf16"
    for key in ("offload_optimizer", "offload_param"):
        sub = cfg.get("zero_optimization", {}).get(key)
        if sub and sub.get("pin_memory") == "auto":
            sub["pin_memory"] = on_gpu
    return cfg


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


def cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resolve_resume(resume: str, out: Path) -> tuple[Path, str]:
    """(load_dir, tag) for ``--resume latest`` or a checkpoint folder."""
    if resume == "latest":
        ckdir = out / "checkpoints"
        latest = ckdir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume latest: no checkpoint in {ckdir} (missing {latest})")
        return ckdir, latest.read_text().strip()
    p = Path(resume)
    if not p.is_dir():
        raise FileNotFoundError(f"--resume {resume!r}: expected 'latest' or a checkpoint folder (run/checkpoints/stepN)")
    return p.parent, p.name


# --------------------------------------------------------------------------- loss
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- export
def full_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on every rank, gathered from any ZeRO stage (collective: all ranks call it)."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module.clip
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # collective under ZeRO 1-3: every rank calls it
        if full is None:
            full = p.detach()
        state[name] = full.detach().float().cpu().clone()
    params = set(state)
    for name, buf in module.state_dict().items():
        if name not in params:
            state[name] = buf.detach().cpu().clone()
    return state


def checksum(state: dict[str, torch.Tensor]) -> float:
    """One number per rank to check that every rank ends with the same weights."""
    return float(sum(t.double().sum() * (i + 1) for i, t in enumerate(state.values())))


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    import deepspeed
    import torch.distributed as dist

    rank, world, device = init_distributed()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    out = Path(args.out)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # same initial weights on every rank

    ds_config = load_ds_config(args.ds_config, args.batch_size, device)
    # (1,)-shaped temperature: DeepSpeed broadcasts parameters as byte views, which 0-d tensors refuse.
    clip = mclip.create_model(args.model, pretrained=args.pretrained, device=device, kernels=not args.no_kernels,
                              nonscalar_logit_scale=True)
    clip_cfg = clip.mmfast_config["model_cfg"]
    import open_clip

    preprocess_cfg = open_clip.model.get_model_preprocess_cfg(clip)
    if args.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    tokenizer = mclip.get_tokenizer(clip)
    base = open_source(args.data, mclip.get_transforms(clip, is_train=True), tokenizer,
                       args.csv_img_key, args.csv_caption_key)
    steps_per_epoch = len(base) // (args.batch_size * world)
    total = args.steps if args.steps is not None else max(1, int(args.epochs * steps_per_epoch))
    warmup = args.warmup if args.warmup is not None else max(1, total // 20)

    model = ContrastiveModel(clip)
    # On CPU, torch's fused AdamW is one vectorised pass (about 6x faster than the per-tensor loop here, where
    # the 49408-row token embedding dominates the parameters); GPUs keep torch's default implementation.
    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr, betas=(0.9, args.beta2), eps=1e-6,
                                  fused=True if device.type == "cpu" else None)
    scheduler = cosine_with_warmup(optimizer, warmup, total)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    start = 0
    if args.resume:
        load_dir, tag = resolve_resume(args.resume, out)
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if client is None:
            raise FileNotFoundError(f"could not load checkpoint {load_dir / tag}")
        start = int(client["step"])
        rng_file = load_dir / tag / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: RNG states are not tensors only
        else:
            print(f"train_clip: rank {rank}: {rng_file} missing; RNG state not restored", file=sys.stderr)

    sampler = ShardedBatches(len(base), args.batch_size, rank, world, args.seed, start, total)
    loader = torch.utils.data.DataLoader(SeededPairs(base, args.seed), batch_sampler=sampler,
                                         num_workers=args.workers, persistent_workers=False)
    group = dist.group.WORLD if world > 1 else None
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0 and metrics_path.exists():
            metrics_path.unlink()
        print(f"train_clip: {args.model} on {device} x{world}, ZeRO-{engine.zero_optimization_stage()}, "
              f"{dtype}, {len(base)} pairs, steps {start}->{total}, kernels {clip.mmfast_kernels or 'none'}",
              flush=True)
    bar = None
    if rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="train clip", dynamic_ncols=True, mininterval=1.0)

    from mmfast.ops.contrastive import CLIP_OP, SIGLIP_OP, select_backend

    loss_backend = select_backend(SIGLIP_OP if args.loss == "siglip" else CLIP_OP,
                                  torch.empty(1, 1, device=device, dtype=dtype), args.loss_backend)
    t_start = time.perf_counter()
    t_last, n_last = t_start, 0
    step = start
    for images, texts in loader:
        images = images.to(device, dtype=dtype, non_blocking=True)
        texts = texts.to(device, non_blocking=True)
        img, txt, scale, bias = engine(images, texts)
        loss = contrastive_loss(args.loss, img, txt, scale, bias, group, world, args.loss_backend)
        ref = reference_loss(args.loss, img, txt, scale, bias, world) if step == start else None
        engine.backward(loss)
        engine.step()
        step += 1
        n_last += args.batch_size * world
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if rank == 0 and (step % args.log_every == 0 or step == total or ref is not None):
            now = time.perf_counter()
            row = {"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   "logit_scale": scale.detach().item(), "samples_per_s": n_last / max(now - t_last, 1e-9),
                   "memory_mb": round(peak_memory_mb(device), 1), "time": round(now - t_start, 3)}
            grad_norm = engine.get_global_grad_norm()  # after DeepSpeed's averaging, before clipping
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if ref is not None:
                row["loss_reference"] = ref
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            t_last, n_last = now, 0
        if args.save_every and (step % args.save_every == 0 or step == total):
            save_checkpoint(engine, out, step, rank)
    if bar is not None:
        bar.close()
    train_seconds = time.perf_counter() - t_start
    state = full_state(engine)
    sums = [None] * world
    dist.all_gather_object(sums, checksum(state))
    if rank == 0:
        if not args.no_export:
            mclip.save_pretrained(state, out / "final", model_cfg=clip_cfg, preprocess_cfg=preprocess_cfg)
        atomic_write_json(out / "train_summary.json", {
            "model": args.model, "world_size": world, "zero_stage": engine.zero_optimization_stage(),
            "steps": step, "train_seconds": round(train_seconds, 3), "device": str(device), "dtype": str(dtype),
            "loss_backend": loss_backend, "kernels": clip.mmfast_kernels, "param_checksums": sums,
            "final": None if args.no_export else str(out / "final"),
            # DeepSpeed's CPU shm allreduce files of this run still in /dev/shm (released after init).
            "shm_buffers_left": [p.name for p in map(buffer_path, range(world)) if p.exists()],
            # The open_clip transformers that recompute activations in backward (read off the modules).
            "grad_checkpointing": sorted(n for n, m in clip.named_modules() if getattr(m, "grad_checkpointing", False)),
        })
    dist.barrier()
    return 0


def save_checkpoint(engine, out: Path, step: int, rank: int) -> None:
    import torch.distributed as dist

    ckdir = out / "checkpoints"
    tag = f"step{step}"
    engine.save_checkpoint(str(ckdir), tag=tag, client_state={"step": step})
    atomic_torch_save(rng_state(), ckdir / tag / f"rng_rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
