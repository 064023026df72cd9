"""``mmfast train {clip,llava,nextgpt,decoder}``: check the arguments, then start the recipe on N processes.

    mmfast train clip --nproc 2 --config tiny --data runs/world --out runs/clip [recipe options]
    mmfast train clip --nnodes 2 --node-rank R --master-addr HOST --master-port P --nproc 8 ...  (one per node)

Everything that can be refused is refused here, before a rank starts: the recipe's own arguments
(argparse), its data paths, the DeepSpeed JSON (parsed and checked against ``--nproc`` and
``--batch-size``), the run folder (an earlier run is not overwritten without ``--overwrite``).

The ranks run ``python -m mmfast.training.<recipe>`` (so an installed wheel trains as well as a
checkout) under DeepSpeed's launcher, or torchrun (``--launcher torchrun``; always for ``--nnodes``
> 1: one ``mmfast train`` per node, torchrun's static rendezvous). The launcher and its ranks form
their own process group: SIGINT/SIGTERM to ``mmfast train`` are forwarded to the whole group (SIGKILL
after a grace period), and each rank exits by itself once ``mmfast train`` is gone, even after a
SIGKILL (:func:`mmfast.training.engine.watch_supervisor`). On one node under DeepSpeed's launcher the
rendezvous store listens on 127.0.0.1 only (torch's TCPStore alone would bind every interface), and
gloo talks over the loopback interface; torchrun starts an agent store of its own, on every interface.
"""
from __future__ import annotations

import argparse
import base64
import importlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {"clip": "mmfast.training.clip", "llava": "mmfast.training.llava", "nextgpt": "mmfast.training.nextgpt",
           "decoder": "mmfast.training.decoder"}
GRACE_S = 10.0


def free_port() -> int:
    """The rendezvous port of a one-node run (below the kernel's ephemeral range: see mmfast.utils.ports)."""
    from mmfast.utils.ports import free_port as pick

    return pick("127.0.0.1")


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def launch_command(module: str, nproc: int, script_args: list[str], launcher: str = "deepspeed",
                   master_port: int | None = None, nnodes: int = 1, node_rank: int = 0,
                   master_addr: str = "127.0.0.1") -> list[str]:
    """The argv that starts ``nproc`` ranks of ``python -m module`` on this node."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, --nnodes {nnodes})")
    port = str(master_port or free_port())
    if nnodes > 1 and launcher == "deepspeed":
        launcher = "torchrun"  # DeepSpeed's own multi-node launch needs a hostfile and pdsh/ssh (README)
    if launcher == "deepspeed":
        # One node: DeepSpeed's per-node launcher itself, with the command its runner would build for this node
        # (``{"localhost": [0 .. nproc-1]}`` as base64 JSON). The runner, a process more that imports DeepSpeed
        # only to build that command, cost ~3 s of every launch.
        world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
        head = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
                f"--master_addr={master_addr}", f"--master_port={port}", "--module"]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--node_rank", str(node_rank),
                "--nproc_per_node", str(nproc), "--master_addr", master_addr, "--master_port", port, "-m"]
    else:
        raise ValueError(f"--launcher {launcher!r}; expected deepspeed or torchrun")
    return head + [module, *script_args]


def precheck(kind: str, recipe, args, world: int, node_rank: int = 0) -> None:
    """Refuse, before any rank starts, what the ranks would refuse later (clear one-line errors).
    The run folder belongs to node 0 (other nodes may see it being written on a shared filesystem)."""
    from mmfast.training.dsconfig import load_config
    from mmfast.training.engine import run_folder_problem

    if node_rank == 0:
        problem = run_folder_problem(Path(args.out), args.resume, args.overwrite)
        if problem:
            raise ValueError(problem)
        if args.resume and args.resume != "latest" and not Path(args.resume).is_dir():
            raise FileNotFoundError(f"--resume {args.resume}: expected 'latest' or a checkpoint folder "
                                    "(RUN/checkpoints/stepN)")
        if args.resume == "latest" and not (Path(args.out) / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume latest: no checkpoint in {Path(args.out) / 'checkpoints'}")
    load_config(args.ds_config, args.batch_size, world, on_gpu=False)
    recipe.precheck(args)


def supervise(cmd: list[str], env: dict) -> int:
    """Run the launcher in its own process group; forward SIGINT/SIGTERM to the whole group.

    Nothing can forward SIGKILL: then each rank's watchdog ends it, and DeepSpeed's launcher, seeing
    its ranks fail, ends too."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    received: list[tuple[int, float]] = []

    def forward(signum, _frame):
        received.append((signum, time.monotonic()))
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if received and time.monotonic() - received[0][1] > GRACE_S:
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        try:  # no rank outlives the launcher (e.g. one its launcher did not reap)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if received:
        name = signal.Signals(received[0][0]).name
        print(f"mmfast train: stopped by {name}, forwarded to the launcher and every rank", file=sys.stderr)
        return 128 + received[0][0]
    return rc


def _parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"mmfast train {kind}", add_help=False,
                                description=f"launch {RECIPES[kind]} on N processes; other options go to the recipe")
    p.add_argument("--nproc", type=int, default=1, help="processes on this node (GPUs, or CPU ranks with gloo)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes (one `mmfast train` per node)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1", help="node 0's address (multi-node)")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun"))
    p.add_argument("--print-command", action="store_true", help="print the launch command and exit")
    p.add_argument("-h", "--help", action="store_true")
    return p


def main(kind: str, argv: list[str] | None) -> int:
    p = _parser(kind)
    a, rest = p.parse_known_args(argv)
    recipe = importlib.import_module(RECIPES[kind])
    if a.help:
        p.print_help()
        print(f"\nrecipe options ({RECIPES[kind]}):")
        try:
            recipe.parse_args(["--help"])
        except SystemExit:  # argparse prints the help, then exits
            pass
        return 0
    try:
        args = recipe.parse_args(rest)
    except SystemExit as e:  # argparse already said why
        return int(e.code or 0)
    try:
        cmd = launch_command(RECIPES[kind], a.nproc, rest, a.launcher, a.master_port, a.nnodes, a.node_rank,
                             a.master_addr)
        precheck(kind, recipe, args, a.nproc * a.nnodes, a.node_rank)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mmfast train {kind}: {e}", file=sys.stderr)
        return 2
    if a.print_command:
        print(" ".join(cmd))
        return 0
    import mmfast

    env = dict(os.environ)
    # The ranks import the same mmfast as this process (a checkout, or the installed wheel).
    root = str(Path(mmfast.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MMFAST_SUPERVISOR_PID"] = str(os.getpid())
    if _is_loopback(a.master_addr):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if a.nnodes == 1 and a.launcher == "deepspeed":
            env["MMFAST_LOOPBACK_STORE"] = "1"
    return supervise(cmd, env)


def run_in_process(kind: str, what: str, argv: list[str]) -> float:
    """``mmfast train <kind> ARGV --overwrite`` in this process, for the demo (it owns its run folders: a
    rerun starts afresh); returns the wall seconds. RuntimeError naming ``what`` when it exits non-zero."""
    t0 = time.perf_counter()
    rc = main(kind, [*argv, "--overwrite"])
    if rc != 0:
        raise RuntimeError(f"{what} training failed (exit code {rc}); see the output above")
    return time.perf_counter() - t0


def clip_main(argv: list[str] | None = None) -> int:
    return main("clip", argv)


def llava_main(argv: list[str] | None = None) -> int:
    return main("llava", argv)


def nextgpt_main(argv: list[str] | None = None) -> int:
    return main("nextgpt", argv)


def decoder_main(argv: list[str] | None = None) -> int:
    return main("decoder", argv)
