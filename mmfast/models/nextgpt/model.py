"""NExT-GPT: any-to-any on frozen encoders, a LoRA-tuned LLaMA/Vicuna and frozen diffusion decoders.

    ng = build_nextgpt("tiny")                          # CPU preset: every part built from configs
    ng.set_stage(1)                                     # 1: input projections; 2: output projections + signal
                                                        #    token rows; 3: LoRA + both projections
    losses = ng.loss(batch)                             # {"loss", "lm", "align_image", ...}
    out = ng.generate(text="Draw a red cat.", out_dir="gen")   # {"text", "image": [PNG paths], ...}
    ng.save_pretrained(d); load_pretrained(d)

Flow: encoder (frozen, :mod:`mmfast.models.nextgpt.encoders`) -> input projection (``linear``: 1 token, ``group``: G
concept tokens) written over the ``<image>``/``<video>``/``<audio>`` placeholders -> LLM (+ LoRA, mmfast
kernels with ``kernels=True``) -> the signal tokens' last hidden states + their input embeddings ->
output projection -> decoder conditioning (:mod:`mmfast.models.nextgpt.decoders`). Signal tokens ``[IMG0..3]``,
``[VID0..23]``, ``[AUD0..7]`` are added to the tokenizer; their embedding and LM-head rows train in
stage 2 (a gradient mask keeps every other row bit-identical).

Stage-2 alignment loss: mean over conditioning tokens of ``||proj(h) - text_encoder(caption)||_2``.
Persistence: ``config.json`` (``"mmfast_model": "nextgpt"``), ``trainable.safetensors`` (projections,
LoRA, new-token rows) and, for parts built from configs (random), ``components.safetensors``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from mmfast.models.nextgpt import data as nd
from mmfast.models.nextgpt import decoders as ndec
from mmfast.models.nextgpt import encoders as nenc
from mmfast.models.presets import preset_names, read_preset

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "nextgpt"
TRAINABLE_FILE, COMPONENTS_FILE = "trainable.safetensors", "components.safetensors"


def list_presets() -> list[str]:
    return preset_names(PRESET_DIR)


def load_preset(name: str) -> dict:
    return read_preset(PRESET_DIR, name, "NExT-GPT")


def _build_llm(spec):
    """(LlamaForCausalLM, tokenizer, built_from_config): an LLaVA preset name's LLM or a local directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(spec, str) and Path(spec).is_dir() and json.loads(
            (Path(spec) / "config.json").read_text(encoding="utf-8")).get("model_type") == "llava":
        return (*_llm_of_llava(spec), False)
    if isinstance(spec, str) and Path(spec).is_dir():
        llm = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        return llm, tok, False
    from mmfast.models.llava import model as llava

    pre = llava.load_preset(spec)  # reuse the LLaVA preset's LLM config and tiny tokenizer
    tok = AutoTokenizer.from_pretrained(str(llava.PRESET_DIR / pre["tokenizer"]), local_files_only=True)
    cfg = AutoConfig.for_model(**pre["llm"])
    cfg.vocab_size = len(tok)
    return AutoModelForCausalLM.from_config(cfg), tok, True


def _llm_of_llava(path):
    """The language model (+ LM head) and tokenizer of a llava-hf directory (e.g. the demo's tuned LLaVA)."""
    from transformers import AutoModelForCausalLM

    from mmfast.models.llava.model import load_pretrained as load_llava

    lv = load_llava(path, device="cpu", kernels=False)
    llm = AutoModelForCausalLM.from_config(lv.model.config.text_config)
    llm.model.load_state_dict(lv.model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(lv.model.lm_head.state_dict())
    return llm, lv.tokenizer


class NextGPT(nn.Module):
    def __init__(self, cfg: dict, kernels: bool = False, backend: str | None = None):
        from transformers import AddedToken

        super().__init__()
        self.cfg = cfg
        self.llm, self.tokenizer, self._llm_random = _build_llm(cfg["llm"])
        tok = self.tokenizer
        self.base_vocab = len(tok)
        new = [p for p in nd.PLACEHOLDERS.values() if p not in tok.get_vocab()]
        # lstrip: a signal token swallows the space before it, so " [IMG0]" is one token; otherwise a lone
        # space token would stand between the prompt and the run, and the LLM (frozen in stage 2) cannot learn it.
        new += [AddedToken(t, special=True, lstrip=True) for m in nd.MODALITIES for t in nd.SIGNAL_TOKENS[m]]
        tok.add_tokens(new, special_tokens=True)
        if tok.pad_token is None:
            tok.pad_token = tok.unk_token
        self.llm.resize_token_embeddings(len(tok), mean_resizing=False)
        self.llm.config.pad_token_id = tok.pad_token_id
        self.signal_ids = {m: tok.convert_tokens_to_ids(nd.SIGNAL_TOKENS[m]) for m in nd.MODALITIES}
        self.placeholder_ids = {m: tok.convert_tokens_to_ids(p) for m, p in nd.PLACEHOLDERS.items()}
        self.new_ids = list(range(self.base_vocab, len(tok)))
        hidden = self.llm.config.hidden_size
        self.encoders = nenc.build_encoders(cfg)
        kind = cfg.get("input_projection", "linear")
        self.input_proj = nn.ModuleDict({m: nenc.input_projection(kind, self.encoders[m].dim, hidden,
                                                                  cfg.get("n_groups", 4)) for m in nd.MODALITIES})
        self.n_input_tokens = self.input_proj["image"].n_tokens
        dec_specs = cfg["decoders"]
        # The output projections draw their initial weights from seeds drawn here, before the decoders are built:
        # what a decoder draws while it is built (a random one, or none when it is read from disk) does not move
        # them. (It did: swapping the random audio decoder for the shipped one moved the demo's NExT-GPT
        # t2i top-1 from 0.859 to 0.828, and the random video decoder's new layout to 0.766.)
        proj_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.pipes = {m: ndec.load_pipeline(m, dec_specs[m], tok) for m in nd.MODALITIES}
        # The pipelines' modules are registered so .to() and state_dict() reach them.
        self.decoders = nn.ModuleDict({m: nn.ModuleDict({k: getattr(p, k) for k in ("unet", "vae", "text_encoder",
                                                                                  "vocoder") if getattr(p, k, None)})
                                       for m, p in self.pipes.items()})
        op = cfg.get("output_projection", {})
        self.output_proj = nn.ModuleDict()
        for i, m in enumerate(nd.MODALITIES):  # one seed each: a projection's shape follows its decoder's
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(proj_seed + i)
                self.output_proj[m] = ndec.OutputProjection(hidden, ndec.condition_shape(m, self.pipes[m]),
                                                            op.get("width", 64), op.get("layers", 1),
                                                            op.get("heads", 4), op.get("ffn"))
        self.lora_config = None
        self.kernels, self.backend = kernels, backend
        self.llm.requires_grad_(False)
        self.decoders.requires_grad_(False)
        self._row_hooks = []
        if kernels:
            from mmfast.models.patch import patch

            patch(self.llm, backend=backend)

    # ---- facts
    @property
    def device(self) -> torch.device:
        return self.llm.lm_head.weight.device

    @property
    def image_size(self) -> int:
        return self.encoders["image"].image_size

    def media_loader(self, root=None) -> nd.MediaLoader:
        from mmfast.models.llava.data import ImageProcessor

        return nd.MediaLoader(root, ImageProcessor(self.image_size, aspect="resize"),
                              int(self.cfg["encoders"].get("video_frames", 4)),
                              int(self.cfg.get("audio_samples", 16000)))

    # ---- which parameters train
    def add_lora(self, r: int | None = None, alpha: int | None = None, dropout: float | None = None) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        if self.lora_config is not None:
            return
        c = self.cfg.get("lora", {})
        self.lora_config = {"r": r or c.get("r", 8), "lora_alpha": alpha or c.get("alpha", 16),
                            "lora_dropout": c.get("dropout", 0.0) if dropout is None else dropout,
                            "target_modules": c.get("targets", ["q_proj", "v_proj"])}
        inject_adapter_in_model(LoraConfig(bias="none", **self.lora_config), self.llm.model)

    def set_stage(self, stage: int, modalities=nd.MODALITIES, rows=None, projections=None,
                  head_rows=()) -> list[str]:
        """Freeze everything, then unfreeze the stage's parameters (projections of ``modalities`` only, so
        every trainable parameter gets a gradient each step); returns their names.

        Stage 2 trains the embedding and LM-head rows of every added token, or only those of the ``rows``
        modalities' signal tokens, plus the LM-head rows alone of the ``head_rows`` modalities' (an LM-head row
        decides when a run opens; an embedding row moves the states the output projections read).
        ``projections`` (stages 2 and 3, default ``modalities``) names the output projections that train."""
        if stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {stage}")
        for what, mods in (("modalities", modalities), ("rows", rows or ()), ("head_rows", head_rows),
                           ("projections", projections or ())):
            bad = [m for m in mods if m not in nd.MODALITIES]
            if bad:
                raise ValueError(f"{what} {bad} are not in {nd.MODALITIES}")
        if (rows is not None or head_rows) and stage != 2:
            raise ValueError(f"rows, head_rows: only stage 2 trains signal-token rows, not stage {stage}")
        if projections is not None and stage == 1:
            raise ValueError("projections: stage 1 trains no output projection")
        self.requires_grad_(False)
        for h in self._row_hooks:
            h.remove()
        self._row_hooks = []
        for m in modalities:
            if stage in (1, 3):
                self.input_proj[m].requires_grad_(True)
        if stage in (2, 3):
            for m in (modalities if projections is None else projections):
                self.output_proj[m].requires_grad_(True)
        if stage == 2:
            both = self.new_ids if rows is None else [i for m in rows for i in self.signal_ids[m]]
            head = sorted({*both, *(i for m in head_rows for i in self.signal_ids[m])})
            self._train_rows(self.llm.get_input_embeddings().weight, both)
            self._train_rows(self.llm.get_output_embeddings().weight, head)
        if stage == 3:
            self.add_lora()
            for n, p in self.llm.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def _train_rows(self, w: torch.Tensor, ids: list[int]) -> None:
        """Rows ``ids`` (added tokens) of the embedding or LM-head matrix ``w`` train; a gradient mask zeroes
        every other row."""
        if not ids:
            return
        w.requires_grad_(True)
        mask = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
        mask[ids] = 1
        self._row_hooks.append(w.register_hook(lambda g, m=mask: g * m.to(g.dtype)))

    # ---- forward
    def embed(self, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
        """Token embeddings (B, L, H) with projected media written over their placeholders."""
        emb = self.llm.get_input_embeddings()(input_ids)  # (B, L, H)
        for m in nd.MODALITIES:
            mask = input_ids == self.placeholder_ids[m]  # (B, L)
            n = int(mask.sum())
            x = media.get(m)
            if x is None or x.numel() == 0:
                if n:
                    raise ValueError(f"input_ids hold {n} {nd.PLACEHOLDERS[m]} tokens but no {m} inputs were given")
                continue
            with torch.no_grad():
                enc = self.encoders[m](x.to(self.device))
            tokens = self.input_proj[m](enc)  # (N, T, H)
            if n != tokens.shape[0] * tokens.shape[1]:
                raise ValueError(f"{m}: input_ids hold {n} placeholder tokens but {tokens.shape[0]} inputs x "
                                 f"{tokens.shape[1]} tokens = {tokens.shape[0] * tokens.shape[1]}")
            emb = emb.masked_scatter(mask.unsqueeze(-1), tokens.to(emb.dtype).reshape(-1, emb.shape[-1]))
        return emb

    def hidden(self, input_ids, attention_mask=None, media=None):
        emb = self.embed(input_ids, media or {})
        out = self.llm.model(inputs_embeds=emb, attention_mask=attention_mask)
        return out.last_hidden_state, emb  # (B, L, H) each

    def signal_states(self, modality: str, input_ids, hidden, emb) -> torch.Tensor:
        """(R, S, H): per complete signal run (in batch order) its last hidden states + input embeddings."""
        ids = torch.tensor(self.signal_ids[modality], device=input_ids.device)
        mask = torch.isin(input_ids, ids)  # (B, L)
        s = len(ids)
        n = int(mask.sum())
        if n % s:
            raise ValueError(f"{modality}: {n} signal tokens is not a whole number of {s}-token runs")
        x = (hidden + emb)[mask]  # (R·S, H) in (batch, position) order
        return x.reshape(-1, s, x.shape[-1])

    def lm_loss(self, hidden, labels) -> torch.Tensor:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(L-1), H)
        target = labels[:, 1:].reshape(-1)
        keep = target != nd.IGNORE_INDEX
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        h, target = h[keep], target[keep]
        head = self.llm.get_output_embeddings()
        if self.kernels:
            from mmfast.models.patch import backend_of
            from mmfast.ops import fused_linear_cross_entropy

            return fused_linear_cross_entropy(h, head.weight, target, None, backend=backend_of(self.llm))
        return nn.functional.cross_entropy(head(h).float(), target)

    @torch.no_grad()
    def signal_lm_loss(self, hidden, labels) -> torch.Tensor | None:
        """Detached cross-entropy over the positions whose target is a signal token (a diagnostic: how well the
        LLM starts and continues runs); None when the batch supervises none."""
        target = labels[:, 1:]  # (B, L-1)
        ids = torch.tensor([i for m in nd.MODALITIES for i in self.signal_ids[m]], device=labels.device)
        keep = torch.isin(target, ids)
        if not bool(keep.any()):
            return None
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][keep])  # (N_signal, V)
        return nn.functional.cross_entropy(logits.float(), target[keep])

    def loss(self, batch: dict, align_weight: float = 1.0, diffusion_weight: float = 0.0,
             touch_all: bool = False) -> dict:
        """LM loss on supervised tokens, plus per modality the alignment loss (and optional diffusion loss);
        ``lm_signal`` (logged, not in ``loss``) is the LM loss restricted to the signal tokens.

        ``touch_all`` adds a zero-weighted pass through every trainable projection the batch did not use, so
        data-parallel ranks with different modalities in their batches reduce the same gradients."""
        ids = batch["input_ids"].to(self.device)
        mask = batch.get("attention_mask")
        hidden, emb = self.hidden(ids, mask.to(self.device) if mask is not None else None, batch.get("media", {}))
        labels = batch["labels"].to(self.device)
        out = {"lm": self.lm_loss(hidden, labels)}
        signal = self.signal_lm_loss(hidden, labels)
        if signal is not None:
            out["lm_signal"] = signal
        total = out["lm"]
        for m, caps in batch.get("captions", {}).items():
            pred = self.output_proj[m](self.signal_states(m, ids, hidden, emb))  # (R, Q, C)
            if pred.shape[0] != len(caps):
                raise ValueError(f"{m}: {pred.shape[0]} signal-token runs but {len(caps)} target captions")
            target = ndec.text_condition(m, self.pipes[m], caps, self.device)
            # Reduced in fp32: in bf16 the mean of (R, Q) norms would keep only 8 mantissa bits.
            out[f"align_{m}"] = (pred.float() - target.float()).norm(dim=-1).mean()
            total = total + align_weight * out[f"align_{m}"]
            if diffusion_weight:
                tm = (batch.get("target_media") or {}).get(m)
                if tm is None:
                    raise ValueError(f"diffusion_weight > 0 needs batch['target_media'][{m!r}] (the records' "
                                     "target_media, loaded by DialogueDataset with target_sizes)")
                out[f"diffusion_{m}"] = ndec.diffusion_loss(m, self.pipes[m], pred, tm.to(self.device))
                total = total + diffusion_weight * out[f"diffusion_{m}"]
        if touch_all:
            total = total + 0.0 * self._unused_projections(batch.get("media", {}), out, hidden)
        out["loss"] = total
        return out

    def _unused_projections(self, media: dict, out: dict, hidden) -> torch.Tensor:
        zero = hidden.new_zeros(())
        for m in nd.MODALITIES:
            ip, op = self.input_proj[m], self.output_proj[m]
            x = media.get(m)
            if (x is None or x.numel() == 0) and any(p.requires_grad for p in ip.parameters()):
                d = self.encoders[m].dim
                zero = zero + ip(nenc.EncoderOutput(hidden.new_zeros(1, 1, d), hidden.new_zeros(1, d))).sum()
            if f"align_{m}" not in out and any(p.requires_grad for p in op.parameters()):
                zero = zero + op(hidden.new_zeros(1, 1, hidden.shape[-1])).sum()
        return zero

    def forward(self, input_ids, labels, attention_mask=None, media=None, captions=None):
        return self.loss({"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                          "media": media or {}, "captions": captions or {}})["loss"]

    # ---- inference (mmfast.models.nextgpt.generate)
    def generate(self, text: str, images=None, audios=None, videos=None, **kw) -> dict:
        """Greedy reply to ``text`` (+ media); signal-token runs are decoded to media (files under ``out_dir``)."""
        from mmfast.models.nextgpt.generate import generate

        return generate(self, text, images, audios, videos, **kw)

    def answer(self, images, questions, max_new_tokens: int = 16, *, cache: str = "auto") -> list[str]:
        """One greedy text answer per (image, question); the evaluation adapters' contract. On an LLM patched
        with mmfast attention the questions decode in one batch (``cache="paged"``)."""
        from mmfast.models.nextgpt.generate import answer

        return answer(self, images, questions, max_new_tokens, cache)

    def load_trainable(self, sd: dict, src="trainable weights") -> None:
        """Projections, LoRA and new-token rows from :data:`TRAINABLE_FILE` (or a gathered state dict)."""
        rows = {k: sd[k] for k in ("new_rows.embed", "new_rows.head") if k in sd}
        if len(rows) != 2:
            raise ValueError(f"{src}: missing new_rows.embed / new_rows.head")
        rest = {k: v for k, v in sd.items() if k not in rows}
        own = self.state_dict()
        missing = [k for k in own if (k.startswith(("input_proj.", "output_proj.")) or "lora_" in k) and k not in rest]
        if missing:
            raise ValueError(f"{src}: weights missing for {missing[:5]}")
        _load_into(self, rest, src)
        with torch.no_grad():
            self.llm.get_input_embeddings().weight[self.new_ids] = rows["new_rows.embed"].to(self.llm.dtype)
            self.llm.get_output_embeddings().weight[self.new_ids] = rows["new_rows.head"].to(self.llm.dtype)

    # ---- persistence
    def save_pretrained(self, out_dir, state: dict | None = None) -> Path:
        """``config.json`` + ``trainable.safetensors`` (+ ``components.safetensors`` for parts built from
        configs). ``state``: a full state dict to save instead of this module's (gathered from DeepSpeed)."""
        from mmfast.utils.io import atomic_open, atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = state if state is not None else self.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        emb_key = next(k for k in state if k.endswith("embed_tokens.weight"))
        head_key = next(k for k in state if k.startswith("llm.lm_head") and k.endswith("weight"))
        train = {k: v for k, v in state.items() if k.startswith(("input_proj.", "output_proj.")) or "lora_" in k}
        train["new_rows.embed"] = state[emb_key][self.new_ids].clone()
        train["new_rows.head"] = state[head_key][self.new_ids].clone()
        parts = {k: v for k, v in state.items() if "lora_" not in k and (
            (k.startswith("llm.") and self._llm_random)
            or (k.startswith(("encoders.image.", "encoders.audio.")) and not isinstance(
                self.cfg["encoders"][k.split(".")[1]], str))
            or (k.startswith("decoders.") and not isinstance(self.cfg["decoders"][k.split(".")[1]], str)))}
        parts = {k.replace("base_layer.", ""): v for k, v in parts.items()}  # encoders.video shares image's
        for name, sd in ((TRAINABLE_FILE, train), (COMPONENTS_FILE, parts)):
            if sd:
                with atomic_open(out / name, "wb") as f:
                    f.write(_safetensors_bytes(sd))
        cfg = {**self.cfg, "mmfast_model": "nextgpt", "lora_config": self.lora_config}
        atomic_write_json(out / "config.json", cfg)
        return out


def _safetensors_bytes(sd: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sd.items()})


def build_nextgpt(preset: str | dict = "tiny", *, input_projection: str | None = None, image_encoder=None,
                  llm=None, kernels: bool | None = None, device=None, dtype=None, seed: int | None = None,
                  backend: str | None = None) -> NextGPT:
    """A NExT-GPT from a preset name (``tiny``, ``vicuna7b``) or a config dict; ``image_encoder`` replaces the
    preset's image (and video) encoder with a local CLIP directory or open_clip export, ``llm`` its LLM with a
    LLaMA/Vicuna directory or a llava-hf directory (its language model)."""
    cfg = dict(load_preset(preset) if isinstance(preset, str) else preset)
    if input_projection is not None:
        cfg["input_projection"] = input_projection
    if llm is not None:
        cfg["llm"] = str(Path(llm).resolve()) if Path(llm).is_dir() else llm
    if image_encoder is not None:
        cfg["encoders"] = {**cfg["encoders"], "image": str(Path(image_encoder).resolve())}
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    kernels = (device.type == "cuda") if kernels is None else kernels
    model = NextGPT(cfg, kernels=False)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    if kernels:
        from mmfast.models.patch import patch

        model.kernels, model.backend = True, backend
        patch(model.llm, backend=backend)
    return model.eval()


def load_pretrained(model_dir, device=None, dtype=None, kernels: bool | None = None,
                    backend: str | None = None) -> NextGPT:
    """A saved NExT-GPT (see :meth:`NextGPT.save_pretrained`); ``answer`` serves evaluation adapters."""
    from mmfast.utils.io import load_state_dict, read_json

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d}: not a model directory (missing config.json)")
    cfg = read_json(d / "config.json", what="NExT-GPT config")
    if cfg.get("mmfast_model") != "nextgpt":
        raise ValueError(f"{d}/config.json: not a NExT-GPT model (mmfast_model={cfg.get('mmfast_model')!r})")
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    lora = cfg.pop("lora_config", None)
    cfg.pop("mmfast_model")
    model = build_nextgpt(cfg, kernels=False, device="cpu")
    if (d / COMPONENTS_FILE).is_file():
        _load_into(model, load_state_dict(d / COMPONENTS_FILE), d / COMPONENTS_FILE)
    if lora is not None:
        model.add_lora(lora["r"], lora["lora_alpha"], lora["lora_dropout"])
    if not (d / TRAINABLE_FILE).is_file():
        raise FileNotFoundError(f"{d}: missing {TRAINABLE_FILE}")
    model.load_trainable(load_state_dict(d / TRAINABLE_FILE), d / TRAINABLE_FILE)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    if (device.type == "cuda") if kernels is None else kernels:
        from mmfast.models.patch import patch

        model.kernels, model.backend = True, backend
        patch(model.llm, backend=backend)
    return model


def _load_into(model: NextGPT, sd: dict, src) -> None:
    own = model.state_dict()
    bad = [k for k in sd if k not in own]
    if bad:
        raise ValueError(f"{src}: weights do not fit this model (unexpected {bad[:5]})")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)


def chat_main(argv: list[str] | None = None) -> int:
    """``mmfast chat`` for a NExT-GPT directory (see :mod:`mmfast.models.nextgpt.generate`)."""
    from mmfast.models.nextgpt.generate import _parser, chat_loop

    a = _parser().parse_args(argv)
    try:
        model = load_pretrained(a.model, device=a.device, dtype=a.dtype)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"mmfast chat: {e}", file=sys.stderr)
        return 2
    return chat_loop(model, a)


__all__ = ["NextGPT", "build_nextgpt", "chat_main", "list_presets", "load_preset", "load_pretrained"]
