"""An attack checks what it is given before it trusts it (Reliability II, items 7 and the source-model tracebacks):
TAP / SEP refuse a source run that has not finished, a source whose config.yaml no longer matches its checkpoint
(the refused-rerun overwrite of item 1), and a source trained on other images, each with exit 2 naming the run."""

import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture(scope="module")
def victim_run(synth_sets, tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    args = [
        sys.executable, str(REPO / "launch/victim.py"), "--config", str(REPO / "configs/victim/synthetic.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={root}", "name=v",
        "progress=false", "data.workers=0", "model.width=0.125", "epochs=0", "steps=3", "bf16=false",
    ]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "v"


def _tap(synth_sets, tmp_path, source):
    args = [
        sys.executable, str(REPO / "launch/attack.py"), "--config", str(REPO / "configs/tap/demo.yaml"),
        f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", f"run_root={tmp_path}", "name=t",
        f"source_model={source}", "steps=1", "restarts=1", "progress=false", "data.workers=0",
    ]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _damaged(victim_run, tmp_path, case):
    src = tmp_path / f"src_{case}"
    shutil.copytree(victim_run, src)
    if case == "unfinished":
        (src / "metrics.json").unlink()
    elif case == "edited config":  # e.g. overwritten by a refused rerun with other settings
        cfg = yaml.safe_load((src / "config.yaml").read_text())
        cfg["model"]["width"] = 0.25
        (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    return src


@pytest.mark.parametrize(
    "case, message",
    [("unfinished", "has not finished"), ("edited config", "does not match the config its checkpoint")],
)
def test_tap_refuses_a_source_run_it_cannot_trust(synth_sets, victim_run, tmp_path, case, message):
    r = _tap(synth_sets, tmp_path, _damaged(victim_run, tmp_path, case))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    out = r.stdout + r.stderr
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "t" / "poisoned" / "manifest.json").exists()


def test_tap_runs_from_a_finished_source(synth_sets, victim_run, tmp_path):
    r = _tap(synth_sets, tmp_path, victim_run)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def other_sets(tmp_path_factory):
    """A test set of other classes (6, not 4) and one of another image size (24 px), and an empty one."""
    from tests.conftest import build

    root = tmp_path_factory.mktemp("other")
    classes = build(root / "classes", "synthetic.num_classes=6", "synthetic.size=16", "synthetic.num_train=60",
                    "synthetic.num_test=30", "shard_size=30")  # fmt: skip
    size = build(root / "size", "synthetic.num_classes=4", "synthetic.size=24", "synthetic.num_train=40",
                 "synthetic.num_test=20", "shard_size=20")  # fmt: skip
    return {"classes": classes / "test", "size": size / "test"}


@pytest.mark.parametrize("which, message", [("classes", "class lists differ"), ("size", "image sizes differ")])
def test_sem_refuses_a_test_set_of_other_classes_or_size_before_training(synth_sets, other_sets, tmp_path, which,
                                                                        message):  # fmt: skip
    args = [
        sys.executable, str(REPO / "launch/sem.py"), f"data.train={synth_sets / 'train'}",
        f"data.test={other_sets[which]}", "data.build=", f"run_root={tmp_path}", "name=s", "progress=false",
        "data.workers=0", "steps=2", "surrogate.width=0.125",
    ]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "s" / "surrogate").exists()  # refused before any training


def test_evaluating_on_an_empty_test_set_is_an_error_not_zero_percent(synth_sets, tmp_path):
    import json

    import torch

    from uedist.data.manifest import ManifestError
    from uedist.engine.evaluate import evaluate

    empty = tmp_path / "empty"
    empty.mkdir()
    m = json.loads((synth_sets / "test" / "manifest.json").read_text())
    m.update(shards=[], num_samples=0, class_counts=[0] * len(m["classes"]))
    (empty / "manifest.json").write_text(json.dumps(m))

    class Acc:
        device, process_index, num_processes = torch.device("cpu"), 0, 1

    with pytest.raises(ManifestError, match="no samples"):
        evaluate(torch.nn.Linear(1, 1), empty, accelerator=Acc())
