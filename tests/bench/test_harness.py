"""The benchmark harness: measurements, failure rows, CSV append, plot; and the contrastive CLI."""
import csv
import math

import pytest
import torch

from mmfast.bench import harness


def _alloc_step(mib):
    def step():
        t = torch.ones(mib * 2**18)  # mib MiB of fp32, touched so the pages are resident
        return t.sum()

    return step


def test_measure_cpu_sees_time_and_peak_memory():
    ms, small = harness.measure(_alloc_step(1), "cpu", reps=3)
    _, big = harness.measure(_alloc_step(64), "cpu", reps=3)
    assert ms > 0 and math.isfinite(ms)
    assert big >= 60, f"64 MiB allocation seen as {big:.1f} MiB"
    assert small < big / 4


def test_run_records_failures_and_appends_csv(tmp_path):
    def ok(case, mode):
        return _alloc_step(case["n"])

    def missing(case, mode):
        import mmfast_no_such_package  # noqa: F401

    def oom(case, mode):
        raise MemoryError("out of memory")

    out = tmp_path / "r" / "bench.csv"
    cases = [{"n": 1}, {"n": 2}]
    provs = {"ok": ok, "missing": missing, "oom": oom}
    rows = harness.run("t", provs, cases, x_key="n", device="cpu", modes=("fwd",),
                       flops=lambda c, m: 1e9, out_csv=out, log=lambda s: None, reps=2)
    by = {(r.provider, r.x): r for r in rows}
    assert by["ok", 2].error == "" and by["ok", 2].median_ms > 0
    assert by["ok", 2].tflops == pytest.approx(1e9 / (by["ok", 2].median_ms * 1e-3) / 1e12)
    assert by["missing", 1].error.startswith("ModuleNotFoundError")
    assert by["oom", 1].error.startswith("MemoryError")
    assert by["oom", 2].error.startswith("skipped: out of memory at n=1")
    assert out.with_suffix(".png").stat().st_size > 1000
    harness.run("t", {"ok": ok}, cases[:1], x_key="n", device="cpu", modes=("fwd",),
                out_csv=out, plot=False, log=lambda s: None, reps=1)
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 7 and list(table[0]) == harness.COLUMNS
    assert table[0]["device"] and table[0]["torch"] == torch.__version__ and table[0]["date"].endswith("Z")


def test_csv_with_other_columns_is_left_alone(tmp_path):
    out = tmp_path / "b.csv"
    out.write_text("a,b\n1,2\n")
    rows = harness.run("t", {"ok": lambda c, m: _alloc_step(1)}, [{"n": 1}], x_key="n", device="cpu",
                       modes=("fwd",), out_csv=out, plot=False, log=lambda s: None, reps=1)
    assert out.read_text() == "a,b\n1,2\n" and len(rows) == 1
    assert len(list(tmp_path.glob("b.*.csv"))) == 1


def test_budget_skips_the_rest(tmp_path):
    rows = harness.run("t", {"ok": lambda c, m: _alloc_step(1)}, [{"n": 1}, {"n": 2}], x_key="n",
                       device="cpu", modes=("fwd",), budget_s=0.0, log=lambda s: None)
    assert all(r.error.startswith("skipped: time budget") for r in rows)


def test_contrastive_cli_tiny_sweep(tmp_path):
    from mmfast.bench.contrastive import main

    out = tmp_path / "c.csv"
    argv = ["--cpu", "--sizes", "64,96", "--dim", "19", "--providers", "mmfast-reference,torch-eager"]
    assert main([*argv, "--out", str(out), "--no-plot"]) == 0
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 * 2 * 2
    assert all(not r["error"] and float(r["median_ms"]) > 0 and float(r["tflops"]) > 0 for r in table)
    assert {r["provider"] for r in table} == {"mmfast-reference", "torch-eager"}
    assert main(["--cpu", "--sizes", "x"]) == 2


# --------------------------------------------------------------------------- the CLIs' shared arguments
BENCH_CLIS = ["attention", "contrastive", "projection", "norm"]


def _cli(name):
    import importlib

    return importlib.import_module(f"mmfast.bench.{name}")


def _gpu_suite_bench_args():
    """``bench WHAT LIMIT ARGS...`` lines of benchmarks/gpu_suite.sh (continuation lines joined)
    -> [(WHAT, ["--gpu", *ARGS]), ...]."""
    import shlex
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.sh"
    calls = []
    for line in script.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("bench ") and not line.startswith("bench()"):
            what, _limit, *args = shlex.split(line)[1:]
            calls.append((what, ["--gpu", *args]))
    return calls


def test_gpu_suite_arguments_parse():
    """Every ``bench`` line of the GPU suite parses with its CLI (the suite itself only runs on a GPU)."""
    calls = _gpu_suite_bench_args()
    assert {what for what, _ in calls} >= {"projection", "contrastive"}
    for what, argv in calls:
        assert what in BENCH_CLIS, what
        args = _cli(what)._parser().parse_args(argv)
        assert args.gpu and not args.cpu and args.budget_s > 0
        assert args.providers is None or harness.provider_names(args) == argv[argv.index("--providers") + 1].split(",")
        assert harness.modes_of(args) == list(harness.MODES)
        names = harness.provider_names(args)
        if names:  # the CUDA provider tables know every name (building them touches no GPU)
            table = (_cli(what).providers(args.op, "cuda", names) if what in ("projection", "norm")
                     else _cli(what).providers("cuda", names))
            assert set(table) <= set(names) and table


@pytest.mark.parametrize("name", BENCH_CLIS)
def test_cli_usage_errors(name, capsys):
    main = _cli(name).main
    assert main(["--cpu", "--modes", "fwd,bwd"]) == 2
    assert "--modes must be fwd and/or fwd+bwd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--gpu", "--cpu"])  # mutually exclusive
    if not torch.cuda.is_available():
        assert main(["--gpu"]) == 2
        assert f"mmfast bench {name}: --gpu given but torch.cuda is not available" in capsys.readouterr().err


@pytest.mark.parametrize("name, argv", [
    ("attention", ["--cases", "vit_tiny", "--providers", "sdpa"]),
    ("norm", ["--op", "layernorm", "--size", "M=8", "--size", "N=16",
              "--providers", "mmfast-reference,torch-eager"]),
    ("projection", ["--op", "layernorm", "--size", "M=8", "--size", "N=16",  # forwarded to bench norm
                    "--providers", "mmfast-reference,torch-eager"]),
    ("projection", ["--op", "projector", "--size", "M=8", "--size", "K=16", "--size", "N=16",
                    "--providers", "mmfast-reference,torch-eager"]),
])
def test_cli_common_args_reach_the_sweep(name, argv, tmp_path):
    out = tmp_path / "b.csv"
    assert _cli(name).main(["--cpu", *argv, "--modes", "fwd", "--budget-s", "60", "--out", str(out), "--no-plot"]) == 0
    with open(out) as f:
        table = list(csv.DictReader(f))
    providers = set(argv[argv.index("--providers") + 1].split(","))
    assert table and {r["provider"] for r in table} == providers
    assert all(r["mode"] == "fwd" and not r["error"] and float(r["median_ms"]) > 0 for r in table)
    assert not list(tmp_path.glob("*.png"))
