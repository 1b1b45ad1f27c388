"""The study pipeline at toy scale: the stage matrix, reuse by config hash (and by data content), partial reruns
after a change, a kill between stages, and the report (CSV, Markdown table, plots, grids, timing)."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import REPO
from uedist.app.pipeline import Study, StudyConfig
from uedist.config import ConfigError, load_config

TOY_NOISE = {
    "surrogate.width": 0.125,
    "data.batch_size": 16,
    "data.workers": 0,
    "noise_steps": 2,
    "eot_samples": 1,
    "adv_steps": 1,
    "adv_step_size": 2,
    "final_batch_size": 64,
    "steps": 3,
    "ckpt_every": 2,
    "log_every": 2,
}
TOY_VICTIM = {
    "model.width": 0.125,
    "data.batch_size": 32,
    "data.workers": 0,
    "epochs": 0.0,
    "steps": 4,
    "log_every": 2,
    "ckpt_every": 2,
}


def study_yaml(sets, tmp_path, **extra):
    cfg = {
        "name": "toy",
        "run_root": str(tmp_path),
        "datasets": {"syn": {"train": str(sets / "train"), "test": str(sets / "test")}},
        "attacks": {
            "clean": {"method": "clean"},
            "random_cw": {"method": "random", "set": {"random_mode": "classwise", "data": {"workers": 0}}},
            "sem": {"method": "sem", "config": "configs/sem/demo.yaml", "set": TOY_NOISE},
        },
        "purifiers": {
            "none": {"method": "none"},
            "jpeg10": {"method": "jpeg", "set": {"quality": 10, "data.workers": 0}},
            "gray": {"method": "grayscale", "set": {"data.workers": 0}},
        },
        "victims": {"r18": {"config": "configs/victim/synthetic.yaml", "set": TOY_VICTIM}},
        "modes": ["standard", "adversarial"],
        "adversarial": {"adv.enabled": True, "adv.steps": 1, "adv.step_size": 4},
        "skip": ["syn/*/gray/*/adversarial", "syn/random_cw/*/*/adversarial"],
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_pipeline(path, *over, **kw):
    return subprocess.run(
        [sys.executable, str(REPO / "launch/pipeline.py"), "--config", str(path), *over],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        **kw,
    )


def test_expansion_and_validation(synth_sets, tmp_path):
    cfg = load_config(StudyConfig, study_yaml(synth_sets, tmp_path))
    st = Study(cfg)
    kinds = [s.kind for s in st.stages]
    assert kinds.count("attack") == 2  # clean needs no stage
    assert kinds.count("purify") == 3 * 2  # (clean, random_cw, sem) x (jpeg10, gray)
    # victims: 3 attacks x 3 purifiers standard (9) + adversarial: clean/sem x none/jpeg10 (4)
    assert kinds.count("victim") == 13
    labels = [s.label for s in st.stages]
    assert labels.index("syn.sem") < labels.index("syn.sem.jpeg10") < labels.index("syn.sem.jpeg10.r18.standard")
    victim = next(s for s in st.stages if s.label == "syn.sem.jpeg10.r18.adversarial")
    assert victim.cfg.adv.enabled and victim.cfg.adv.steps == 1 and victim.cfg.data.train.endswith("/purified")
    assert victim.cfg.model.width == 0.125 and victim.cfg.data.test == str(synth_sets / "test")
    # stage hashes: the same config twice gives the same hashes; an attack change moves only what depends on it
    again = Study(load_config(StudyConfig, study_yaml(synth_sets, tmp_path)))
    assert [s.hash for s in again.stages] == [s.hash for s in st.stages]
    changed = Study(load_config(StudyConfig, study_yaml(synth_sets, tmp_path), ["attacks.sem.set.budget=4"]))
    moved = {a.label for a, b in zip(st.stages, changed.stages) if a.hash != b.hash}
    assert moved == {s.label for s in st.stages if s.label.startswith("syn.sem")}
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(StudyConfig, study_yaml(synth_sets, tmp_path), ["purifiers.jpeg10.methd=jpeg"])
    with pytest.raises(ConfigError, match="one of"):
        load_config(StudyConfig, study_yaml(synth_sets, tmp_path), ["attacks.sem.method=sam"])
    with pytest.raises(ConfigError, match="attacks.sem"):  # a typo inside a stage's own schema names the stage
        Study(load_config(StudyConfig, study_yaml(synth_sets, tmp_path), ["attacks.sem.set.epss=4"]))


@pytest.mark.slow
def test_rebuilt_dataset_gets_new_stage_folders(tmp_path):
    """A dataset rebuilt in place (other settings, a newer synthetic generator) changes the hash of every stage
    that reads it, so no result made from the old data is reused; an unchanged rebuild changes nothing."""
    from tests.conftest import build

    args = (
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=40",
        "synthetic.num_test=16",
        "shard_size=20",
    )
    sets = build(tmp_path / "sets", *args)
    path = study_yaml(sets, tmp_path)
    before = {s.label: s.dir for s in Study(load_config(StudyConfig, path)).stages}
    build(tmp_path / "sets", *args, "overwrite=true")  # same settings: same bytes
    assert {s.label: s.dir for s in Study(load_config(StudyConfig, path)).stages} == before
    build(tmp_path / "sets", *args, "synthetic.seed=1", "overwrite=true")  # other pictures, same path
    after = {s.label: s.dir for s in Study(load_config(StudyConfig, path)).stages}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)


@pytest.mark.slow
def test_study_refuses_a_dataset_from_an_older_generator(tmp_path, monkeypatch):
    import uedist.data.sources.synthetic as src
    from tests.conftest import build

    args = (
        "synthetic.num_classes=4",
        "synthetic.size=16",
        "synthetic.num_train=40",
        "synthetic.num_test=16",
        "shard_size=20",
    )
    with monkeypatch.context() as m:
        m.setattr(src, "GENERATOR_VERSION", src.GENERATOR_VERSION - 1)
        sets = build(tmp_path / "sets", *args)
    spec = tmp_path / "build.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "source": "synthetic",
                "out": str(sets),
                "workers": 0,
                "shard_size": 20,
                "synthetic": {"num_classes": 4, "size": 16, "num_train": 40, "num_test": 16},
            }
        )
    )
    path = study_yaml(sets, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"]["syn"]["build"] = str(spec)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = run_pipeline(path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "older generator" in r.stdout + r.stderr and "overwrite=true" in r.stdout + r.stderr
    assert not list((tmp_path / "toy").glob("*/*/stage.json"))


@pytest.mark.slow
def test_pipeline_runs_resumes_and_reports(synth_sets, tmp_path):
    # a smaller matrix than above: 2 attack stages, 3 purify stages, 7 victims
    path = study_yaml(
        synth_sets,
        tmp_path,
        skip=[
            "syn/*/gray",
            "syn/*/jpeg10/*/adversarial",
            "syn/clean/none/*/adversarial",
            "syn/random_cw/*/*/adversarial",
        ],
    )
    # kill it once the first stage has finished, then rerun: finished stages are reused, the rest run
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch/pipeline.py"), "--config", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not list((tmp_path / "toy").glob("*/*/stage.json")):
        assert proc.poll() is None, "the pipeline ended before a stage finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.parent.name for p in (tmp_path / "toy").glob("*/*/stage.json")}
    assert first
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "toy" / "logs" / "rank0.log").read_text()
    for name in first:
        assert f"done earlier, reusing {tmp_path / 'toy'}" in log and name in log
    rows = list(csv.DictReader(open(tmp_path / "toy/report/results.csv")))
    assert len(rows) == 7 and all(0 <= float(r["test_top1"]) <= 100 for r in rows)
    assert [(r["attack"], r["purifier"], r["mode"]) for r in rows] == [
        ("clean", "none", "standard"),
        ("clean", "jpeg10", "standard"),
        ("random_cw", "none", "standard"),
        ("random_cw", "jpeg10", "standard"),
        ("sem", "none", "standard"),
        ("sem", "jpeg10", "standard"),
        ("sem", "none", "adversarial"),
    ]  # the study's order
    md = (tmp_path / "toy/report/results.md").read_text()
    assert "### syn, standard training" in md and "| attack | none | jpeg10 |" in md and "### syn, adversarial" in md
    by = {(r["attack"], r["purifier"], r["mode"]): float(r["test_top1"]) for r in rows}
    assert f"| sem | {by[('sem', 'none', 'standard')]:.2f} | {by[('sem', 'jpeg10', 'standard')]:.2f} |" in md
    for f in ("accuracy.png", "curves.png", "grid_syn_sem.png", "grid_syn_random_cw.png", "timing.md", "timing.csv"):
        assert (tmp_path / "toy/report" / f).stat().st_size > 0, f
    # the noise figure: a row of clean images, then a noise row and a poisoned row per attack; a tile per class
    with Image.open(tmp_path / "toy/report/noise_syn.png") as im:
        assert im.size[1] == 5 * (96 + 2) + 2 and im.size[0] > 110 + 4 * 96
    # a second run does nothing but reuse; a change reruns only the stages downstream of it
    r = run_pipeline(path, "--plan")
    assert r.returncode == 0 and "todo" not in r.stdout and r.stdout.count("done") == 12
    r = run_pipeline(path, "purifiers.jpeg10.set.quality=50", "--plan")
    todo = [line.split()[2] for line in r.stdout.splitlines() if line.startswith("todo")]
    assert sorted(todo) == sorted(
        [f"syn.{n}.jpeg10" for n in ("clean", "random_cw", "sem")]
        + [f"syn.{n}.jpeg10.r18.standard" for n in ("clean", "random_cw", "sem")]
    )
    # the report command rebuilds the same table from the folder
    r = subprocess.run(
        [sys.executable, "-m", "uedist.app.cli", "report", str(tmp_path / "toy"), "--out", str(tmp_path / "rep2")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep2/results.md").read_text() == md


def test_expansion_with_dvae_and_diffusion(synth_sets, tmp_path):
    """D-VAE, JCDP and plain diffusion purifiers resolve into their own schemas; the diffusion purifiers share one
    DDPM stage per dataset, trained by default on the clean test split, and depend on it."""
    path = study_yaml(
        synth_sets,
        tmp_path,
        purifiers={
            "none": {"method": "none"},
            "dvae": {"method": "dvae", "config": "configs/dvae/cifar10_cpu.yaml"},
            "jcdp": {"method": "jcdp", "set": {"t_p": 10, "rounds": 2}},
            "plain": {"method": "diffusion", "set": {"t_p": 10}},
        },
        ddpm={"syn": {"config": "configs/ddpm/cifar10_cpu.yaml"}},
        modes=["standard"],
        skip=[],
    )
    st = Study(load_config(StudyConfig, path))
    ddpm = [s for s in st.stages if s.kind == "ddpm"]
    assert len(ddpm) == 1 and ddpm[0].cfg.data.train == str(synth_sets / "test")
    jcdp = next(s for s in st.stages if s.label == "syn.sem.jcdp")
    plain = next(s for s in st.stages if s.label == "syn.sem.plain")
    assert (jcdp.cfg.method, plain.cfg.method) == ("jcdp", "diffusion") and jcdp.inputs["ddpm"] is ddpm[0]
    assert jcdp.cfg.ddpm == str(ddpm[0].dir) and jcdp.cfg.data.src.endswith(
        "syn.sem-" + st.stages[[s.label for s in st.stages].index("syn.sem")].hash + "/poisoned"
    )
    dvae = next(s for s in st.stages if s.label == "syn.random_cw.dvae")
    assert dvae.cfg.data.src.endswith("/poisoned") and dvae.cfg.data.clean == str(synth_sets / "train")
    with pytest.raises(ConfigError, match="needs ddpm.syn"):
        load_config(StudyConfig, path, ["ddpm={}"])
    # skip every diffusion cell and the DDPM is not trained for nothing; D-VAE is untouched
    st = Study(load_config(StudyConfig, path, ['skip=["*/*/jcdp", "*/*/plain"]']))
    kinds = [s.kind for s in st.stages]
    assert "ddpm" not in kinds and any(s.label == "syn.sem.dvae" for s in st.stages)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_two_processes(synth_sets, tmp_path):
    """The study runs under accelerate launch with 2 processes: every stage collective, one report."""
    from tests.test_multiprocess import accelerate_launch

    path = study_yaml(
        synth_sets,
        tmp_path,
        attacks={"random_cw": {"method": "random", "set": {"random_mode": "classwise", "data.workers": 0}}},
        purifiers={"none": {"method": "none"}, "jpeg10": {"method": "jpeg", "set": {"quality": 10, "data.workers": 0}}},
        modes=["standard"],
        skip=[],
    )
    r = accelerate_launch(str(REPO / "launch/pipeline.py"), "--config", str(path), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("study toy: 4 stages done") == 1
    recs = [json.loads(p.read_text()) for p in (tmp_path / "toy").glob("*/*/stage.json")]
    assert len(recs) == 4 and all(rec["world_size"] == 2 for rec in recs)
    assert all(rec["summary"]["ranks_in_sync"] for rec in recs if rec["kind"] == "victim")
    rows = list(csv.DictReader(open(tmp_path / "toy/report/results.csv")))
    assert [(row["attack"], row["purifier"]) for row in rows] == [("random_cw", "none"), ("random_cw", "jpeg10")]


@pytest.mark.slow
def test_pipeline_diffusion_stages_run(synth_sets, tmp_path):
    """A DDPM stage then JCDP and plain-diffusion stages that read it, then victims: the cross-stage wiring runs."""
    tiny_ddpm = {
        "unet.name": "unet",
        "unet.args": {
            "ch": 16,
            "ch_mult": [1, 2],
            "num_res_blocks": 1,
            "attn_resolutions": [8],
            "dropout": 0.0,
            "image_size": 16,
        },
        "data.batch_size": 8,
        "data.workers": 0,
        "steps": 4,
        "warmup_steps": 1,
        "ckpt_every": 2,
        "log_every": 2,
        "num_samples": 2,
        "sample_steps": 3,
    }
    diff = {
        "t_p": 4,
        "rounds": 1,
        "stride": 2,
        "data.batch_size": 40,
        "data.workers": 0,
        "lpips.backbone": "random",
        "lpips.net": "vgg",
        "grid": 4,
    }
    path = study_yaml(
        synth_sets,
        tmp_path,
        attacks={"random_cw": {"method": "random", "set": {"random_mode": "classwise", "data.workers": 0}}},
        purifiers={
            "jcdp": {"method": "jcdp", "set": {**diff, "rounds": 2, "lam_lpips": 0.0}},
            "plain": {"method": "diffusion", "set": diff},
        },
        ddpm={"syn": {"set": tiny_ddpm}},
        modes=["standard"],
        skip=["syn/*/plain/*/*"],
    )
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = {
        json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in (tmp_path / "toy").glob("*/*/stage.json")
    }
    assert set(recs) == {
        "syn.ddpm",
        "syn.random_cw",
        "syn.random_cw.jcdp",
        "syn.random_cw.plain",
        "syn.random_cw.jcdp.r18.standard",
    }  # the default "none" column is gone when not listed
    ddpm_dir = recs["syn.ddpm"]["output"]
    assert recs["syn.random_cw.jcdp"]["config"]["ddpm"] == ddpm_dir == recs["syn.random_cw.plain"]["config"]["ddpm"]
    assert recs["syn.random_cw.plain"]["config"]["method"] == "diffusion"
    assert (tmp_path / "toy/report/grid_syn_random_cw.png").is_file()


def test_records_carried_to_a_fresh_folder_are_reused(synth_sets, tmp_path):
    """``uedist report --records`` copies the finished stages' records without their sets; copied into an empty
    study folder (another machine, a later session), the pipeline reuses them: a set whose readers are all done is
    not rebuilt, and one a stage must read again is rebuilt with everything upstream of it."""
    path = study_yaml(
        synth_sets,
        tmp_path,
        attacks={"random_cw": {"method": "random", "set": {"random_mode": "classwise", "data": {"workers": 0}}}},
        purifiers={"none": {"method": "none"}, "jpeg10": {"method": "jpeg", "set": {"quality": 10, "data.workers": 0}}},
        modes=["standard"],
        skip=[],
    )
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study = tmp_path / "toy"

    def results():
        return {(x["purifier"], x["test_top1"]) for x in csv.DictReader(open(study / "report/results.csv"))}

    before = results()
    assert len(before) == 2
    # a run with another JPEG quality leaves stale stage folders behind; the study as last run is the first one
    for over in (["purifiers.jpeg10.set.quality=30"], []):
        r = run_pipeline(path, *over)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list(study.glob("*/*/stage.json"))) == 6
    r = subprocess.run(
        [sys.executable, "-m", "uedist.app.cli", "report", str(study), "--records", str(tmp_path / "rec")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    recs = sorted(p.relative_to(tmp_path / "rec").as_posix() for p in (tmp_path / "rec").rglob("*") if p.is_file())
    assert [p for p in recs if "/" not in p] == ["study.json", "study.yaml"]
    assert all(p.split("/")[-1] in ("stage.json", "config.yaml", "metrics.json", "curve.csv") for p in recs if "/" in p)
    assert sum(p.endswith("stage.json") for p in recs) == 4  # attack, jpeg, two victims; not the stale quality-30 ones
    r = subprocess.run([sys.executable, "-m", "uedist.app.cli", "report", str(tmp_path / "rec")], cwd=REPO,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "rec" / "report/results.csv")))
    assert {(x["purifier"], x["test_top1"]) for x in rows} == before and len(rows) == 2  # no duplicate rows
    shutil.rmtree(tmp_path / "rec" / "report")
    shutil.rmtree(study)
    shutil.copytree(tmp_path / "rec", study)

    def plan():
        r = run_pipeline(path, "--plan")
        assert r.returncode == 0, r.stderr[-3000:]
        return [tuple(line.split()[:3:2]) for line in r.stdout.splitlines()]

    labels = [
        "syn.random_cw",
        "syn.random_cw.none.r18.standard",
        "syn.random_cw.jpeg10",
        "syn.random_cw.jpeg10.r18.standard",
    ]
    assert plan() == list(zip(["done", "done", "done", "done"], labels))
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not list(study.glob("*/*/*/manifest.json"))  # nothing rebuilt
    assert results() == before

    # without the attack record: nothing reads the poisoned set any more, so it is not needed
    (attack_dir,) = (study / "attack").iterdir()
    shutil.rmtree(attack_dir)
    assert plan()[0] == ("unneeded", "syn.random_cw")
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "syn.random_cw: not needed, every stage that reads it is done" in (study / "logs/rank0.log").read_text()
    assert not attack_dir.exists() and results() == before

    # the JPEG victim must run again: its purified set (record kept, set absent) and the attack are rebuilt
    (study / "victim").joinpath(
        next(p.name for p in (study / "victim").iterdir() if ".jpeg10." in p.name), "stage.json"
    ).unlink()
    assert plan() == list(zip(["todo", "done", "todo", "todo"], labels))
    r = run_pipeline(path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert attack_dir.is_dir() and len(list(study.glob("*/*/*/manifest.json"))) == 2
    assert results() == before  # the same sets, the same victim


def _small_study(sets, tmp_path, train=None, **extra):
    """One attack (random, classwise), the given purifiers (default: none), one toy victim, standard mode."""
    path = study_yaml(
        sets,
        tmp_path,
        attacks={"random_cw": {"method": "random", "set": {"random_mode": "classwise", "data.workers": 0}}},
        purifiers=extra.pop("purifiers", {"none": {"method": "none"}}),
        modes=["standard"],
        skip=extra.pop("skip", []),
        **extra,
    )
    if train is not None:
        cfg = yaml.safe_load(path.read_text())
        cfg["datasets"]["syn"]["train"] = str(train)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_corrupt_shard_in_a_study_exits_2_naming_the_stage_and_shard(synth_sets, tmp_path):
    """A study runs each stage through the single job's runner: a corrupt shard of the clean train set (read by the
    attack) or of a finished poisoned set (read by the purifier) ends the study with exit code 2 and a message
    naming the stage and the shard file, not a traceback; the failed stage leaves no record."""
    from tests.test_reliability import _copy, _corrupt

    train = _copy(synth_sets / "train", tmp_path / "train")
    want = _corrupt(train)
    r = run_pipeline(_small_study(synth_sets, tmp_path, train=train))
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert re.search(rf"stage attack syn\.random_cw: \S*{want}", r.stderr), r.stderr[-3000:]
    assert not list((tmp_path / "toy").glob("*/*/stage.json")) and not list(
        (tmp_path / "toy").glob("*/*/*/manifest.json")
    )

    # the attack finishes on intact data; then one shard of its poisoned set is garbled before the purifier reads it
    jpeg = {"jpeg10": {"method": "jpeg", "set": {"quality": 10, "data.workers": 0}}}
    r = run_pipeline(_small_study(synth_sets, tmp_path, purifiers=jpeg, skip=["syn/*/jpeg10"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (rec,) = (tmp_path / "toy").glob("attack/*/stage.json")
    poisoned = Path(json.loads(rec.read_text())["output"])
    want = _corrupt(poisoned)
    r = run_pipeline(_small_study(synth_sets, tmp_path, purifiers=jpeg))
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert re.search(rf"stage purify syn\.random_cw\.jpeg10: \S*poisoned/{want}", r.stderr), r.stderr[-3000:]
    assert not list((tmp_path / "toy").glob("purify/*/stage.json"))


def test_non_finite_loss_in_a_study_exits_3_naming_the_stage(synth_sets, tmp_path, monkeypatch):
    """A stage of a study that stops on a non-finite loss ends the study with exit code 3, as the single job does,
    its message naming the stage; nothing after it runs and it leaves no record."""
    import dataclasses
    import logging

    from uedist.app.jobs import StageFailed, guarded
    from uedist.app.stages import load_stages
    from uedist.dist import make_accelerator
    from uedist.engine.train.checkpoints import NonFiniteLoss
    from uedist.registry import STAGES

    def boom(cfg, accelerator, run_dir):
        raise NonFiniteLoss("loss is nan at step 3")

    load_stages()
    monkeypatch.setitem(STAGES._items, "random", dataclasses.replace(STAGES.get("random"), fn=boom))
    study = Study(load_config(StudyConfig, _small_study(synth_sets, tmp_path)))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("uedist.attack.random")
    logger.addHandler(handler)
    try:
        with pytest.raises(StageFailed) as e:
            study.run(make_accelerator(cpu=True))
        assert e.value.code == 3 and e.value.where == "stage attack syn.random_cw"
        assert guarded(lambda: study.run(make_accelerator(cpu=True)), logger) == 3  # what launch/pipeline.py returns
    finally:
        logger.removeHandler(handler)
    assert seen == ["stage attack syn.random_cw: loss is nan at step 3"] * 2
    assert not list((tmp_path / "toy").glob("*/*/stage.json"))


def test_records_from_before_the_attack_rename_are_migrated(synth_sets, tmp_path):
    """A study folder written while the attack kind was called "noise" (noise/<stage>/, "kind": "noise", the tag
    "noise", paths through noise/): ``uedist report --migrate`` moves and rewrites it, idempotently, and the
    stages are done again (the hashes kept the old kind's name). The report reads an unmigrated folder too."""
    from uedist.app.report import load_records
    from uedist.app.study_records import legacy_stage_folders, migrate_study

    study = Study(load_config(StudyConfig, _small_study(synth_sets, tmp_path)))
    old_root = str(study.dir / "noise")
    for st in study.stages:
        old = st.kind == "attack"
        folder = Path(old_root) / st.dir.name if old else st.dir
        out = study.output_path(st)
        tags = {("noise" if k == "attack" else k): v for k, v in st.tags.items()}
        inputs = {r: (study.output_path(v) if hasattr(v, "hash") else str(v)) for r, v in st.inputs.items()}
        rec = {
            "kind": "noise" if old else st.kind,
            "label": st.label,
            "hash": st.hash,
            "tags": tags,
            "config": {"run_root": str(folder.parent), "out": out.replace(f"{study.dir}/attack", old_root)},
            "inputs": {r: p.replace(f"{study.dir}/attack", old_root) for r, p in inputs.items()},
            "output": out.replace(f"{study.dir}/attack", old_root),
            "summary": {"test_top1": 50.0, "noise": {"samples": 240}},
        }
        folder.mkdir(parents=True)
        (folder / "stage.json").write_text(json.dumps(rec, indent=2) + "\n")
        (folder / "config.yaml").write_text(f"run_root: {folder.parent}\nout: {rec['output']}\nsave_noise: false\n")
    (study.dir / "study.json").write_text(json.dumps({"stages": [f"noise/{study.stages[0].dir.name}"]}))
    assert [study.record(st) is None for st in study.stages] == [True, False]
    assert [r["kind"] for r in load_records(study.dir)] == ["attack"]  # read in the current form, files untouched
    assert legacy_stage_folders(study.dir) == [Path(old_root) / study.stages[0].dir.name]

    r = subprocess.run(
        [sys.executable, "-m", "uedist.app.cli", "report", str(study.dir), "--migrate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "2 stage folders migrated" in r.stderr + r.stdout, r.stderr
    assert not Path(old_root).exists() and not legacy_stage_folders(study.dir)
    attack, victim = (study.record(st) for st in study.stages)
    assert attack["kind"] == "attack" and attack["tags"] == {"dataset": "syn", "attack": "random_cw"}
    assert attack["output"] == study.output_path(study.stages[0]) == victim["inputs"]["train"]
    assert attack["summary"]["noise"] == {"samples": 240}  # a summary's own keys are not tags
    assert victim["tags"]["attack"] == "random_cw" and "noise" not in victim["tags"]
    assert f"out: {study.dir}/attack/" in (study.stages[0].dir / "config.yaml").read_text()
    assert json.loads((study.dir / "study.json").read_text())["stages"] == [f"attack/{study.stages[0].dir.name}"]
    assert study.states() == {st.label: "done" for st in study.stages}
    before = {p: p.read_bytes() for p in study.dir.rglob("*") if p.is_file()}
    assert migrate_study(study.dir) == 0  # idempotent
    assert {p: p.read_bytes() for p in study.dir.rglob("*") if p.is_file()} == before


def test_editing_a_config_file_a_stage_names_by_path_gives_it_a_new_hash(synth_sets, tmp_path):
    """Reliability II, item 4: TAP names its source victim's YAML by path (``source_victim``); changing that file
    (steps 2 -> 30) must not leave the TAP stage "already done" with a poisoned set made against the old source."""
    victim = tmp_path / "source_victim.yaml"
    victim.write_text(yaml.safe_dump({"base": str(REPO / "configs/victim/synthetic.yaml"), "steps": 2, "epochs": 0}))
    path = study_yaml(
        synth_sets,
        tmp_path,
        attacks={"tap": {"method": "tap", "config": "configs/tap/demo.yaml", "set": {"source_victim": str(victim)}}},
        purifiers={"none": {"method": "none"}},
        modes=["standard"],
        skip=[],
    )

    def hashes():
        return {st.label: st.hash for st in Study(load_config(StudyConfig, path)).stages}

    before = hashes()
    victim.write_text(yaml.safe_dump({"base": str(REPO / "configs/victim/synthetic.yaml"), "steps": 30, "epochs": 0}))
    after = hashes()
    assert after["syn.tap"] != before["syn.tap"]  # and so every stage downstream of it
    assert all(after[k] != before[k] for k in after)
    victim.write_text(yaml.safe_dump({"base": str(REPO / "configs/victim/synthetic.yaml"), "steps": 2, "epochs": 0}))
    assert hashes() == before  # the content, not the file's time or the edit, decides


def test_a_study_reuses_finished_standalone_runs_of_the_same_identity(synth_sets, tmp_path, monkeypatch):
    """The README's order: a standalone attack, the victim its summary suggests, then a study holding both stages.
    The study links the runs' files into its stage folders and records them (``reused_from``) instead of computing
    them, the victim through the attack it reused; a run of another config, or one whose input was written after
    it finished, is not reused."""
    import dataclasses
    import os

    from uedist.app.jobs import run_stage_main
    from uedist.app.stages import load_stages
    from uedist.app.study_run import StandaloneRuns, _comparable
    from uedist.dist import make_accelerator
    from uedist.registry import STAGES

    runs = tmp_path / "runs"
    data = [f"data.train={synth_sets / 'train'}", f"data.test={synth_sets / 'test'}", "data.workers=0"]
    attack = ["method=random", "random_mode=classwise", *data, f"run_root={runs}", "progress=false"]
    assert run_stage_main("attack", [*attack, "name=alone"]) == 0
    assert run_stage_main("attack", [*attack, "name=other", "seed=1"]) == 0  # another identity
    victim = ["--config", "configs/victim/synthetic.yaml", *(f"{k}={v}" for k, v in TOY_VICTIM.items())]
    victim += [f"data.train={runs / 'alone' / 'poisoned'}", f"data.test={synth_sets / 'test'}", f"run_root={runs}"]
    assert run_stage_main("victim", [*victim, "name=alone_victim", "progress=false"], default_method="victim") == 0

    def boom(cfg, accelerator, run_dir):
        raise AssertionError("computed a stage a finished run holds")

    load_stages()
    for name in ("random", "victim"):
        monkeypatch.setitem(STAGES._items, name, dataclasses.replace(STAGES.get(name), fn=boom))
    study = Study(load_config(StudyConfig, _small_study(synth_sets, tmp_path, run_root=str(runs))))
    recs = {r["kind"]: r for r in study.run(make_accelerator(cpu=True))}
    assert recs["attack"]["reused_from"] == str(runs / "alone")
    assert recs["victim"]["reused_from"] == str(runs / "alone_victim")
    attack_dir, (victim_dir,) = Path(recs["attack"]["output"]), list((runs / "toy" / "victim").glob("*"))
    assert attack_dir.parent.parent == runs / "toy" / "attack" and (attack_dir / "manifest.json").is_file()
    shard = sorted(attack_dir.glob("*.tar"))[0]
    assert os.path.samefile(shard, runs / "alone" / "poisoned" / shard.name)  # linked, not copied
    alone = json.loads((runs / "alone_victim" / "metrics.json").read_text())
    assert recs["victim"]["summary"]["test_top1"] == alone["test_top1"]
    assert json.loads((victim_dir / "stage.json").read_text())["reused_from"] == str(runs / "alone_victim")
    assert not (victim_dir / "logs").exists() and (victim_dir / "curve.csv").is_file()
    # the records now say done: a rerun reuses the study's own stage folders
    assert all(Study(load_config(StudyConfig, tmp_path / "study.yaml")).record(s) for s in study.stages)
    # a run finished before its input was last written is not trusted (the input may have been rebuilt since)
    other = Study(load_config(StudyConfig, _small_study(synth_sets, tmp_path, run_root=str(runs), name="toy2")))
    st = next(s for s in other.stages if s.kind == "attack")
    assert StandaloneRuns(other).find(st)[0] == runs / "alone"
    os.utime(runs / "alone" / "metrics.json", (0, 0))
    assert StandaloneRuns(other).find(st) is None
    assert _comparable({"data": {"train": "a", "build": "b.yaml"}, "seed": 0}) == {"data": {"train": "a"}, "seed": 0}
