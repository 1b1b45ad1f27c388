"""An attack changes what it claims to have changed, or refuses (Reliability II, item 6 and the AR memory bomb):
each case ran with rc 0 and a wrong result before; now each exits 2 naming the setting, or writes what it says."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, build

CASES = [
    # (method, overrides, message)
    ("lsp", ["l2=1e308"], "more than a 16x16 image can hold"),
    ("lsp", ["l2=1e6"], "more than a 16x16 image can hold"),
    ("lsp", ["poison_ratio=0.001"], "poisons none"),
    ("ops", ["pixels=100000"], "can get only"),
    ("ar", ["crop=100000"], "larger than the 16 px image"),
    ("tap", ["shift=4"], "multiple of the 4 classes"),
    ("ntga", ["target={other}"], "class lists differ"),
]


@pytest.fixture(scope="module")
def other_classes(tmp_path_factory):
    out = tmp_path_factory.mktemp("six")
    return build(out, "synthetic.num_classes=6", "synthetic.size=16", "synthetic.num_train=60",
                 "synthetic.num_test=30", "shard_size=30") / "test"  # fmt: skip


def _attack(method, synth_sets, root, *over):
    args = [
        sys.executable, str(REPO / "launch/attack.py"), "--config", str(REPO / f"configs/{method}/demo.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", "data.build=", f"run_root={root}",
        "name=a", "progress=false", "data.workers=0", *over,
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method, over, message", CASES, ids=[f"{m}-{o[0]}" for m, o, _ in CASES])
def test_a_setting_that_cannot_do_what_it_says_exits_2(synth_sets, other_classes, tmp_path, method, over, message):
    r = _attack(method, synth_sets, tmp_path, *(o.format(other=other_classes) for o in over))
    out = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, out[-3000:])
    assert message in out and "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "a" / "poisoned" / "manifest.json").exists()


def test_ops_picks_distinct_positions_so_the_real_l0_is_the_budget(synth_sets, tmp_path):
    r = _attack("ops", synth_sets, tmp_path, "pixels=4")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    for picks in json.loads((tmp_path / "a" / "ops_search.json").read_text())["classes"]:
        assert len({(p["row"], p["col"]) for p in picks}) == 4
    assert metrics["noise"]["l0_mean"] > 3.5  # before: 2.4 (several colours written to one position)


class _OneProcess:
    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def wait_for_everyone(self):
        pass


def test_ops_search_is_redone_when_the_set_is_rebuilt_in_place(tmp_path):
    from uedist.config import load_config
    from uedist.engine.attacks.ops import OPSConfig, _search

    a = build(tmp_path / "a", "synthetic.num_classes=3", "synthetic.size=8", "synthetic.num_train=30",
              "synthetic.num_test=6", "shard_size=10", "synthetic.seed=1")  # fmt: skip
    b = build(tmp_path / "b", "synthetic.num_classes=3", "synthetic.size=8", "synthetic.num_train=30",
              "synthetic.num_test=6", "shard_size=10", "synthetic.seed=2")  # fmt: skip
    place = tmp_path / "set"
    shutil.copytree(a / "train", place)
    cfg = load_config(OPSConfig, None, [f"data.train={place}", "data.workers=0", "progress=false", "method=ops"])
    run = tmp_path / "run"
    run.mkdir()
    first = _search(cfg, _OneProcess(), run)
    shutil.rmtree(place)
    shutil.copytree(b / "train", place)  # same path, same count, other pixels
    second = _search(cfg, _OneProcess(), run)
    fresh = _search(cfg, _OneProcess(), tmp_path)  # no cache
    assert second == fresh and second != first
