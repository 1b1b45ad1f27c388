"""The benchmark scripts (launch/bench/*.py) run end to end in their quick modes and write JSON and Markdown with
every row they promise, each with a positive rate; and the shared helpers in uedist.bench do what they say."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from uedist.bench.report import fmt_duration, markdown_table
from uedist.bench.timing import Setting, count_flops, timed_calls, timed_once


def run_quick(script: str, out: Path, *args: str) -> tuple:
    """Run ``launch/bench/<script>.py --quick --out <out>``; return (its JSON, its Markdown)."""
    r = subprocess.run(
        [sys.executable, str(REPO / "launch/bench" / f"{script}.py"), "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"wrote {out / script}.json and {out / script}.md" in r.stdout
    return json.loads((out / f"{script}.json").read_text()), (out / f"{script}.md").read_text()


def positive(rows: list, key: str = "images_per_s") -> bool:
    return bool(rows) and all(r[key] > 0 for r in rows)  # False for NaN too


# ----------------------------------------------------------------------------------------------- shared helpers
def test_markdown_table_aligns_columns():
    lines = markdown_table(["a", "b"], [(1, "x"), (2, "y")], "lr")
    assert lines == ["| a | b |", "|---|---:|", "| 1 | x |", "| 2 | y |"]


def test_timed_calls_counts_and_quick_limits():
    calls = []
    dt, n = timed_calls(lambda: calls.append(1), Setting(torch.device("cpu"), quick=True).min_time(5.0))
    assert n == 1 and len(calls) == 1 and dt >= 0  # quick: the warm-up call is the measurement
    assert Setting(torch.device("cpu")).min_time(5.0) == 5.0
    calls.clear()
    dt, n = timed_calls(lambda: calls.append(1), 0.01)  # torch.utils.benchmark: blocks of calls for >= 10 ms
    assert n > 1 and len(calls) > n and dt > 0
    out, s = timed_once(lambda: 7)
    assert out == 7 and s >= 0


def test_timed_calls_takes_a_long_warm_up_as_the_measurement():
    import time

    calls = []
    dt, n = timed_calls(lambda: (calls.append(1), time.sleep(0.05)), 0.01)  # 50 ms > 4 x 10 ms
    assert n == 1 and len(calls) == 1 and dt >= 0.05


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_fmt_duration():
    assert [fmt_duration(s) for s in (42, 600, 36000, 5 * 86400)] == ["42 s", "10 min", "10.0 h", "5.0 d"]


# ------------------------------------------------------------------------------------------------------ scripts
@pytest.mark.slow
def test_bench_quick(tmp_path):
    stages = "loader,sem_step,rem_step,final_pass,victim_train,dvae_train,dvae_infer,ddpm_train,jcdp_purify"
    res, md = run_quick("bench", tmp_path, "--stages", stages)
    rows = {row["stage"]: row for row in res["rows"]}
    assert list(rows) == stages.split(",") and positive(res["rows"]) and positive(res["rows"], "s_per_call")
    assert res["peak_flops"] > 0 and res["quick"] is True
    # REM's inner attack makes each step dearer than SEM's, in FLOPs as counted; the final pass is cheaper still
    flops = {k: r["flops_per_image"] for k, r in rows.items()}
    assert flops["rem_step"] > flops["sem_step"] > flops["final_pass"] > 0
    assert all(flops[k] > 0 for k in rows if k != "loader") and flops["loader"] is None
    assert all(0 < r["utilization"] for k, r in rows.items() if k != "loader")
    assert set(res["extrapolation_s"]) == {"imagenet100", "facescrub"}
    sem = res["extrapolation_s"]["imagenet100"]["sem_step"]
    assert sem["64"] * 64 == pytest.approx(sem["1"]) and sem["1"] > 0
    assert "QUICK MODE" in md and "| 64 devices |" in md and md.count("| jcdp_purify |") == 3


@pytest.mark.slow
def test_bench_rejects_unknown_stage():
    bad = subprocess.run(
        [sys.executable, str(REPO / "launch/bench/bench.py"), "--stages", "sem_stpe"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "unknown stage" in bad.stderr


@pytest.mark.slow
def test_bench_noise_quick(tmp_path):
    res, md = run_quick("noise", tmp_path)
    rows = res["rows"]
    # {sem, rem} x {32, 256 px} x {reference fp32, ours fp32, ours at the defaults}
    assert len(rows) == 12 and positive(rows, "s_per_step") and positive(rows, "fwd_bwd_per_image")
    assert {(r["structure"], r["px"]) for r in rows} == {(s, p) for s in ("reference", "ours") for p in (32, 256)}
    for i in range(0, 12, 3):  # the three ways of one setting run the same passes; the ratio is vs the reference
        a, b, c = rows[i : i + 3]
        assert a["structure"] == "reference" and a["speedup_vs_reference"] == 1.0
        assert a["fwd_bwd_per_image"] == b["fwd_bwd_per_image"] == c["fwd_bwd_per_image"]
        assert b["speedup_vs_reference"] == pytest.approx(a["s_per_step"] / b["s_per_step"])
    sem = rows[0]  # quick: K_u 1, J 2, K_a 1 -> 1*2 + (1 + 1) passes per image
    assert sem["method"] == "sem" and sem["fwd_bwd_per_image"] == 4
    assert {(r["px"], r["precision"]) for r in res["chunk_sweep"]} == {
        (p, q) for p in (32, 224) for q in ("fp32", "bf16+cl")
    }
    assert [c["compile"] for c in res["compile"]] == [False, True] and positive(res["compile"], "cold_s")
    assert 0 < res["profile"]["conv_gemm_share"] < 1 and res["profile"]["top"]
    assert res["memory"]["N"] == 200 and res["memory"]["rss_N_mib"] > 0 and res["memory"]["rss_4N_mib"] > 0
    assert "| method | px | batch |" in md and "× reference" in md and "convolution / GEMM" in md and "Peak RSS" in md


@pytest.mark.slow
def test_bench_victim_quick(tmp_path):
    res, md = run_quick("victim", tmp_path)
    rows = res["results"]
    # resnet18 x {32, 224} x {standard, adversarial} x {fp32, fp32+cl, bf16+cl}
    assert len(rows) == 12 and positive(rows) and all(r["iters"] >= 1 for r in rows)
    assert {r["training"] for r in rows} == {"standard", "adversarial"}
    assert res["machine"]["threads"] > 0 and res["machine"]["device"]
    assert "| resnet18 | 224 |" in md


@pytest.mark.slow
def test_bench_dvae_quick(tmp_path):
    res, md = run_quick("dvae", tmp_path)
    rows = res["rows"]
    dvae = [r for r in rows if r["what"].startswith("dvae ")]  # {train step, inference} x 3 px x 2 precisions
    ops = [r for r in rows if r["what"].endswith(" op")]  # 6 baselines x 3 px
    passes = [r for r in rows if r["what"].endswith(" map pass")]  # 6 baselines
    assert (len(dvae), len(ops), len(passes), len(rows)) == (12, 18, 6, 36) and positive(rows)
    assert "| dvae train step | 256 |" in md and "| jpeg map pass | 32 |" in md


@pytest.mark.slow
def test_bench_diffusion_quick(tmp_path):
    res, md = run_quick("diffusion", tmp_path)
    rows = res["results"]
    assert positive(rows) and res["machine"]["quick"] is True
    assert (
        sorted(r["what"] for r in rows) == ["ddpm_train"] * 2 + ["purify"] * 3 + ["unet_fwd"] * 2 + ["unet_fwd_bwd"] * 2
    )
    assert all(r["denoising_steps"] > 0 for r in rows if r["what"] == "purify")
    assert "JCDP T_p=20 N=4 (reference) (80 steps)" in md


@pytest.mark.slow
def test_bench_loader_quick(tmp_path):
    res, md = run_quick("loader", tmp_path)
    rows = [r for r in res["results"] if not r["loader"].startswith("ffcv")]
    assert len(rows) == 2 * 2 * 3 * 3 and positive(rows)  # {32, 256 px} x {jpg, png} x 3 workers x 3 loaders
    assert all(r["timed_images"] > 0 and r["first_batch_s"] > 0 for r in res["results"])
    assert len(res["decode_limit"]) == 4 and positive(res["decode_limit"])
    assert res["settings"]["quick"] is True and "× 1-core decode" in md


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """launch/bench/gpu_check.sh --dry-run: the GPU run's three steps on the CPU at tiny sizes, the same code
    path (tests/test_gpu.py run on the CPU, bench.py --quick, the CIFAR-10 SEM job on a small synthetic set)."""
    import xml.etree.ElementTree as ET

    out = tmp_path / "gc"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("UEDIST_GPU_TEST_DEVICE", None)
    r = subprocess.run(
        ["bash", str(REPO / "launch/bench/gpu_check.sh"), str(out), "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for step in ("cuda_tests", "bench", "sem_cifar10"):
        assert f"| {step} | 0 |" in summary, summary
    suite = ET.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 10 and suite.get("failures") == suite.get("errors") == suite.get("skipped") == "0"
    assert (out / "bench" / "bench.json").is_file() and "SEM total" in (out / "sem_cifar10.md").read_text()
    bad = subprocess.run(["bash", str(REPO / "launch/bench/gpu_check.sh"), str(out), "--dryrun"], capture_output=True)
    assert bad.returncode == 2


@pytest.mark.slow
def test_bench_attacks_quick(tmp_path):
    from uedist.app.stages import load_stages
    from uedist.registry import stages_of

    load_stages()
    res, md = run_quick("attacks", tmp_path)
    # every registered attack ran end to end at its smoke overrides
    e2e = {r["attack"]: r for r in res["end_to_end"]}
    assert list(e2e) == stages_of("attack") and all(r["ran"] and r["smoke"] for r in e2e.values())
    engine = [a for a in e2e if not a.startswith("toy_")]  # (tests/toy_stages.py's toy attack reports no timings)
    assert positive(res["end_to_end"]) and all(e2e[a]["timings"]["final_pass_s"] > 0 for a in engine)
    assert "surrogate_training_s" in e2e["sem"]["timings"] and "source_model_s" in e2e["tap"]["timings"]
    got = {(r["attack"], r["px"]) for r in res["rows"]}
    assert {(a, 32) for a in ("lsp", "ar", "ops", "tap", "sep", "ntga")} <= got and ("ar", 224) not in got
    assert all(r["images_per_s_at_reference"] > 0 for r in res["rows"])
    tap = next(r for r in res["rows"] if (r["attack"], r["px"]) == ("tap", 32))
    assert tap["images_per_s_at_reference"] < tap["timed_images_per_s"]  # scaled to 2008 passes per image
    assert len(res["ntga_blocks"]) == 4 and "NTGA" in md and "| tap |" in md and "smoke overrides" in md


@pytest.mark.slow
def test_bench_attacks_subset_and_unknown(tmp_path):
    bad = subprocess.run(
        [sys.executable, str(REPO / "launch/bench/attacks.py"), "--attacks", "lsp,nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "unknown attack" in bad.stderr
    res, _ = run_quick("attacks", tmp_path, "--attacks", "lsp")
    assert [r["attack"] for r in res["end_to_end"]] == ["lsp"] and {r["attack"] for r in res["rows"]} == {"lsp"}
    assert res["ntga_blocks"] == []
