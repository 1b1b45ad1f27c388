"""launch/bench.py runs end to end (tiny sizes) and writes its JSON and Markdown with every stage asked for."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_bench_quick(tmp_path):
    stages = "loader,sem_step,rem_step,victim_train,jcdp_purify"
    r = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "--quick", "--out", str(tmp_path),
                        "--stages", stages], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    rows = {row["stage"]: row for row in res["rows"]}
    assert list(rows) == stages.split(",") and all(row["images_per_s"] > 0 for row in rows.values())
    # REM's inner attack makes each step dearer than SEM's, in FLOPs as counted
    assert rows["rem_step"]["flops_per_image"] > rows["sem_step"]["flops_per_image"] > 0
    assert set(res["extrapolation_s"]) == {"imagenet100", "facescrub"}
    assert res["extrapolation_s"]["imagenet100"]["sem_step"]["64"] * 64 == \
        __import__("pytest").approx(res["extrapolation_s"]["imagenet100"]["sem_step"]["1"])
    md = (tmp_path / "bench.md").read_text()
    assert "QUICK MODE" in md and "| 64 devices |" in md
    bad = subprocess.run([sys.executable, str(REPO / "launch/bench.py"), "--stages", "sem_stpe"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr
