"""Train NExT-GPT's three stages with DeepSpeed (ZeRO-2 by default; NCCL + bf16 on GPU, gloo + fp32 on CPU).

    # stage 1, encoding-side alignment: input projections, X->text captioning LM loss
    mmfast train nextgpt --nproc 2 --stage 1 --model tiny --data WORLD --out runs/ng1
    # stage 2, decoding-side alignment: output projections + signal-token rows, LM + alignment loss
    mmfast train nextgpt --nproc 2 --stage 2 --init-from runs/ng1/final --data WORLD --out runs/ng2
    # stage 3, modality-switching instruction tuning: LoRA (+ projections) on MosIT-style dialogues among stage 2's records
    mmfast train nextgpt --nproc 2 --stage 3 --init-from runs/ng2/final --data WORLD --modalities image,audio,video

``--data`` is a synthetic world (``t2x_{image,audio,video}.json``; images also from ``captions_train.csv``)
or, for any stage, a JSON list of dialogue records (:mod:`mmfast.models.nextgpt.data`) with media paths
relative to ``--media-root`` (default the file's folder).

Outputs under ``--out``: ``metrics.jsonl`` (rank 0), ``checkpoints/stepN`` (the trainable parameters' DeepSpeed
state, :mod:`mmfast.training.checkpoint`; ``--resume latest``), ``final/`` (config.json + trainable.safetensors
[+ components.safetensors]; the next stage's ``--init-from``) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mmfast.models.nextgpt import data as nd
from mmfast.models.nextgpt import model as ng
from mmfast.training import engine as E
from mmfast.utils.io import read_json

DEFAULT_LR = {1: 1e-3, 2: 1e-3, 3: 2e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmfast train nextgpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--model", "--config", dest="model", default="tiny", help="preset name (tiny, vicuna7b)")
    p.add_argument("--init-from", default=None, help="a saved NExT-GPT directory (the previous stage's final/)")
    p.add_argument("--input-projection", default=None, choices=("linear", "group"))
    p.add_argument("--image-encoder", default=None, help="CLIP directory / open_clip export for images and video")
    p.add_argument("--llm", default=None, help="LLaMA/Vicuna or llava-hf directory replacing the preset's LLM")
    p.add_argument("--data", required=True, help="synthetic-world folder or a dialogue JSON file")
    p.add_argument("--media-root", default=None)
    p.add_argument("--modalities", default="image", help="comma-separated: image,audio,video")
    p.add_argument("--max-samples", type=E.positive_int, default=None)
    E.add_common_args(p, batch_size=8, ds_config="zero2", steps=100, epochs=False)
    p.add_argument("--lr", type=E.positive_float, default=None, help="(stage 1/2: 1e-3, stage 3: 2e-4)")
    p.add_argument("--signal-lr", type=float, default=None,
                   help="stage 2: lr of the signal-token embedding / LM-head rows (default: --lr)")
    p.add_argument("--negatives", default="1.0",
                   help="stages 2-3 from a world: share of pairs also given as X->text records, so the signal "
                        "tokens learn when not to start; one share for every modality, or MOD=SHARE,... (a "
                        "modality not named: 1.0)")
    p.add_argument("--rows", default=None,
                   help="stage 2: comma-separated modalities whose signal-token rows train (default: every added "
                        "token's rows); '' for none")
    p.add_argument("--head-rows", default="",
                   help="stage 2: comma-separated modalities whose signal tokens' LM-head rows alone train (when a "
                        "run opens; the states the output projections read stay)")
    p.add_argument("--projections", default=None,
                   help="stages 2-3: comma-separated modalities whose output projections train (default: "
                        "--modalities)")
    p.add_argument("--repeat", default="",
                   help="stages 2-3 from a world: MOD=N,... gives each pair of MOD N times (a small modality's share "
                        "of the steps)")
    p.add_argument("--mosit-share", type=float, default=0.25,
                   help="stage 3 from a world: share of the records that are two-turn MosIT dialogues (the rest: "
                        "stage 2's requests and captioning negatives)")
    p.add_argument("--warmup", type=E.nonneg_int, default=None)
    p.add_argument("--align-weight", type=float, default=1.0)
    p.add_argument("--diffusion-weight", type=float, default=0.0,
                   help="stage 2: add the decoders' noise-prediction loss (image, video and audio)")
    p.add_argument("--no-kernels", action="store_true")
    a = p.parse_args(argv)
    a.modalities = tuple(m.strip() for m in a.modalities.split(",") if m.strip())
    bad = [m for m in a.modalities if m not in nd.MODALITIES]
    if bad:
        p.error(f"--modalities {bad}: expected some of {nd.MODALITIES}")
    repeats = {}
    for item in filter(None, (x.strip() for x in a.repeat.split(","))):
        m, _, n = item.partition("=")
        if m not in a.modalities or not n.isdigit() or int(n) < 1:
            p.error(f"--repeat {item!r}: expected MOD=N with MOD one of --modalities {a.modalities} and N >= 1")
        repeats[m] = int(n)
    a.repeat = repeats
    a.negatives = _negatives(p, a.negatives, a.modalities)
    if not 0.0 < a.mosit_share <= 1.0:
        p.error(f"--mosit-share {a.mosit_share}: expected a share in (0, 1]")
    for what in ("rows", "head_rows", "projections"):
        v = getattr(a, what)
        if v is None:
            continue
        flag = "--" + what.replace("_", "-")
        mods = tuple(m.strip() for m in v.split(",") if m.strip())
        if any(m not in nd.MODALITIES for m in mods):
            p.error(f"{flag} {v!r}: expected some of {nd.MODALITIES}")
        if mods and (what != "projections" and a.stage != 2 or what == "projections" and a.stage == 1):
            p.error(f"{flag}: not a choice of stage {a.stage}")
        setattr(a, what, mods)
    return a


def _negatives(p, value: str, modalities) -> float | dict:
    """``--negatives``: a share in [0, 1], or ``{modality: share}`` from MOD=SHARE,... (unnamed: 1.0)."""
    def share(text, item):
        try:
            x = float(text)
        except ValueError:
            x = -1.0
        if not 0.0 <= x <= 1.0:
            p.error(f"--negatives {item!r}: expected a share in [0, 1]")
        return x

    if "=" not in value:
        return share(value, value)
    out = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        m, _, v = item.partition("=")
        if m not in modalities:
            p.error(f"--negatives {item!r}: expected MOD=SHARE with MOD one of --modalities {modalities}")
        out[m] = share(v, item)
    return out


def build(args, device) -> ng.NextGPT:
    kernels = not args.no_kernels and device.type == "cuda"
    if args.init_from:
        model = ng.load_pretrained(args.init_from, device="cpu", kernels=False)
    else:
        model = ng.build_nextgpt(args.model, input_projection=args.input_projection, image_encoder=args.image_encoder,
                                 llm=args.llm, kernels=False, seed=args.seed)
    model.set_stage(args.stage, args.modalities, rows=args.rows, projections=args.projections,
                    head_rows=args.head_rows)
    model.to(device)
    if kernels:
        import mmfast

        model.kernels = True
        mmfast.patch(model.llm)
    return model


def records(args) -> tuple[list[dict], Path]:
    src = Path(args.data)
    if src.is_dir():
        recs = nd.stage_records(src, args.stage, args.modalities, seed=args.seed, negatives=args.negatives,
                                repeats=args.repeat, mosit_share=args.mosit_share)
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


def precheck(args) -> None:
    """Before any rank starts: the data and the previous stage's folder exist."""
    if not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or folder")
    if args.init_from and not Path(args.init_from).is_dir():
        raise FileNotFoundError(f"--init-from {args.init_from}: no such folder (a previous stage's final/)")


@E.entry
def main(argv=None) -> int:
    from mmfast.training.data import ResumableBatches

    args = parse_args(argv)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.stage]
    run = E.Run(args, "train_nextgpt")
    model = build(args, run.device)
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
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    engine = run.initialize(module, optimizer, E.cosine_with_warmup(optimizer, warmup, args.steps), exclude_frozen=True)
    sampler = ResumableBatches(len(dataset), args.batch_size, run.rank, run.world, args.seed, run.start, args.steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=lambda s: nd.collate(s, model.tokenizer.pad_token_id))
    banner = (f"stage {args.stage}, {args.init_from or args.model}, {len(dataset)} records {args.modalities}, "
              f"{sum(p.numel() for p in params)} of {sum(p.numel() for p in model.parameters())} params train")
    for step, batch in run.steps(loader, args.steps, f"train nextgpt stage {args.stage}", banner):
        media = {m: x.to(run.device, dtype=run.dtype) for m, x in batch["media"].items()}
        loss = engine(batch["input_ids"].to(run.device), batch["labels"].to(run.device),
                      batch["attention_mask"].to(run.device), media, batch["captions"], batch["target_media"])
        run.backward(loss)
        if run.should_log(step):
            parts = mean_over_ranks(module.parts, run.device)  # a collective: every rank logs the same steps
            run.log(step, {**parts, "lr": run.scheduler.get_last_lr()[0]})
            if run.rank == 0:
                print(json.dumps({"step": step, **parts}), flush=True)
    state = run.gather_state(model)
    run.export(lambda d: model.save_pretrained(d, state=state))
    return run.finish({"stage": args.stage, "model": args.init_from or args.model,
                       "modalities": list(args.modalities), "final": str(run.out / "final")}, state)


if __name__ == "__main__":
    E.exit_rank(main())
