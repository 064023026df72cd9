"""Train NExT-GPT's three stages with DeepSpeed (ZeRO-2 by default; NCCL + bf16 on GPU, gloo + fp32 on CPU).

    # stage 1, encoding-side alignment: input projections, X->text captioning LM loss
    mmfast train nextgpt --nproc 2 --stage 1 --model tiny --data WORLD --out runs/ng1
    # stage 2, decoding-side alignment: output projections + signal-token rows, LM + alignment loss
    mmfast train nextgpt --nproc 2 --stage 2 --init-from runs/ng1/final --data WORLD --out runs/ng2
    # stage 3, modality-switching instruction tuning: LoRA + both projections on MosIT-style dialogues
    mmfast train nextgpt --nproc 2 --stage 3 --init-from runs/ng2/final --data WORLD --modalities image,audio,video

``--data`` is a synthetic world (``t2x_{image,audio,video}.json``; images also from ``captions_train.csv``)
or, for any stage, a JSON list of dialogue records (:mod:`mmfast.models.nextgpt_data`) with media paths
relative to ``--media-root`` (default the file's folder).

Outputs under ``--out``: ``metrics.jsonl`` (rank 0), ``checkpoints/stepN`` (DeepSpeed state of the
trainable parameters + per-rank RNG; ``--resume latest``), ``final/`` (config.json + trainable.safetensors
[+ components.safetensors]; the next stage's ``--init-from``) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling scripts, whatever the cwd

from train_clip import (
    cosine_with_warmup,
    init_distributed,
    load_ds_config,
    peak_memory_mb,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from train_llava import GroupedBatches, gather_state

from mmfast.models import nextgpt as ng
from mmfast.models import nextgpt_data as nd
from mmfast.utils.io import atomic_torch_save, atomic_write_json, read_json

DEFAULT_LR = {1: 1e-3, 2: 1e-3, 3: 2e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--model", "--config", dest="model", default="tiny", help="preset name (tiny, vicuna7b)")
    p.add_argument("--init-from", default=None, help="a saved NExT-GPT directory (the previous stage's final/)")
    p.add_argument("--input-projection", default=None, choices=("linear", "group"))
    p.add_argument("--image-encoder", default=None, help="CLIP directory / open_clip export for images and video")
    p.add_argument("--llm", default=None, help="LLaMA/Vicuna or llava-hf directory replacing the preset's LLM")
    p.add_argument("--data", required=True, help="synthetic-world folder or a dialogue JSON file")
    p.add_argument("--media-root", default=None)
    p.add_argument("--modalities", default="image", help="comma-separated: image,audio,video")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="ds_config", default="zero2")
    p.add_argument("--batch-size", type=int, default=8, help="per-rank micro batch")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help="(stage 1/2: 1e-3, stage 3: 2e-4)")
    p.add_argument("--signal-lr", type=float, default=None,
                   help="stage 2: lr of the signal-token embedding / LM-head rows (default: --lr)")
    p.add_argument("--negatives", type=float, default=1.0,
                   help="stage 2 from a world: share of pairs also given as X->text records, so the signal "
                        "tokens learn when not to start")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--diffusion-weight", type=float, default=0.0,
                   help="stage 2: add the decoders' noise-prediction loss (image, video and audio)")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="'latest' or run/checkpoints/stepN")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.modalities = tuple(m.strip() for m in a.modalities.split(",") if m.strip())
    bad = [m for m in a.modalities if m not in nd.MODALITIES]
    if bad:
        p.error(f"--modalities {bad}: expected some of {nd.MODALITIES}")
    return a


def build(args, device) -> ng.NextGPT:
    kernels = not args.no_kernels and device.type == "cuda"
    if args.init_from:
        model = ng.load_pretrained(args.init_from, device="cpu", kernels=False)
    else:
        model = ng.build_nextgpt(args.model, input_projection=args.input_projection, image_encoder=args.image_encoder,
                                 llm=args.llm, kernels=False, seed=args.seed)
    model.set_stage(args.stage, args.modalities)
    model.to(device)
    if kernels:
        import mmfast

        model.kernels = True
        mmfast.patch(model.llm)
    return model


def records(args) -> tuple[list[dict], Path]:
    src = Path(args.data)
    if src.is_dir():
        recs = nd.stage_records(src, args.stage, args.modalities, seed=args.seed, negatives=args.negatives)
        root = src
    else:
        recs = read_json(src, what="dialogue JSON file")
        if not isinstance(recs, list):
            raise ValueError(f"{src}: expected a list of dialogue records, got {type(recs).__name__}")
        root = Path(args.media_root) if args.media_root else src.parent
    return (recs[: args.max_samples] if args.max_samples else recs), root


def param_groups(model: ng.NextGPT, params: list, lr: float, signal_lr: float | None) -> list[dict]:
    """Projections / LoRA at ``lr``; the embedding and LM-head matrices (trainable in stage 2 for the added
    rows only, through a gradient mask) at ``signal_lr`` and never weight-decayed (decay would move every row)."""
    rows = {id(model.llm.get_input_embeddings().weight), id(model.llm.get_output_embeddings().weight)}
    groups = [{"params": [p for p in params if id(p) not in rows], "lr": lr},
              {"params": [p for p in params if id(p) in rows], "lr": lr if signal_lr is None else signal_lr,
               "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class StageModule(torch.nn.Module):
    """The engine's module: total loss; the parts are kept for logging."""

    def __init__(self, model: ng.NextGPT, align_weight: float, diffusion_weight: float):
        super().__init__()
        self.model, self.align_weight, self.diffusion_weight = model, align_weight, diffusion_weight
        self.parts: dict = {}

    def forward(self, input_ids, labels, attention_mask, media, captions, target_media=None):
        out = self.model.loss({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                               "media": media, "captions": captions, "target_media": target_media},
                              self.align_weight, self.diffusion_weight,
                              touch_all=True)
        self.parts = {k: float(v.detach()) for k, v in out.items()}
        return out["loss"]


LOGGED = ("loss", "lm", "lm_signal", *(f"align_{m}" for m in nd.MODALITIES), *(f"diffusion_{m}" for m in nd.MODALITIES))


def mean_over_ranks(parts: dict, device) -> dict:
    """Each loss part averaged over the ranks whose batch had it (the global batch's loss)."""
    import torch.distributed as dist

    v = torch.tensor([[parts.get(k, 0.0), float(k in parts)] for k in LOGGED], dtype=torch.float64, device=device)
    dist.all_reduce(v)
    return {k: float(v[i, 0] / v[i, 1]) for i, k in enumerate(LOGGED) if v[i, 1] > 0}


def save_checkpoint(engine, out: Path, step: int, rank: int) -> None:
    import torch.distributed as dist

    ckdir = out / "checkpoints"
    tag = f"step{step}"
    engine.save_checkpoint(str(ckdir), tag=tag, client_state={"step": step}, exclude_frozen_parameters=True)
    atomic_torch_save(rng_state(), ckdir / tag / f"rng_rank{rank}.pt")
    dist.barrier()


def main(argv=None) -> int:
    args = parse_args(argv)
    import deepspeed
    import torch.distributed as dist

    rank, world, device = init_distributed()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    out = Path(args.out)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.stage]
    ds_config = load_ds_config(args.ds_config, args.batch_size, device)

    model = build(args, device)
    recs, root = records(args)
    # Target pixels: the UNet's native latent size x the VAE factor (audio targets are waveforms: no size).
    sizes = {m: 0 if m == "audio" else model.pipes[m].unet.config.sample_size * model.pipes[m].vae_scale_factor
             for m in args.modalities}
    dataset = nd.DialogueDataset(recs, model.tokenizer, model.media_loader(root), model.n_input_tokens,
                                 int(model.cfg.get("max_length", 512)),
                                 target_sizes=sizes if args.diffusion_weight > 0 else None)
    module = StageModule(model, args.align_weight, args.diffusion_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, params, lr, args.signal_lr), lr=lr, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, args.warmup if args.warmup is not None else max(1, args.steps // 10),
                                   args.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    start = 0
    if args.resume:
        load_dir, tag = resolve_resume(args.resume, out)
        _, client = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=False)
        if client is None:
            raise FileNotFoundError(f"could not load checkpoint {load_dir / tag}")
        start = int(client["step"])
        rng_file = load_dir / tag / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: RNG states are not tensors only
    sampler = GroupedBatches([1] * len(dataset), args.batch_size, rank, world, args.seed, start, args.steps, False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=lambda s: nd.collate(s, model.tokenizer.pad_token_id))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if start == 0 and metrics_path.exists():
            metrics_path.unlink()
        n_train = sum(p.numel() for p in params)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"train_nextgpt stage {args.stage}: {args.init_from or args.model} on {device} x{world}, "
              f"ZeRO-{engine.zero_optimization_stage()}, {dtype}, {len(dataset)} records {args.modalities}, "
              f"steps {start}->{args.steps}, {n_train} of {n_all} params train", flush=True)
    t_start = time.perf_counter()
    step = start
    engine.train()
    for batch in loader:
        media = {m: x.to(device, dtype=dtype) for m, x in batch["media"].items()}
        loss = engine(batch["input_ids"].to(device), batch["labels"].to(device), batch["attention_mask"].to(device),
                      media, batch["captions"], batch["target_media"])
        engine.backward(loss)
        engine.step()
        step += 1
        if step % args.log_every == 0 or step == args.steps:
            parts = mean_over_ranks(module.parts, device)  # a collective: every rank logs the same steps
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            row = {"step": step, **parts, "lr": scheduler.get_last_lr()[0],
                   "memory_mb": round(peak_memory_mb(device), 1), "time": round(time.perf_counter() - t_start, 3)}
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(engine, out, step, rank)
    train_seconds = time.perf_counter() - t_start
    state = gather_state(model, engine.zero_optimization_stage())
    if rank == 0:
        model.save_pretrained(out / "final", state=state)
        atomic_write_json(out / "train_summary.json", {
            "stage": args.stage, "model": args.init_from or args.model, "world_size": world,
            "zero_stage": engine.zero_optimization_stage(), "steps": step, "train_seconds": round(train_seconds, 3),
            "device": str(device), "modalities": list(args.modalities), "final": str(out / "final")})
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
