"""Run by test_projection_zero3.py in a fresh process: a 1-process gloo DeepSpeed ZeRO-3 engine on CPU.

Case "head": a tiny model whose head module calls fused_linear_cross_entropy on its own (partitioned)
weight inside its forward. Case "llama": a tiny HF LlamaForCausalLM patched with mmfast.patch (the loss
runs inside lm_head's forward). Each is compared with the unpatched model under the same engine config;
prints one JSON line with the losses and the full gradients' max differences.
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.nn.functional as F


class Head(torch.nn.Module):
    def __init__(self, hidden, vocab, fused, backend):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(vocab, hidden) * 0.1)
        self.fused, self.backend = fused, backend

    def forward(self, h, t):
        if self.fused:
            from mmfast.ops.projection import fused_linear_cross_entropy

            return fused_linear_cross_entropy(h, self.weight, t, backend=self.backend, chunk_size=3)
        return F.cross_entropy(F.linear(h, self.weight), t)


class Tiny(torch.nn.Module):
    def __init__(self, fused, backend):
        super().__init__()
        self.body = torch.nn.Linear(16, 16)
        self.head = Head(16, 50, fused, backend)

    def forward(self, x, t):
        return self.head(torch.tanh(self.body(x)), t)


def _engine(model):
    import deepspeed

    cfg = {"train_batch_size": 1, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _run(model, step):
    from deepspeed.utils import safe_get_full_grad

    engine = _engine(model)
    partitioned = [n for n, p in model.named_parameters() if p.numel() == 0 and hasattr(p, "ds_id")]
    loss = step(engine)
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
    return loss.item(), grads, partitioned


def main(case, backend):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    results = []
    if case == "head":
        x, t = torch.randn(7, 16), torch.randint(0, 50, (7,))
        t[2] = -100
        for fused in (False, True):
            torch.manual_seed(1)
            results.append(_run(Tiny(fused, backend), lambda e: e(x, t)))
    else:
        import transformers

        import mmfast

        cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        ids = torch.randint(0, 97, (2, 9))
        for fused in (False, True):
            torch.manual_seed(1)
            model = transformers.LlamaForCausalLM(cfg)
            if fused:
                mmfast.patch(model, kinds=("loss",), backend=backend)
            results.append(_run(model, lambda e: e(input_ids=ids, labels=ids).loss))
    (l0, g0, _p0), (l1, g1, p1) = results
    print(json.dumps({
        "loss": [l0, l1],
        "partitioned": p1,
        "grad_max_diff": {n: (g0[n] - g1[n]).abs().max().item() for n in g0},
        "grad_max_abs": {n: g0[n].abs().max().item() for n in g0},
    }), flush=True)
    dist.destroy_process_group()  # before the interpreter finalizes (see zero3_patch_train_worker.py)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from mmfast.training.engine import exit_rank

    exit_rank(0)  # skip the finalization whose gloo teardown can abort a finished rank
