"""One rank of test_patch_zero3_train.py: full fine-tuning of a tiny HF LlamaForCausalLM under a 2-rank
gloo DeepSpeed ZeRO-3 engine on CPU, unpatched and then patched with ``mmfast.patch``.

Every parameter trains, the LM head included (its weight is partitioned: size 0 outside the forward
and backward that gather it). Each model runs the same two optimizer steps on this rank's own batch
(the second with ``num_items_in_batch``, as HF's Trainer passes it, and with ZeRO-3's recorded
prefetch trace); the rank prints one JSON line with both models' losses, the first step's full
gradients and the parameters after the two steps.

    python zero3_patch_train_worker.py CASE BACKEND

CASE "untied": separate lm_head; "tied": lm_head shares embed_tokens' weight; "zero_init": untied,
built inside ``deepspeed.zero.Init`` (partitioned from construction, as HF's from_pretrained does
under ZeRO-3). The model is patched with every rule (``mmfast.patch(model)``).
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

VOCAB = 97
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_allow_untested_optimizer": True,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
             "optimizer": {"type": "SGD", "params": {"lr": 0.5}}}


def _engine(model):
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=DS_CONFIG)
    return engine


def _batches(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    out = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 11), generator=g)
        labels = ids.clone()
        labels[0, :3] = -100  # an unsupervised prompt
        labels[1, -2:] = -100
        out.append((ids, labels))
    return out


def _train(model, batches):
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    engine = _engine(model)
    head = model.lm_head.weight
    assert head.requires_grad and head.numel() == 0 and hasattr(head, "ds_id"), "lm_head.weight not partitioned"
    losses, grads = [], None
    for step, (ids, labels) in enumerate(batches):
        kw = {}
        if step == 1:  # HF Trainer's token count: the supervised tokens of this rank's batch, after the shift
            kw["num_items_in_batch"] = (labels[:, 1:] != -100).sum()
        loss = engine(input_ids=ids, labels=labels, **kw).loss
        engine.backward(loss)
        if step == 0:
            grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
        engine.step()
        losses.append(loss.item())
    params = {n: safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
    return losses, grads, params


def main(case, backend):
    import torch.distributed as dist
    import transformers

    import mmfast

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=case == "tied")
    # Resolve the class (transformers imports modeling_llama lazily) before any zero.Init: a class defined
    # inside zero.Init has its __init__ restored on exit to the one seen at definition, dropping what a
    # class decorator set afterwards (the `kernels` package's per-instance `_kernel_funcs` on LlamaAttention),
    # so every later instance would fail in forward.
    llama_cls = transformers.LlamaForCausalLM
    batches = _batches(rank)
    runs = {}
    for fused in (False, True):
        torch.manual_seed(1)  # the same initial weights on every rank and for both models
        if case == "zero_init":
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
                model = llama_cls(cfg)
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                init = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            model = llama_cls(cfg)
            init = {n: p.detach().clone() for n, p in model.named_parameters()}
        if fused:
            mmfast.patch(model, backend=backend)
            assert "causal_lm.fused_linear_cross_entropy" in mmfast.models.patch.patched_rules(model)
        losses, grads, params = _train(model, batches)
        runs[fused] = (losses, grads, params, init)
    (l0, g0, p0, init), (l1, g1, p1, _) = runs[False], runs[True]
    print(json.dumps({
        "rank": rank,
        "loss": [l0, l1],
        "grad_max_diff": {n: (g0[n] - g1[n]).abs().max().item() for n in g0},
        "grad_max_abs": {n: g0[n].abs().max().item() for n in g0},
        "param_max_diff": {n: (p0[n] - p1[n]).abs().max().item() for n in p0},
        "param_max_abs": {n: p0[n].abs().max().item() for n in p0},
        "param_moved": {n: (p0[n] - init[n]).abs().max().item() for n in p0},
    }), flush=True)
    # Leave the group before the interpreter finalizes: gloo's threads torn down by static destructors
    # once ended a finished rank with "terminate called without an active exception" (SIGABRT).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from mmfast.training.engine import exit_rank

    exit_rank(0)  # skip the finalization whose gloo teardown can abort a finished rank
