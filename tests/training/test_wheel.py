"""Training from an installed wheel, outside the source checkout: `mmfast train clip` and the demo's
CLIP stages find their recipes and DeepSpeed configs inside the package, which carries the shipped decoder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_clip")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_train_and_demo_run_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("mmfast", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    # MMFAST_NO_EXT=1: the C++ extension is optional (the reference backend stands in) and compiling it
    # would add minutes; everything this test checks is Python and package data.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["MMFAST_NO_EXT"] = "1"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, env=env, cwd=tmp_path, timeout=600)
    wheel = next((tmp_path / "dist").glob("mmfast-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, env=env,
                   cwd=tmp_path, timeout=600)
    assert (site / "mmfast" / "training" / "configs" / "zero2.json").is_file()
    assert not (site / "training").exists()
    # the trained image and audio decoders ship inside the package: every file of their folders, byte for byte
    for modality in ("image", "audio"):
        shipped = ROOT / "mmfast" / "models" / "nextgpt" / "weights" / modality
        files = sorted(f.relative_to(shipped) for f in shipped.rglob("*") if f.is_file())
        assert any(f.suffix == ".safetensors" for f in files) and (Path("RECORD.json") in files), modality
        installed = site / "mmfast" / "models" / "nextgpt" / "weights" / modality
        for f in files:
            assert (installed / f).read_bytes() == (shipped / f).read_bytes(), f

    work = tmp_path / "elsewhere"  # not the checkout: nothing beside it to find
    work.mkdir()
    env["PYTHONPATH"] = str(site)

    def mmfast(*args):
        r = subprocess.run([sys.executable, "-m", "mmfast.cli", *args], check=False, env=env, cwd=work,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]

    # The demo's CLIP stages: the world, then `mmfast train clip` (the launcher, the recipe, its config).
    mmfast("demo", "--only", "clip_world,clip_train", "--out", "demo", "--images", "60", "--videos", "10", "--steps", "2",
           "--batch-size", "8", "--nproc", "1")
    demo = json.loads((work / "demo" / "summary.json").read_text())
    assert demo["clip_train_steps"] == 2
    run = work / "demo" / "clip"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and Path(summary["mmfast_package"]) == site / "mmfast"  # the wheel's code ran
    assert (run / "final" / "open_clip_model.safetensors").is_file()
    assert (run / "checkpoints" / "step2" / "manifest.json").is_file()
