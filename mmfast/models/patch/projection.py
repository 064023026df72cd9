"""Patch rules for the projection family: LLaVA's projector, CLIP's heads and open_clip's MLPs.

Every rule patches *instances* (an instance-level ``forward``), never classes or source code, so the
parameters, their names and the state dict stay exactly as they were, and the undo restores the
class's method.

* ``llava.mlp_projector`` (projection): ``LlavaMultiModalProjector`` → :func:`mlp_projector`.
* ``llava.mm_projector_sequential`` (projection, any model type): a submodule named ``*mm_projector``
  that is an ``nn.Sequential`` of Linear/GELU/Linear… (the original LLaVA code) → :func:`mlp_projector`.
* ``clip.linear_l2_normalize`` (projection): HF ``CLIPModel.forward`` with each projection head and
  its L2 normalisation fused (:func:`linear_l2_normalize`), for transformers whose towers' outputs
  keep the pre-projection ``pooler_output`` (4.x). Transformers 5 returns the projected features
  there (``get_*_features``), which the fused op never forms: the rule does not apply, so the
  patched model returns exactly what transformers does.
* ``open_clip.linear_l2_normalize`` (projection): open_clip's ``encode_image``/``encode_text`` with
  ``normalize=True`` (what ``CLIP.forward`` uses): image projection + L2 fused; text when the
  text projection is an ``nn.Linear`` (a raw projection matrix keeps open_clip's own path).
* ``open_clip.mlp`` (projection): each residual block's ``mlp`` (``c_fc`` → ``nn.GELU`` → ``c_proj``)
  → :func:`mlp_projector` with ``recompute=True`` (QuickGELU blocks keep open_clip's path).
"""
from __future__ import annotations

import torch

from mmfast.models.patch import (
    PatchRule,
    backend_of,
    call_with_forward,
    config_value,
    forward_replaced,
    set_forwards,
    set_methods,
)


# --------------------------------------------------------------------------- projector
def _patch_llava_projector(model: torch.nn.Module):
    from mmfast.ops.projection import mlp_projector

    act = config_value(model, "projector_hidden_act") or "gelu"
    targets = []
    for m in model.modules():
        if type(m).__name__ != "LlavaMultiModalProjector":
            continue
        l1, l2 = getattr(m, "linear_1", None), getattr(m, "linear_2", None)
        if not isinstance(l1, torch.nn.Linear) or not isinstance(l2, torch.nn.Linear):
            continue

        def forward(image_features, _l1=l1, _l2=l2):
            return mlp_projector(image_features, [(_l1.weight, _l1.bias), (_l2.weight, _l2.bias)], act,
                                 backend=backend_of(model))

        targets.append((m, forward))
    return set_forwards(targets)


# --------------------------------------------------------------------------- CLIP heads
def _normalized_head(head: torch.nn.Linear, x, backend):
    """``normalize(head(x))`` as one op, computed inside ``head``'s own forward call so module hooks
    (DeepSpeed ZeRO-3 gathering ``head.weight``) fire around it. eps is far below any real norm:
    HF divides by the plain norm."""
    from mmfast.ops.projection import linear_l2_normalize

    return call_with_forward(
        head, lambda inp: linear_l2_normalize(inp, head.weight, head.bias, 1e-12, backend=backend), x)


def hf_clip_towers_carry_projections() -> bool:
    """Whether this transformers' ``CLIPModel.forward`` returns the *projected* features as its towers'
    ``pooler_output`` (transformers 5: through ``get_image_features`` / ``get_text_features``)."""
    import inspect

    import transformers.models.clip.modeling_clip as hf_clip

    try:
        return "get_image_features" in inspect.getsource(hf_clip.CLIPModel.forward)
    except (OSError, TypeError):  # no source to read: assume the newer layout, and leave it alone
        return True


def _patch_hf_clip_heads(model: torch.nn.Module):
    """HF ``CLIPModel.forward`` with each tower's projection and L2 normalisation as one op."""
    if type(model).__name__ != "CLIPModel" or not all(
        isinstance(getattr(model, n, None), torch.nn.Linear) for n in ("visual_projection", "text_projection")
    ):
        return None
    if hf_clip_towers_carry_projections():
        return None  # the outputs must carry the unnormalised projections, which the fused op never forms
    import transformers.models.clip.modeling_clip as hf_clip

    def forward(input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, return_loss=None,
                interpolate_pos_encoding=False, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:  # as transformers' can_return_tuple: the argument, else the config
            return_dict = getattr(model.config, "return_dict", True)
        vision = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                    return_dict=True, **kwargs)
        text = model.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                return_dict=True, **kwargs)
        image_embeds = _normalized_head(model.visual_projection, vision.pooler_output, backend_of(model))
        text_embeds = _normalized_head(model.text_projection, text.pooler_output, backend_of(model))
        logits_per_text = text_embeds @ image_embeds.t() * model.logit_scale.exp()
        contrastive = getattr(hf_clip, "image_text_contrastive_loss", None) or hf_clip.clip_loss
        loss = contrastive(logits_per_text) if return_loss else None
        # The projected, unnormalised features are never formed: the towers' outputs keep their
        # own pooler_output (pre-projection), as CLIPVisionModel / CLIPTextModel return it.
        out = hf_clip.CLIPOutput(
            loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
            text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text,
            vision_model_output=vision,
        )
        return out if return_dict else out.to_tuple()

    return set_forwards([(model, forward)])


def _patch_open_clip_heads(model: torch.nn.Module):
    """open_clip ``encode_image`` / ``encode_text`` with ``normalize=True``: projection + L2 as one op.

    Image: the visual tower runs as its own call (hooks fire) with the pooled features projected and
    normalised together (``VisionTransformer`` with a ``proj`` matrix). Text: fused when
    ``text_projection`` is an ``nn.Linear``; a plain projection matrix keeps open_clip's path.
    """
    from mmfast.ops.projection import linear_l2_normalize

    visual = getattr(model, "visual", None)
    image_ok = (isinstance(getattr(visual, "proj", None), torch.Tensor) and not getattr(visual, "output_tokens", True)
                and all(hasattr(visual, a) for a in ("_embeds", "_pool", "transformer")))
    text_ok = isinstance(getattr(model, "text_projection", None), torch.nn.Linear)
    if not (image_ok or text_ok) or not hasattr(model, "encode_image"):
        return None
    orig_image, orig_text = model.encode_image, model.encode_text
    targets = []

    if image_ok:
        def tower(image):  # (B, 3, H, W) -> (B, D) unit rows
            pooled, _ = visual._pool(visual.transformer(visual._embeds(image)))  # (B, width)
            return linear_l2_normalize(pooled, visual.proj.t(), None, 1e-12, backend=backend_of(model))

        def encode_image(image, normalize: bool = False):
            if not normalize:
                return orig_image(image, normalize=False)
            return call_with_forward(visual, tower, image)

        targets.append((model, "encode_image", encode_image))

    if text_ok:
        head = model.text_projection

        def encode_text(text, normalize: bool = False):
            if not normalize:
                return orig_text(text, normalize=False)
            fused = lambda x: linear_l2_normalize(x, head.weight, head.bias, 1e-12, backend=backend_of(model))
            with forward_replaced(head, fused):
                return orig_text(text, normalize=False)  # the head's output is already normalised

        targets.append((model, "encode_text", encode_text))
    return set_methods(targets)


def _patch_sequential_projectors(model: torch.nn.Module):
    """The original LLaVA code's ``mm_projector``: an ``nn.Sequential`` of Linear, GELU, Linear, …"""
    from mmfast.ops.projection import mlp_projector

    targets = []
    for name, m in model.named_modules():
        if not name.endswith("mm_projector") or not isinstance(m, torch.nn.Sequential) or len(m) % 2 == 0:
            continue
        linears, acts = list(m)[0::2], list(m)[1::2]
        if not all(isinstance(x, torch.nn.Linear) for x in linears) or not all(
            isinstance(a, torch.nn.GELU) and a.approximate == acts[0].approximate for a in acts
        ):
            continue
        act = "gelu_tanh" if acts and acts[0].approximate == "tanh" else "gelu"

        def forward(x, _lin=tuple(linears), _act=act):
            return mlp_projector(x, [(li.weight, li.bias) for li in _lin], _act, backend=backend_of(model))

        targets.append((m, forward))
    return set_forwards(targets)


def _patch_open_clip_mlps(model: torch.nn.Module):
    """open_clip's transformer MLPs (``mlp = Sequential(c_fc, gelu, c_proj)`` in every residual block,
    both towers) → :func:`mlp_projector` with ``recompute=True``: the bias + GELU in one pass, and only
    the pre-activation kept for the backward (the GELU output, 4× width, is recomputed there)."""
    from mmfast.ops.projection import mlp_projector

    targets = []
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp" or not isinstance(m, torch.nn.Sequential):
            continue
        parts = dict(m.named_children())
        fc, act, proj = parts.get("c_fc"), parts.get("gelu"), parts.get("c_proj")
        if (set(parts) != {"c_fc", "gelu", "c_proj"} or not isinstance(fc, torch.nn.Linear)
                or not isinstance(proj, torch.nn.Linear) or type(act) is not torch.nn.GELU):
            continue  # QuickGELU (OpenAI weights), scale_fc's inner LayerNorm: open_clip's own path

        def forward(x, _fc=fc, _proj=proj, _act="gelu_tanh" if act.approximate == "tanh" else "gelu"):
            return mlp_projector(x, [(_fc.weight, _fc.bias), (_proj.weight, _proj.bias)], _act, recompute=True,
                                 backend=backend_of(model))

        targets.append((m, forward))
    return set_forwards(targets)


RULES: list[PatchRule] = [
    PatchRule("llava.mlp_projector", "projection", ("llava",), _patch_llava_projector),
    PatchRule("llava.mm_projector_sequential", "projection", (), _patch_sequential_projectors),
    PatchRule("clip.linear_l2_normalize", "projection", ("clip",), _patch_hf_clip_heads),
    PatchRule("open_clip.linear_l2_normalize", "projection", ("open_clip",), _patch_open_clip_heads),
    PatchRule("open_clip.mlp", "projection", ("open_clip",), _patch_open_clip_mlps),
]
