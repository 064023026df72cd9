"""Train LLaVA in LLaVA's two stages with DeepSpeed.

    # stage 1, feature alignment: projector only, `plain` template, ZeRO-2; writes mm_projector.bin
    mmfast train llava --nproc 2 --stage 1 --model tiny --data WORLD --out runs/llava1
    # stage 2, end-to-end: projector + LLM (full, or --lora), ZeRO-3; writes a llava-hf directory
    mmfast train llava --nproc 2 --stage 2 --model tiny --pretrain-mm-projector runs/llava1/mm_projector.bin \\
        --data WORLD --out runs/llava2 --lora --merge-lora

``--model`` is a preset (``tiny``), a llava-hf directory (e.g. a stage-1 ``final/``), or a CLIP vision
directory together with ``--llm DIR``. ``--data`` is a LLaVA JSON file (images under ``--image-folder``,
default its folder) or a synthetic-world folder (stage 1 reads ``llava_pretrain_train.json``, stage 2
``llava_instruct_train.json``). NCCL + bf16 on GPU, gloo + fp32 on CPU.

Outputs under ``--out``: ``metrics.jsonl`` (loss, tokens/s, memory; rank 0), ``checkpoints/stepN``
(:mod:`mmfast.training.checkpoint`; ``--resume latest``), ``mm_projector.bin`` (stage 1), ``final/``
(llava-hf layout, ZeRO-3 weights gathered; LoRA merged with ``--merge-lora``, else saved beside the
base as a peft adapter) and ``train_summary.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmfast.data.llava import load_llava_json
from mmfast.models.llava import model as ml
from mmfast.training import engine as E

DEFAULTS = {1: {"template": "plain", "ds": "zero2", "lr": 1e-3}, 2: {"template": None, "ds": "zero3", "lr": 2e-5}}
WORLD_FILES = {1: "llava_pretrain_train.json", 2: "llava_instruct_train.json"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mmfast train llava", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--model", "--config", dest="model", default="tiny", help="preset, llava-hf dir or CLIP vision dir")
    p.add_argument("--llm", default=None, help="LLaMA/Vicuna directory (with a CLIP --model directory)")
    p.add_argument("--projector", default=None, help="linear | mlpNx_gelu | identity (default preset's)")
    p.add_argument("--vision-select-layer", type=int, default=None)
    p.add_argument("--vision-select-feature", default=None, choices=("patch", "cls_patch"))
    p.add_argument("--pretrain-mm-projector", default=None, help="stage-1 mm_projector.bin to start from")
    p.add_argument("--template", default=None, help="plain | v0 | vicuna_v1 (stage 1: plain, 2: the preset's)")
    p.add_argument("--image-attention", default="causal", choices=("causal", "bidirectional"))
    p.add_argument("--data", required=True, help="LLaVA JSON file or a synthetic-world folder")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--image-aspect-ratio", default="pad", choices=("pad", "resize", "crop"))
    p.add_argument("--model-max-length", type=E.positive_int, default=None)
    p.add_argument("--group-by-modality-length", action="store_true")
    p.add_argument("--max-samples", type=E.positive_int, default=None, help="use the first N records only")
    E.add_common_args(p, batch_size=16, ds_config=None, steps=None, ds_default="zero2 for stage 1, zero3 for stage 2")
    p.add_argument("--lr", type=E.positive_float, default=None, help="(stage 1: 1e-3, stage 2: 2e-5)")
    p.add_argument("--mm-projector-lr", type=float, default=None, help="stage 2 projector lr (default --lr)")
    p.add_argument("--tune-vision-tower", action="store_true",
                   help="stage 2: train the vision tower too (LLaVA-NeXT's unfreeze_mm_vision_tower)")
    p.add_argument("--vision-tower-lr", type=float, default=None,
                   help="its lr (LLaVA-NeXT's mm_vision_tower_lr; default --lr)")
    p.add_argument("--wd", type=E.nonneg_float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--lora", action="store_true", help="stage 2: LoRA on every LLM Linear instead of full tuning")
    p.add_argument("--lora-r", type=E.positive_int, default=64)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--merge-lora", action="store_true", help="save LoRA merged into the weights")
    p.add_argument("--lora-modules-to-save", default="",
                   help="comma-separated modules trained in full beside LoRA (peft modules_to_save), e.g. "
                        "lm_head,embed_tokens for an LLM that was never pretrained (the tiny preset)")
    p.add_argument("--no-kernels", action="store_true", help="plain transformers (no mmfast.patch / fused loss)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--no-export", action="store_true")
    a = p.parse_args(argv)
    if a.stage == 1 and a.lora:
        p.error("--lora is for stage 2 (stage 1 trains the projector only)")
    if a.stage == 1 and a.tune_vision_tower:
        p.error("--tune-vision-tower is for stage 2 (stage 1 trains the projector only)")
    a.lr = a.lr if a.lr is not None else DEFAULTS[a.stage]["lr"]
    a.ds_config = a.ds_config or DEFAULTS[a.stage]["ds"]
    return a


# --------------------------------------------------------------------------- model and data
def build(args, device):
    """The Llava bundle with the stage's trainable parameters, and the peft wrapper (or None)."""
    kernels = not args.no_kernels
    llava = ml.build_llava(args.model, llm=args.llm, projector=args.projector,
                           vision_select_layer=args.vision_select_layer,
                           vision_select_feature=args.vision_select_feature, kernels=kernels,
                           image_attention=args.image_attention, image_aspect_ratio=args.image_aspect_ratio,
                           model_max_length=args.model_max_length, seed=args.seed, device=device)
    # Stage 1 trains with `plain`; the config keeps the chat template the model will be tuned and used with.
    if args.template:
        llava.template = args.template
    if args.stage == 2:
        llava.config.mmfast_template = llava.template
    elif not args.template:
        llava.template = "plain"
    model = llava.model
    if args.pretrain_mm_projector:
        load_projector(model, args.pretrain_mm_projector)
    model.requires_grad_(False)
    peft_model = None
    if args.stage == 2 and args.lora:
        peft_model = add_lora(model, args)
    elif args.stage == 2:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(True)
    if args.tune_vision_tower:
        model.model.vision_tower.requires_grad_(True)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llava, peft_model


def lora_targets(model) -> list[str]:
    """LLaVA's rule: every nn.Linear outside the vision tower, the projector and the LM head."""
    skip = ("vision_tower", "multi_modal_projector", "lm_head")
    return sorted({name for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip)})


def lora_config(args, model):
    from peft import LoraConfig

    extra = [m.strip() for m in args.lora_modules_to_save.split(",") if m.strip()]
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                      target_modules=lora_targets(model), modules_to_save=extra or None)


def add_lora(model, args):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(args, model))  # injects into `model` in place


def projector_state_llava(proj_state: dict) -> dict:
    """A projector state dict in LLaVA's ``mm_projector.bin`` layout (``model.mm_projector.0.weight`` ...)."""
    out = {}
    for k, v in proj_state.items():
        name = k
        if k.startswith("linear_"):
            idx, _, rest = k[len("linear_"):].partition(".")
            name = f"{2 * (int(idx) - 1)}.{rest}"
        out[f"model.mm_projector.{name}"] = v.detach().float().cpu().clone()
    return out


def load_projector(model, path: str) -> None:
    from mmfast.models.llava.projector import hf_to_seq, strip_prefix

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--pretrain-mm-projector {p}: file not found")
    sd = strip_prefix(torch.load(p, map_location="cpu", weights_only=True))
    proj = model.model.multi_modal_projector
    own = proj.state_dict()
    if any(k.startswith("linear_") for k in own):  # HF module: back to linear_k names
        sd = {f"linear_{int(k.split('.')[0]) // 2 + 1}.{k.split('.', 1)[1]}": v for k, v in
              ((hf_to_seq(k), v) for k, v in sd.items())}
    missing, unexpected = proj.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{p}: projector weights do not fit this model (missing {missing}, unexpected {unexpected})")


def data_records(args) -> list[dict]:
    src = Path(args.data)
    if src.is_dir():
        src = src / WORLD_FILES[args.stage]
    records = load_llava_json(src, args.image_folder)
    return records[: args.max_samples] if args.max_samples else records


class StageModule(torch.nn.Module):
    """The engine's module: the LLaVA loss; the vision path runs on every step (a zero-weighted dummy
    image for text-only batches) so ZeRO-3 ranks gather the same parameters."""

    def __init__(self, llava, fused):
        super().__init__()
        self.model = llava.model
        self.fused, self.image_attention = fused, llava.image_attention
        self.image_size = llava.config.vision_config.image_size

    def forward(self, input_ids, labels, attention_mask, pixel_values=None):
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "pixel_values": pixel_values}
        loss = ml.llava_loss(self.model, batch, self.fused, self.image_attention)
        if pixel_values is None:
            dummy = torch.zeros(1, 3, self.image_size, self.image_size, device=input_ids.device)
            loss = loss + 0.0 * ml.image_features(self.model, dummy).sum()
        return loss


def param_groups(model, args):
    proj, tower, rest = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if "multi_modal_projector" in name else tower if "vision_tower" in name else rest).append(p)
    groups = [{"params": proj, "lr": args.mm_projector_lr or args.lr, "weight_decay": 0.0}]
    if tower:
        groups.append({"params": tower, "lr": args.vision_tower_lr or args.lr, "weight_decay": args.wd})
    if rest:
        groups.append({"params": rest, "lr": args.lr, "weight_decay": args.wd})
    return groups


# --------------------------------------------------------------------------- export
def export(args, llava, state: dict, out_dir: Path) -> None:
    """Rank 0: a fresh model (no ZeRO) with the gathered weights, saved in llava-hf layout."""
    fresh = ml.build_llava(args.model, llm=args.llm, projector=args.projector,
                           vision_select_layer=args.vision_select_layer,
                           vision_select_feature=args.vision_select_feature, kernels=False,
                           image_attention=args.image_attention, image_aspect_ratio=args.image_aspect_ratio,
                           model_max_length=llava.model_max_length, tokenizer=llava.tokenizer, device="cpu")
    fresh.template = llava.config.mmfast_template  # the chat template (stage 1 trained with `plain`)
    target, peft_model = fresh.model, None
    if args.stage == 2 and args.lora:
        peft_model = add_lora(fresh.model, args)
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and target.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"export: gathered weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if peft_model is not None and args.merge_lora:
        fresh.model = peft_model.merge_and_unload()
    elif peft_model is not None:
        peft_model.save_pretrained(str(out_dir))  # adapter_config.json + adapter_model.safetensors
        fresh.model = peft_model.unload()
    fresh.model.config.mmfast_template = fresh.template
    fresh.save_pretrained(out_dir)


def precheck(args) -> None:
    """Before any rank starts: the data and the stage-1 projector exist."""
    src = Path(args.data)
    if not src.exists():
        raise FileNotFoundError(f"--data {src}: no such file or folder")
    if src.is_dir() and not (src / WORLD_FILES[args.stage]).is_file():
        raise FileNotFoundError(f"--data {src}: a folder needs {WORLD_FILES[args.stage]} for stage {args.stage}")
    if args.pretrain_mm_projector and not Path(args.pretrain_mm_projector).is_file():
        raise FileNotFoundError(f"--pretrain-mm-projector {args.pretrain_mm_projector}: file not found")


def save_outputs(args, llava, state, run) -> None:
    """Rank 0: mm_projector.bin (stage 1) and final/ (llava-hf layout)."""
    from mmfast.utils.io import atomic_torch_save

    if run.rank != 0 or args.no_export:
        return
    if args.stage == 1:
        prefix = "model.multi_modal_projector."
        proj = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        atomic_torch_save(projector_state_llava(proj), run.out / "mm_projector.bin")
    run.export(lambda d: export(args, llava, state, d))


@E.entry
def main(argv=None) -> int:
    from mmfast.models.llava.data import LlavaSupervisedDataset, modality_grouped_order
    from mmfast.training.data import ResumableBatches

    args = parse_args(argv)
    run = E.Run(args, "train_llava")
    llava, _ = build(args, run.device)
    dataset = LlavaSupervisedDataset(data_records(args), llava.tokenizer, llava.template, llava.image_processor,
                                     llava.n_image_tokens, llava.model_max_length)
    total = args.steps or max(1, int(args.epochs * (len(dataset) // (args.batch_size * run.world))))
    optimizer = torch.optim.AdamW(param_groups(llava.model, args), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = E.cosine_with_warmup(optimizer, max(1, int(args.warmup_ratio * total)), total)
    engine = run.initialize(StageModule(llava, fused=not args.no_kernels), optimizer, scheduler)
    lengths, gb = dataset.modality_lengths(), args.batch_size * run.world
    order = (lambda e: modality_grouped_order(lengths, gb, args.seed * 7919 + e)) if args.group_by_modality_length else None
    sampler = ResumableBatches(len(lengths), args.batch_size, run.rank, run.world, args.seed, run.start, total, order)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=llava.collate)
    trainable = [p for p in llava.model.parameters() if p.requires_grad]
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
    banner = (f"stage {args.stage}, {args.model}, template {llava.template}, {len(dataset)} records, {n_train} "
              f"trainable params{' (LoRA)' if args.lora else ''}, kernels {not args.no_kernels}")
    for step, batch in run.steps(loader, total, f"train llava stage {args.stage}", banner):
        pix = batch["pixel_values"]
        loss = engine(batch["input_ids"].to(run.device), batch["labels"].to(run.device),
                      batch["attention_mask"].to(run.device),
                      pix.to(run.device, dtype=run.dtype) if pix is not None else None)
        run.backward(loss, samples=int(batch["attention_mask"].sum()) * run.world)  # ranks see similar batches
        if run.should_log(step):  # lr: the LLM group (stage 1: the projector)
            run.log(step, {"loss": float(loss.detach()), "lr": run.scheduler.get_last_lr()[-1]}, rate="tokens_per_s")
    state = run.gather_state(llava.model) if not args.no_export else None
    save_outputs(args, llava, state, run)
    return run.finish({"stage": args.stage, "model": args.model, "lora": args.lora, "template": llava.template,
                       "final": None if args.no_export else str(run.out / "final")}, state)


if __name__ == "__main__":
    E.exit_rank(main())
