"""``mmfast train {clip,llava,nextgpt}``: start a ``training/`` script on N local processes.

The library never imports ``training/``: the script runs by path under DeepSpeed's launcher
(``python -m deepspeed.launcher.runner``) or torchrun. The script is looked up in
``$MMFAST_TRAINING_DIR``, then in the source checkout beside the installed package, then in the
current directory.

    mmfast train clip --nproc 2 --config tiny --data runs/world --out runs/clip [script options]
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

SCRIPTS = {"clip": "train_clip.py", "llava": "train_llava.py", "nextgpt": "train_nextgpt.py"}


def find_script(name: str) -> Path:
    """Path of ``training/<name>``; raises FileNotFoundError listing where it looked."""
    candidates = []
    env = os.environ.get("MMFAST_TRAINING_DIR")
    if env:
        candidates.append(Path(env) / name)
    candidates.append(Path(__file__).resolve().parent.parent / "training" / name)
    candidates.append(Path.cwd() / "training" / name)
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"training script {name} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "run from an mmfast source checkout or set MMFAST_TRAINING_DIR to its training/ folder"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(script: Path, nproc: int, script_args: list[str], launcher: str = "deepspeed",
                   master_port: int | None = None) -> list[str]:
    """The argv that starts ``nproc`` ranks of ``script`` on this machine."""
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    port = str(master_port or free_port())
    if launcher == "deepspeed":
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        raise ValueError(f"--launcher {launcher!r}; expected deepspeed or torchrun")
    return head + [str(script), *script_args]


def _option(args: list[str], *names: str) -> str | None:
    """Last value given for any of ``names`` (``--x v`` or ``--x=v``), as argparse would keep it."""
    value = None
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                value = args[i + 1]
            elif a.startswith(n + "="):
                value = a.split("=", 1)[1]
    return value


def precheck_clip(args: list[str], script: Path) -> None:
    """Fail before spawning ranks on a wrong preset, data path or DeepSpeed config (clear one-line errors)."""
    data = _option(args, "--data")
    if data is not None and not any(c in data for c in "*?[{") and not Path(data).exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    pretrained = _option(args, "--pretrained")
    if pretrained is not None and not Path(pretrained).exists():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such file or folder (nothing is downloaded)")
    model = _option(args, "--model", "--config")
    if model is not None and not (pretrained and Path(pretrained).is_dir()):
        from mmfast.models.clip import model_config

        model_config(model)
    ds = _option(args, "--deepspeed-config", "--deepspeed_config")
    if ds is not None and not Path(ds).is_file() and not (script.parent / "configs" / f"{ds}.json").is_file():
        names = sorted(p.stem for p in (script.parent / "configs").glob("*.json"))
        raise FileNotFoundError(f"--deepspeed-config {ds}: no such file or preset ({', '.join(names)})")


PRECHECKS = {"clip": precheck_clip}


def _main(kind: str, argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog=f"mmfast train {kind}", add_help=False,
                                description=f"launch training/{SCRIPTS[kind]}; other options go to the script")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs, or CPU ranks with gloo)")
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun"))
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--print-command", action="store_true", help="print the launch command and exit")
    p.add_argument("-h", "--help", action="store_true")
    a, rest = p.parse_known_args(argv)
    try:
        script = find_script(SCRIPTS[kind])
        cmd = launch_command(script, a.nproc, rest + (["--help"] if a.help else []), a.launcher, a.master_port)
        if not a.help and kind in PRECHECKS:
            PRECHECKS[kind](rest, script)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mmfast train {kind}: {e}", file=sys.stderr)
        return 2
    if a.help:
        p.print_help()
    if a.print_command:
        print(" ".join(cmd))
        return 0
    env = dict(os.environ)
    # A checkout that is not pip-installed still imports: the package lives beside training/.
    root = str(script.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)


def clip_main(argv: list[str] | None = None) -> int:
    return _main("clip", argv)


def llava_main(argv: list[str] | None = None) -> int:
    return _main("llava", argv)


def nextgpt_main(argv: list[str] | None = None) -> int:
    return _main("nextgpt", argv)
