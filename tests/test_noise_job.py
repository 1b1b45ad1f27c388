"""Noise jobs end to end at toy scale: the per-pixel ε bound, keys and labels kept, class-wise noise constant
within a class, 2-process SEM, EM rounds, building the missing synthetic set (and refusing a stale one), config
validation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_multiprocess import accelerate_launch
from uedist.config import ConfigError, load_config
from uedist.data.images import decode_image
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.engine.attacks.sem_rem import SEMConfig

TOY = [
    "surrogate.width=0.125",
    "data.batch_size=16",
    "data.workers=0",
    "noise_steps=2",
    "eot_samples=2",
    "adv_steps=1",
    "adv_step_size=2",
    "final_batch_size=64",
    "progress=false",
    "ckpt_every=2",
    "log_every=2",
]


def _args(sets, tmp_path, name, *extra, toy=TOY):
    return [
        f"name={name}",
        f"run_root={tmp_path}",
        f"data.train={sets / 'train'}",
        f"data.test={sets / 'test'}",
        *toy,
        *extra,
    ]


EM_TOY = [a for a in TOY if not a.startswith(("eot_samples", "adv_"))]  # EM has no EOT draws or inner radius


def _run(script, args):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def check_poisoned(clean, poisoned, eps):
    """|poisoned − clean| ≤ ε for every pixel of every sample; keys, labels and order unchanged; returns δ."""
    assert verify_shard_set(poisoned, decode=True).ok
    deltas = {}
    for a, b in zip(iter_samples(clean), iter_samples(poisoned), strict=True):
        assert (a.key, a.label) == (b.key, b.label) and b.ext == "png"
        d = decode_image(b.data, b.ext).astype(int) - decode_image(a.data, a.ext).astype(int)
        assert np.abs(d).max() <= eps
        deltas[a.key] = (a.label, d)
    return deltas


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sem_two_processes(synth_sets, tmp_path):
    r = accelerate_launch(str(REPO / "launch/sem.py"), *_args(synth_sets, tmp_path, "sem", "steps=4"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("SEM noise: sem") == 1 and "0 violations" in r.stdout
    deltas = check_poisoned(synth_sets / "train", tmp_path / "sem" / "poisoned", 8)
    assert np.mean([np.abs(d).mean() for _, d in deltas.values()]) > 2  # the noise is really there
    m = json.loads((tmp_path / "sem" / "metrics.json").read_text())
    assert m["noise"]["linf_max"] <= 8 and "surrogate_acc_poisoned" in m and m["timings"]["final_pass_s"] > 0


@pytest.mark.slow
def test_rem_and_classwise_random(synth_sets, tmp_path):
    r = _run("rem.py", _args(synth_sets, tmp_path, "rem", "steps=2", "budget=4", "save_noise=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    check_poisoned(synth_sets / "train", tmp_path / "rem" / "poisoned", 4)
    s = next(iter_samples(tmp_path / "rem" / "poisoned"))
    noise = np.load(__import__("io").BytesIO(s.extras["noise.npy"]), allow_pickle=False)
    assert noise.dtype == np.int8 and np.abs(noise).max() <= 4
    random = [  # the random control's own schema: no surrogate fields
        "name=rcw",
        f"run_root={tmp_path}",
        f"data.train={synth_sets / 'train'}",
        f"data.test={synth_sets / 'test'}",
        *("data.workers=0", "final_batch_size=64", "progress=false", "method=random", "random_mode=classwise"),
    ]
    r = _run("attack.py", random)
    assert r.returncode == 0, r.stderr[-3000:]
    deltas = check_poisoned(synth_sets / "train", tmp_path / "rcw" / "poisoned", 8)
    by_class = {}
    for label, d in deltas.values():
        by_class.setdefault(label, []).append(d)
    for ds in by_class.values():  # identical within a class wherever no pixel was clipped at 0 or 255
        ref = max(ds, key=lambda d: np.abs(d).sum())
        for d in ds:
            same = (np.abs(d) == np.abs(ref)) | (np.sign(d) == np.sign(ref))
            assert same.mean() > 0.9


# uedist's earlier EM rule and settings, kept as options (the defaults are the reference code's)
EM_OURS = ["em.rule=summed", "em.augment=true", "em.normalize=true", "em.grad_clip=0", "em.start=random"]


def _em_args(mode, *extra):
    return [f"em.mode={mode}", "em.max_rounds=2", "em.train_steps=3", "em.stop_error=0.0",
            "em.batch_size=16", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("samplewise", []), ("classwise", []), ("classwise", EM_OURS)])
def test_em_rounds(synth_sets, tmp_path, mode, extra):
    r = _run(
        "em.py",
        _args(
            synth_sets,
            tmp_path,
            f"em_{mode}",
            *_em_args(mode, *extra),
            toy=EM_TOY,
        ),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / f"em_{mode}"
    m = json.loads((run / "metrics.json").read_text())
    assert m["rounds"] == 2 and len(m["history"]) == 2
    check_poisoned(synth_sets / "train", run / "poisoned", 8)
    assert "EM rounds" in r.stdout
    # the surrogate trained on the step loop: 3 steps a round, rows at log_every=2 and at each round's end
    curve = (run / "surrogate_curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,lr,loss,acc_poisoned") and [int(x.split(",")[0]) for x in curve[1:]] == [
        2,
        3,
        4,
        6,
    ]
    if mode == "samplewise":
        # lose the result: the rerun resumes at round 2 (no training: the round's checkpoint holds the history) and
        # rewrites the same poisoned set from the round kept on disk
        before = {f.name: f.read_bytes() for f in (run / "poisoned").glob("*.tar")}
        shutil.rmtree(run / "poisoned")
        (run / "metrics.json").unlink()
        r2 = _run("em.py", _args(synth_sets, tmp_path, f"em_{mode}", *_em_args(mode), "progress=false", toy=EM_TOY))
        assert r2.returncode == 0, r2.stderr[-3000:]
        log = (run / "logs" / "rank0.log").read_text()
        assert "resumed from" in log and "round 1 surrogate step" not in log.split("resumed from")[-1]
        assert json.loads((run / "metrics.json").read_text())["history"] == m["history"]
        assert {f.name: f.read_bytes() for f in (run / "poisoned").glob("*.tar")} == before


@pytest.mark.slow
@pytest.mark.multiprocess
def test_em_classwise_two_processes(synth_sets, tmp_path):
    """The reference class-wise rule under DDP: per-class sums and counts all-reduced each batch, so both ranks
    hold the same class noises (no rank waits on a collective the other skips) and the set is class-constant."""
    r = accelerate_launch(
        str(REPO / "launch/em.py"), *_args(synth_sets, tmp_path, "emcw", *_em_args("classwise"), toy=EM_TOY)
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((tmp_path / "emcw" / "metrics.json").read_text())["rounds"] == 2
    deltas = check_poisoned(synth_sets / "train", tmp_path / "emcw" / "poisoned", 8)
    by_class = {}
    for label, d in deltas.values():
        by_class.setdefault(label, []).append(d)
    for ds in by_class.values():  # identical within a class wherever no pixel was clipped at 0 or 255
        ref = max(ds, key=lambda d: np.abs(d).sum())
        assert np.abs(ref).max() > 0
        for d in ds:
            assert ((np.abs(d) == np.abs(ref)) | (np.sign(d) == np.sign(ref))).mean() > 0.9


@pytest.mark.slow
def test_main_job_builds_missing_synthetic_set(tmp_path):
    build = tmp_path / "build.yaml"
    build.write_text(
        f"source: synthetic\nout: {tmp_path / 'synth'}\nworkers: 0\nsynthetic:\n  num_classes: 3\n"
        "  size: 16\n  num_train: 48\n  num_test: 24\nshard_size: 16\n"
    )
    r = _run(
        "sem.py",
        [
            f"data.build={build}",
            f"data.train={tmp_path / 'synth/train'}",
            f"data.test={tmp_path / 'synth/test'}",
            f"run_root={tmp_path}",
            "name=demo",
            "steps=2",
            *TOY,
        ],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is missing: building it" in r.stdout and (tmp_path / "demo/poisoned/manifest.json").is_file()


@pytest.mark.slow
def test_main_job_refuses_a_set_from_an_older_generator(tmp_path, monkeypatch):
    """A synthetic set left by an older generator version is refused (exit 2, the rebuild command named), never
    silently poisoned as if it were the current default."""
    import uedist.data.sources.synthetic as src
    from uedist.data.build import BuildConfig, build_shard_sets, stale_splits

    build = tmp_path / "build.yaml"
    build.write_text(
        f"source: synthetic\nout: {tmp_path / 'synth'}\nworkers: 0\nsynthetic:\n  num_classes: 3\n"
        "  size: 16\n  num_train: 12\n  num_test: 6\nshard_size: 6\n"
    )
    cfg = load_config(BuildConfig, build)
    with monkeypatch.context() as m:
        m.setattr(src, "GENERATOR_VERSION", src.GENERATOR_VERSION - 1)
        build_shard_sets(cfg, progress=False)
        assert stale_splits(cfg) == []
    assert stale_splits(cfg) == [tmp_path / "synth/train", tmp_path / "synth/test"]
    r = _run(
        "sem.py",
        [
            f"data.build={build}",
            f"data.train={tmp_path / 'synth/train'}",
            f"data.test={tmp_path / 'synth/test'}",
            f"run_root={tmp_path}",
            "name=demo",
            "steps=2",
            *TOY,
        ],
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "older generator" in r.stderr and "overwrite=true" in r.stderr
    assert not (tmp_path / "demo/poisoned").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("budget=0", "budget must be in (0, 64]"),
        ("budget=8.5", "whole number"),
        ("eps=8", "'eps' is now 'budget'"),
        ("eot_samples=0", "eot_samples=0: must be > 0"),
        ("noise_steps=0", "noise_steps >= 1"),
        ("method=rem adv_steps=0", "rem needs adv_steps >= 1"),
        ("em.subset=0", "em.subset must be in (0, 1]"),
        ("em.subset=1.5", "em.subset must be in (0, 1]"),
        ("em.grad_clip=-1", "em.grad_clip=-1.0: must be >= 0"),
        ("em.rule=mean", "em.rule: expected one of"),
        ("em.start=uniform", "em.start: expected one of"),
    ],
)
def test_noise_config_validation(override, needle):
    from uedist.engine.attacks.em import EMConfig

    schema = EMConfig if override.startswith("em.") else SEMConfig  # the em section is EM's own
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(schema, None, override.split())


@pytest.mark.parametrize(
    "train, hint",
    [
        ("shards/synthetic/train", "--config configs/victim/synthetic.yaml data.train=runs/x/poisoned name=x_victim"),
        (
            "shards/synthetic_shapes/train",
            "--config configs/victim/synthetic.yaml data.train=runs/x/poisoned "
            "data.test=shards/synthetic_shapes/test name=x_victim",
        ),
        (
            "shards/cifar10/train",
            "--config <victim config> data.train=runs/x/poisoned name=x_victim",
        ),
    ],
)
def test_summary_names_the_victim_command(train, hint):
    """The summary's next step tests a built-in set's victim on that set's own test split."""
    from uedist.engine.attacks.base import attack_summary

    s = {
        "method": "em",
        "name": "x",
        "poisoned": "runs/x/poisoned",
        "eps": 8.0,
        "train": train,
        "timings": {},
        "noise": {"samples": 10, "linf_max": 8.0, "l2_mean": 1.0},
    }
    assert hint in attack_summary(s, Path("runs/x"))


def test_summary_next_command_is_shell_quoted():
    import shlex

    from uedist.engine.attacks.base import attack_summary

    s = {
        "method": "sem",
        "name": "my run",
        "poisoned": "/tmp/a b/it's",
        "eps": 8.0,
        "train": "shards/synthetic/train",
        "timings": {},
        "noise": {"samples": 10, "linf_max": 8.0, "l2_mean": 1.0},
    }
    line = attack_summary(s, Path("runs/x")).splitlines()[-1]
    args = shlex.split(line.split("next", 1)[1])
    assert "data.train=/tmp/a b/it's" in args and "name=my run_victim" in args


def test_reference_surrogate_options(synth_sets, tmp_path):
    """``surrogate_input=half train_on_rounded=true`` (the REM/SEM reference's surrogate: x − 0.5, std 1; trained on
    δ rounded to /255): the surrogate is built that way and a job runs end to end with both set; the default is
    ours (dataset normalization)."""
    from uedist.bench.fixtures import fake_manifest
    from uedist.engine.attacks.sem_rem import SEMConfig
    from uedist.engine.attacks.surrogate import surrogate_for

    ref = surrogate_for(load_config(SEMConfig, None, ["surrogate_input=half"]), fake_manifest(32, 10))
    ours = surrogate_for(load_config(SEMConfig, None, []), fake_manifest(32, 10))
    assert ref.mean.flatten().tolist() == [0.5] * 3 and ref.std.flatten().tolist() == [1.0] * 3
    assert ours.std.flatten().tolist() != [1.0] * 3
    r = _run(
        "sem.py", _args(synth_sets, tmp_path, "sem_ref", "steps=2", "surrogate_input=half", "train_on_rounded=true")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    check_poisoned(synth_sets / "train", tmp_path / "sem_ref" / "poisoned", 8)
