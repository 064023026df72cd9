"""The CLIP recipe (mmfast.training.clip): data order, configs, launcher, and short 2-rank DeepSpeed runs on CPU."""
import base64
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from mmfast.training import clip as train_clip
from mmfast.training import data as clip_data
from mmfast.training import engine, launch
from mmfast.training.dsconfig import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- fast unit tests
def test_batches_partition_each_global_batch_across_ranks():
    n, b, world = 50, 4, 3  # 4 steps per epoch (48 of 50 used), 2 epochs
    per_rank = [list(clip_data.ResumableBatches(n, b, r, world, seed=5, start=0, total=8, keyed=True))
                for r in range(world)]
    for step in range(8):
        keys = [k for r in range(world) for k in per_rank[r][step]]
        assert len(keys) == b * world and len(set(keys)) == b * world
        assert {e for e, _ in keys} == {step // 4}
    epoch0 = {i for r in range(world) for s in range(4) for _, i in per_rank[r][s]}
    assert len(epoch0) == 48
    assert per_rank[0][0] != per_rank[0][4]  # a fresh permutation each epoch


def test_batches_resume_at_any_step_matches_uninterrupted():
    full = list(clip_data.ResumableBatches(40, 4, 1, 2, seed=0, start=0, total=12, keyed=True))
    for start in (0, 3, 5, 11):
        assert list(clip_data.ResumableBatches(40, 4, 1, 2, seed=0, start=start, total=12, keyed=True)) == full[start:]
    with pytest.raises(ValueError, match="smaller than one global batch"):
        clip_data.ResumableBatches(7, 4, 0, 2, seed=0, start=0, total=1)


def test_seeded_pairs_augment_by_key_not_by_global_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.rand(4) + i

    ds = clip_data.SeededPairs(Noise(), seed=1)
    a = ds[(0, 2)]
    torch.rand(100)  # the caller's RNG moves on
    state = torch.get_rng_state()
    assert torch.equal(ds[(0, 2)], a)
    assert torch.equal(torch.get_rng_state(), state)  # and is left untouched
    assert not torch.equal(ds[(1, 2)], a)  # another epoch, another crop


def test_ds_config_auto_entries_resolve_for_cpu():
    cfg = load_config("zero3_offload", 8, 2, on_gpu=False)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["bf16"]["enabled"] is False
    assert cfg["zero_optimization"]["offload_optimizer"]["pin_memory"] is False
    assert load_config("zero2", 8, 2, on_gpu=True)["bf16"]["enabled"] is True
    for name in ("zero0", "zero1", "zero2", "zero3"):
        assert load_config(name, 4, 1, on_gpu=False)["zero_optimization"]["stage"] == int(name[-1])
    with pytest.raises(FileNotFoundError, match="zero2"):
        load_config("zero9", 4, 1, on_gpu=False)


@pytest.mark.parametrize("text, message", [
    ('{"zero_optimization": {"stage": 2}', "malformed JSON at line 1"),
    ('[{"zero_optimization": {"stage": 2}}]', "expected a JSON object, got a list"),
    ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage must be one of (0, 1, 2, 3), got 4"),
    ('{"zero_optimization": "two"}', "zero_optimization must be an object"),
    ('{"train_micro_batch_size_per_gpu": 16}', "train_micro_batch_size_per_gpu 16 conflicts with --batch-size 8"),
    ('{"train_batch_size": 32}', "train_batch_size 32 != --batch-size 8 x gradient_accumulation_steps 1 x 2 ranks"),
    ('{"gradient_accumulation_steps": 0}', "gradient_accumulation_steps must be a positive integer"),
    ('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}', "both enabled"),
    ('{"checkpoint": {"load_universal": true}}', "load_universal is not supported"),
])
def test_ds_config_errors_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path), 8, 2, on_gpu=False)
    assert message in str(e.value) and str(path) in str(e.value)


def test_no_weight_decay_on_gains_biases_and_temperature():
    from mmfast.models.clip.model import create_model

    model = train_clip.ContrastiveModel(create_model("tiny", device="cpu", kernels=False))
    decay, no_decay = train_clip.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "clip.logit_scale" in nd and "clip.token_embedding.weight" in nd
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_cosine_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.cosine_with_warmup(opt, warmup=4, total=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:])) and lrs[-1] < 0.05


def test_launcher_builds_module_commands(capsys, tmp_path):
    cmd = launch.launch_command("mmfast.training.clip", 2, ["--config", "tiny"], "deepspeed", 29999)
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.launch"]  # one node: DeepSpeed's node launcher itself
    world = next(a for a in cmd if a.startswith("--world_info="))[len("--world_info="):]
    assert json.loads(base64.urlsafe_b64decode(world)) == {"localhost": [0, 1]}
    assert "--master_addr=127.0.0.1" in cmd and "--master_port=29999" in cmd
    assert cmd[-4:] == ["--module", "mmfast.training.clip", "--config", "tiny"]  # no script path: a wheel runs too
    cmd = launch.launch_command("mmfast.training.clip", 3, [], "torchrun", 29999)
    assert "torch.distributed.run" in cmd and cmd[cmd.index("--nproc_per_node") + 1] == "3"
    cmd = launch.launch_command("mmfast.training.clip", 1, [], "deepspeed", 29999, nnodes=2, node_rank=1,
                                master_addr="10.0.0.1")
    assert "torch.distributed.run" in cmd and cmd[cmd.index("--node_rank") + 1] == "1"  # multi-node: torchrun
    with pytest.raises(ValueError, match="--node-rank 2"):
        launch.launch_command("mmfast.training.clip", 1, [], nnodes=2, node_rank=2)
    out = tmp_path / "o"
    assert launch.clip_main(["--nproc", "0", "--data", ".", "--out", str(out)]) == 2
    assert "--nproc must be >= 1" in capsys.readouterr().err
    assert launch.clip_main(["--nproc", "2", "--print-command", "--config", "tiny", "--data", ".", "--out", str(out)]) == 0
    assert "mmfast.training.clip" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--config", "no-such-preset", "--data", "."], "unknown CLIP model 'no-such-preset'"),
    (["--config", "tiny", "--data", "/no/such/world"], "--data /no/such/world: no such file"),
    (["--config", "tiny", "--data", ".", "--deepspeed-config", "zero7"], "zero7: no such file or preset"),
    (["--config", "tiny", "--data", ".", "--pretrained", "/no/ckpt.pt"], "nothing is downloaded"),
    (["--config", "tiny", "--data", ".", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["--config", "tiny", "--data", ".", "--steps", "-3"], "--steps: must be >= 1, got -3"),
    (["--config", "tiny", "--data", ".", "--lr", "nan"], "--lr: must be a positive number"),
    (["--config", "tiny", "--data", ".", "--resume", "latest"], "--resume latest: no checkpoint in"),
    (["--config", "tiny", "--data", ".", "--resume", "/no/ckpt"], "--resume /no/ckpt: expected 'latest'"),
    (["--config", "tiny", "--data", ".", "--resume", "latest", "--overwrite"], "contradict"),
])
def test_launcher_rejects_bad_inputs_before_spawning(args, message, capsys, tmp_path):
    assert launch.clip_main(["--nproc", "2", "--out", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_launcher_checks_the_deepspeed_json_before_spawning(tmp_path, capsys):
    bad = tmp_path / "list.json"
    bad.write_text('[{"zero_optimization": {"stage": 2}}]')
    assert launch.clip_main(["--nproc", "2", "--data", ".", "--out", str(tmp_path / "r"), "--deepspeed-config", str(bad)]) == 2
    assert "expected a JSON object, got a list" in capsys.readouterr().err
    mb = tmp_path / "mb.json"
    mb.write_text('{"train_batch_size": 48, "zero_optimization": {"stage": 2}}')
    assert launch.clip_main(["--nproc", "2", "--data", ".", "--out", str(tmp_path / "r"), "--deepspeed-config", str(mb),
                             "--batch-size", "8"]) == 2
    assert "train_batch_size 48 != --batch-size 8 x gradient_accumulation_steps 1 x 2 ranks = 16" in capsys.readouterr().err


def test_rerun_into_an_earlier_run_is_refused_and_overwrite_clears_it(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step4").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step4")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")
    assert launch.clip_main(["--nproc", "2", "--data", ".", "--out", str(run), "--print-command"]) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--resume latest" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").exists()  # untouched
    assert engine.run_folder_problem(run, "latest", False) is None
    assert engine.run_folder_problem(run, None, True) is None
    engine.clear_run_folder(run)  # what --overwrite does on rank 0 before anything is written
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # only the run's own files go


def test_train_and_data_groups_list_their_commands(capsys):
    from mmfast.cli import main

    for argv in (["train"], ["train", "--help"], ["data", "--help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert ("mmfast train clip" in out and "mmfast train nextgpt" in out) or "mmfast data synth" in out
        assert "unknown command" not in out
    assert main(["train", "bert"]) == 2
    assert "unknown command 'train bert'" in capsys.readouterr().err
    assert launch.clip_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--nproc" in out and "--keep-checkpoints" in out and "--data" in out  # launcher + recipe options


# --------------------------------------------------------------------------- 2-rank runs
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from mmfast.data.synthetic import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, 40, 32, seed=1, media=False)  # 32 train images x 2 captions = 64 pairs
    return out


def _cmd(args, launcher="deepspeed", nproc=2, kernels=False):
    return [sys.executable, "-m", "mmfast.cli", "train", "clip", "--nproc", str(nproc), "--launcher", launcher,
            "--config", "tiny", "--batch-size", "8", "--lr", "2e-3", "--warmup", "1", "--threads", "1",
            "--log-every", "1", *([] if kernels else ["--no-kernels"]), *map(str, args)]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled CPU kernels, not the interpreter
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(args, launcher="deepspeed", nproc=2, timeout=600, kernels=False):
    proc = subprocess.run(_cmd(args, launcher, nproc, kernels), check=False, env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _start(args, nproc=2):
    return subprocess.Popen(_cmd(args, nproc=nproc), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "open_clip_model.safetensors"))


def _check_run(run: Path, steps: int, stage: int) -> None:
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage and summary["steps"] == steps
    sums = summary["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks end with the same full weights
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # The loss the run trains on (fused kernel, sharded over ranks) equals the plain-PyTorch
    # loss over the gathered global batch on the first step.
    assert rows[0]["loss_reference"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.05, [r["loss"] for r in rows]
    assert all(r["logit_scale"] <= 100.0 for r in rows) and all(r["samples_per_s"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_two_ranks_train_and_resume_exactly(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(["--data", world, "--out", a, "--deepspeed-config", "zero2", "--steps", 8, "--save-every", 4])
    _check_run(a, 8, 2)
    summary = json.loads((a / "train_summary.json").read_text())
    assert summary["shm_buffers_left"] == []  # DeepSpeed's /dev/shm allreduce files do not leak
    assert summary["loss_backend"] != "reference" or "cpp" not in _available_backends()
    assert (a / "checkpoints" / "step4" / "rng_rank1.pt").is_file()

    # Resume the step-4 checkpoint in a fresh run folder: same batches, optimizer, schedule, RNG.
    _run(["--data", world, "--out", b, "--deepspeed-config", "zero2", "--steps", 8,
          "--resume", a / "checkpoints" / "step4"])
    ra, rb = _metrics(a), _metrics(b)
    assert [r["step"] for r in rb] == [5, 6, 7, 8]
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra[4:]]
    assert [r["lr"] for r in rb] == [r["lr"] for r in ra[4:]]
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k

    # One process on the same global batches (16 = 2 ranks x 8): same loss and gradient norm, so the
    # sharded loss with its world-size gradient scaling is the global-batch loss (Adam alone would
    # hide a constant gradient factor).
    one = tmp_path / "one"
    _run(["--data", world, "--out", one, "--deepspeed-config", "zero2", "--steps", 8, "--batch-size", 16,
          "--no-export"], nproc=1)
    r1 = _metrics(one)
    for k in range(2):
        assert r1[k]["loss"] == pytest.approx(ra[k]["loss"], rel=1e-5)
        assert r1[k]["grad_norm"] == pytest.approx(ra[k]["grad_norm"], rel=1e-4)

    # Two "nodes" of one rank each on the loopback (one `mmfast train` per node, as on a cluster): the
    # same global batches, so the same losses as one node of two ranks.
    port = launch.free_port()
    nodes = tmp_path / "nodes"
    procs = [_start(["--data", world, "--out", nodes, "--deepspeed-config", "zero2", "--steps", 8, "--no-export",
                     "--nnodes", 2, "--node-rank", r, "--master-addr", "127.0.0.1", "--master-port", port],
                    nproc=1) for r in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:] + err[-5000:]
    rn = _metrics(nodes)
    assert json.loads((nodes / "train_summary.json").read_text())["world_size"] == 2
    assert [r["step"] for r in rn] == list(range(1, 9))
    for x, y in zip(rn, ra):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_torchrun_trains_and_exports(world, tmp_path):
    from mmfast.models.clip.model import create_model, get_tokenizer

    run = tmp_path / "z3"
    _run(["--data", world, "--out", run, "--deepspeed-config", "zero3", "--steps", 6], launcher="torchrun")
    _check_run(run, 6, 3)
    # --save-every 0 (the default): one checkpoint, at the end, committed with its manifest.
    assert (run / "checkpoints" / "latest").read_text() == "step6"
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step6"]
    assert (run / "checkpoints" / "step6" / "manifest.json").is_file()
    model = create_model(None, pretrained=run / "final", device="cpu", kernels=False).eval()
    init = create_model("tiny", device="cpu", kernels=False)
    assert not torch.equal(model.visual.conv1.weight, init.visual.conv1.weight)
    with torch.no_grad():
        txt = model.encode_text(get_tokenizer(model)(["a red star"]), normalize=True)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(1))


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_with_kernels_matches_plain_open_clip(world, tmp_path):
    """The patched model (fused attention, norms, MLPs, heads) under ZeRO-3 on 2 ranks: its MLP and
    head weights are partitioned (above the preset's persistence threshold) and are only read inside
    forwards mmfast replaced; the losses equal those of the unpatched model."""
    runs = {}
    for kernels in (False, True):
        run = tmp_path / f"z3k{int(kernels)}"
        _run(["--data", world, "--out", run, "--deepspeed-config", "zero3", "--steps", 3, "--no-export"],
             launcher="torchrun", kernels=kernels)
        runs[kernels] = run
    summary = json.loads((runs[True] / "train_summary.json").read_text())
    assert {"open_clip.mlp", "open_clip.attention", "layer_norm"} <= set(summary["kernels"])
    plain, fused = _metrics(runs[False]), _metrics(runs[True])
    assert [r["step"] for r in fused] == [1, 2, 3]
    for a, b in zip(plain, fused):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


def _available_backends():
    from mmfast.ops._dispatch import Facts
    from mmfast.ops.contrastive import CLIP_OP

    facts = Facts("cpu", torch.float32)
    return [b for b, r in CLIP_OP.refusals(facts).items() if not r]


@pytest.mark.slow
def test_siglip_single_process_zero0(world, tmp_path):
    run = tmp_path / "sig"
    _run(["--data", world, "--out", run, "--deepspeed-config", "zero0", "--steps", 3, "--config", "tiny-siglip",
          "--loss", "siglip", "--no-export"], nproc=1)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss_reference"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["zero_stage"] == 0 and summary["final"] is None and not (run / "final").exists()


@pytest.mark.slow
def test_resume_latest_continues_exactly_and_grad_checkpointing_changes_nothing(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    common = ["--data", world, "--deepspeed-config", "zero0", "--grad-checkpointing", "--no-export", "--steps", 6]
    _run([*common, "--out", run, "--save-every", 2], nproc=1)
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step6"
    assert sorted(p.name for p in ck.glob("step*")) == ["step4", "step6"]  # --keep-checkpoints 2
    before = _metrics(run)
    # As if killed while step 6 was committed: its folder is gone, `latest` still names it.
    shutil.rmtree(ck / "step6")
    proc = _run([*common, "--out", run, "--resume", "latest"], nproc=1)
    assert "checkpoint step6 (latest) is damaged" in proc.stderr and "resuming from step4" in proc.stderr
    ckpt = json.loads((run / "train_summary.json").read_text())["grad_checkpointing"]
    assert any("visual" in n for n in ckpt) and any("visual" not in n for n in ckpt), ckpt  # both towers
    rows = _metrics(run)  # rows past the resumed step are dropped: every step once
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:4] == before[:4]
    assert [r["loss"] for r in rows[4:]] == [r["loss"] for r in before[4:]]
    assert [r["lr"] for r in rows[4:]] == [r["lr"] for r in before[4:]]
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"] == str(ck / "step4")
    # Without checkpointing the activations are kept instead of recomputed: the same losses on every
    # step (so the same updates: recomputation replays the same ops); the flag trades time for memory.
    plain = tmp_path / "plain"
    _run(["--data", world, "--deepspeed-config", "zero0", "--no-export", "--out", plain, "--steps", 6], nproc=1)
    rp = _metrics(plain)
    assert json.loads((plain / "train_summary.json").read_text())["grad_checkpointing"] == []
    assert [r["step"] for r in rp] == [1, 2, 3, 4, 5, 6]
    for k in range(6):
        assert rp[k]["loss"] == pytest.approx(rows[k]["loss"], rel=1e-6)


def test_shm_buffer_name_and_release(tmp_path):
    from mmfast.distributed.deepspeed_shm import buffer_path, release_shm_buffer

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}
    path = buffer_path(1, tmp_path, env)
    assert path.name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29611_1"  # DeepSpeed's shm.cpp naming
    path.write_bytes(b"x")
    other = buffer_path(0, tmp_path, env)
    other.write_bytes(b"x")
    assert release_shm_buffer(1, tmp_path, env) is True and not path.exists()
    assert other.exists()  # only this rank's own file
    assert release_shm_buffer(1, tmp_path, env) is False
