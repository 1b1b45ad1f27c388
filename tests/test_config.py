from dataclasses import dataclass, field
from typing import List, Literal, Optional, Tuple

import pytest
import yaml

from uedist.config import ConfigError, config_hash, load_config, require, save_config, signed
from uedist.data.build import BuildConfig


@dataclass
class Inner:
    eps: int = 8
    step: float = signed(0.8)

    def validate(self) -> None:
        require(self.eps > 0, f"eps must be > 0, got {self.eps}")


@dataclass
class Cfg:
    name: str = "x"
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    size: Tuple[int, int] = (32, 32)
    tags: List[str] = field(default_factory=list)
    maybe: Optional[int] = None
    inner: Inner = field(default_factory=Inner)


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  eps: 4\n")
    cfg = load_config(Cfg, f, ["inner.step=2", "size=[8, 16]", "tags=[a,b]", "maybe=3", "flag=true", "mode=b"])
    assert cfg.name == "y" and cfg.inner.eps == 4 and cfg.inner.step == 2.0 and isinstance(cfg.inner.step, float)
    assert cfg.size == (8, 16) and cfg.tags == ["a", "b"] and cfg.maybe == 3 and cfg.flag and cfg.mode == "b"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("nmae=z", "unknown config key 'nmae' (did you mean 'name'?)"),
        ("inner.epz=3", "unknown config key inner.'epz'"),
        ("inner.eps=8.5", "inner.eps: expected an int"),
        ("inner.eps='8'", "inner.eps: expected an int"),
        ("flag=1", "flag: expected a bool"),
        ("mode=c", "mode: expected one of ['a', 'b']"),
        ("size=[1,2,3]", "size: expected 2 items"),
        ("inner.eps=0", "eps must be > 0"),
        ("inner.step=abc", "inner.step: expected a number"),
        ("inner.step=1e-3x", "inner.step: expected a number"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    assert needle in str(e.value)


def test_typo_in_file_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  eps: 8\n  setp: 1\n")
    with pytest.raises(ConfigError, match="inner.'setp'"):
        load_config(Cfg, f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Cfg, f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")


def test_scientific_notation_floats():
    assert load_config(Cfg, None, ["inner.step=1e-3"]).inner.step == 1e-3  # YAML 1.1 reads it as a string
    assert load_config(Cfg, None, ["inner.step=-2.5E+2"]).inner.step == -250.0


def test_save_roundtrip_and_hash(tmp_path):
    cfg = load_config(Cfg, None, ["inner.eps=4", "size=[8,8]"])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(Cfg, path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Cfg, None, ["inner.eps=5"])) != config_hash(cfg)
    assert yaml.safe_load(path.read_text())["inner"]["eps"] == 4


def test_shipped_shard_configs_load():
    from tests.conftest import REPO

    files = sorted((REPO / "configs" / "shards").glob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        cfg = load_config(BuildConfig, f)
        assert cfg.source in f.read_text()
    with pytest.raises(ConfigError, match="unknown source 'imagenett'"):
        load_config(BuildConfig, None, ["source=imagenett"])


def test_shipped_victim_configs_load():
    from tests.conftest import REPO
    from uedist.engine.train.victim import VictimConfig

    files = sorted((REPO / "configs" / "victim").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        cfg = load_config(VictimConfig, f)
        assert cfg.name and (cfg.steps or cfg.epochs)
    at = load_config(VictimConfig, REPO / "configs/victim/cifar10_at.yaml")
    assert at.adv.enabled and (at.adv.eps, at.adv.steps, at.adv.step_size) == (4.0, 10, 0.8)


def test_shipped_purifier_and_ddpm_configs_load():
    """Every shipped D-VAE, baseline, DDPM and JCDP config parses and validates (a typo in one is caught here, not
    an hour into a job)."""
    from tests.conftest import REPO
    from uedist.engine.purifiers.baselines import PurifyConfig
    from uedist.engine.purifiers.dvae import DVAEConfig
    from uedist.engine.purifiers.jcdp import JCDPConfig
    from uedist.engine.train.ddpm import DDPMConfig

    kinds = {
        "dvae": (DVAEConfig, []),
        "purify": (PurifyConfig, ["data.src=runs/x/poisoned"]),  # src: a CLI key
        "ddpm": (DDPMConfig, []),
        "jcdp": (JCDPConfig, []),
    }
    for d, (cls, overrides) in kinds.items():
        files = sorted((REPO / "configs" / d).glob("*.yaml"))
        assert len(files) >= 4, d
        for f in files:
            assert load_config(cls, f, overrides).name, f
    t300 = load_config(DDPMConfig, REPO / "configs/ddpm/cifar10_cpu_t300.yaml")
    assert t300.t_max == 300 and t300.init == "runs/ddpm_c10_cpu_ft"


def test_shipped_noise_configs_load_with_reference_settings():
    from tests.conftest import REPO
    from uedist.app.stages import get_stage
    from uedist.engine.attacks.sem_rem import SEMConfig

    files = sorted(f for d in ("sem", "rem", "em") for f in (REPO / "configs" / d).glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = load_config(get_stage(f.parent.name, "attack").schema, f)
        assert cfg.method == f.parent.name
    c = load_config(SEMConfig, REPO / "configs/sem/cifar10.yaml")
    assert (
        c.budget,
        c.noise_steps,
        c.noise_step_size,
        c.adv_eps,
        c.adv_steps,
        c.adv_step_size,
        c.eot_samples,
        c.steps,
    ) == (8, 10, 1.6, 4, 10, 0.8, 5, 5000)
    i = load_config(SEMConfig, REPO / "configs/rem/imagenet100.yaml")
    assert (i.noise_steps, i.noise_step_size, i.adv_steps, i.adv_step_size, i.eot_samples, i.steps) == (
        7,
        2,
        7,
        1,
        4,
        3000,
    )


def test_shipped_attack_configs_load_with_reference_settings():
    """Every attack the engine registers ships configs/<method>/ with at least the reference (cifar10) and demo
    configs, each loading in the stage's own schema; then the reference settings, per method."""
    from tests.conftest import REPO
    from uedist.app.stages import get_stage, load_stages
    from uedist.registry import STAGES, stages_of

    load_stages()
    shipped = [a for a in stages_of("attack") if STAGES.get(a).fn.__module__.startswith("uedist.")]  # not plugins
    assert {"sem", "rem", "em", "random", "tap", "sep", "ntga", "lsp", "ar", "ops"} <= set(shipped)
    for attack in shipped:
        schema = get_stage(attack, "attack").schema
        files = {f.stem: f for f in (REPO / "configs" / attack).glob("*.yaml")}
        assert {"cifar10", "demo"} <= set(files), attack
        for f in files.values():
            assert load_config(schema, f).method == attack, f
    assert "imagenet100" not in {f.stem for f in (REPO / "configs/ar").glob("*.yaml")}  # AR: refused above 128 px
    ref = {a: load_config(get_stage(a, "attack").schema, REPO / f"configs/{a}/cifar10.yaml") for a in shipped}
    assert (ref["tap"].budget, ref["tap"].steps, ref["tap"].tau, ref["tap"].restarts, ref["tap"].shift) == (
        8,
        250,
        0.05,
        8,
        1,
    )
    s = ref["sep"]
    assert (s.budget, s.step_size, s.steps, s.vr_steps, s.num_models) == (8, 1, 30, 15, 15)
    n = ref["ntga"]
    assert (n.rule, n.arch, n.stride, n.standardize) == ("reference", "cnn", 2, False)
    assert (n.budget, n.steps, n.t, n.diag_reg, n.final_batch_size, n.w_std2, n.b_std2) == (
        8,
        10,
        64,
        1e-4,
        512,
        1.76,
        0.18,
    )
    lsp, ar, ops = ref["lsp"], ref["ar"], ref["ops"]
    assert (lsp.l2, lsp.patch_size, lsp.class_sep, ar.l2, ar.crop, ops.pixels) == (1.0, 8, 10.0, 1.0, 4, 1)
    want = {"tap": "ℓ∞ 8/255", "sep": "ℓ∞ 8/255", "ntga": "ℓ∞ 8/255", "lsp": "ℓ2 1", "ar": "ℓ2 1", "ops": "ℓ0 1 px"}
    from uedist.ops.budget import Budget

    got = {a: str(Budget(*STAGES.get(a).budget_of(ref[a]))) for a in want}
    assert got == want  # each reference config's declared budget
    with pytest.raises(ConfigError, match="budget"):
        load_config(get_stage("tap", "attack").schema, REPO / "configs/tap/cifar10.yaml", ["budget=2.5"])
    with pytest.raises(ConfigError, match="poison_ratio"):
        load_config(get_stage("lsp", "attack").schema, REPO / "configs/lsp/cifar10.yaml", ["poison_ratio=1.5"])
    with pytest.raises(ConfigError):
        load_config(get_stage("lsp", "attack").schema, REPO / "configs/lsp/cifar10.yaml", ["l2_budget=4"])  # a typo


@pytest.mark.slow
def test_shipped_study_configs_expand():
    """Every configs/pipeline/*.yaml loads and expands: each stage's own config resolves in its own schema."""
    from tests.conftest import REPO
    from uedist.app.pipeline import Study, StudyConfig

    files = sorted((REPO / "configs" / "pipeline").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        study = Study(load_config(StudyConfig, f))
        victims = [s for s in study.stages if s.kind == "victim"]
        assert victims and all(s.cfg.data.test for s in victims), f


# ---- one job schema base: the run fields are declared once, and no shipped config's identity moved --------------


def _stage_schemas():
    from uedist.app.stages import load_stages
    from uedist.registry import STAGES

    load_stages()
    schemas = {STAGES.get(n).schema for n in STAGES.names()}  # uedist's own (plugins, e.g. the tests' toys, aside)
    return sorted((c for c in schemas if c.__module__.startswith("uedist.")), key=lambda c: c.__qualname__)


def test_every_stage_schema_extends_the_job_base_and_declares_no_run_field_again():
    """Every stage's schema is a :class:`uedist.config.JobConfig`; a run field (name, run_root, progress, seed,
    resume, bf16, channels_last, ckpt_every, log_every, log_with) is declared in uedist.config, and a schema (or a
    base of it outside uedist.config) redeclares one only to change its default."""
    import dataclasses
    import inspect

    import uedist.config as C

    bases = (C.JobConfig, C.Seeded, C.Resumable, C.BF16, C.Precision, C.Cadence)
    run = {f.name: f for b in bases for f in dataclasses.fields(b)}
    assert set(run) == {
        *("name", "run_root", "progress", "seed", "resume", "bf16", "channels_last"),
        *("ckpt_every", "log_every", "log_with"),
    }

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    schemas = _stage_schemas()
    names = {c.__name__ for c in schemas}
    assert {"AttackConfig", "SurrogateConfig", "PurifyConfig", "DVAEConfig", "JCDPConfig", "DDPMConfig"} <= {
        b.__name__ for c in schemas for b in c.__mro__
    }
    assert "VictimConfig" in names
    for schema in schemas:
        assert issubclass(schema, C.JobConfig), schema
        for cls in schema.__mro__:
            if cls.__module__ == C.__name__ or not dataclasses.is_dataclass(cls):
                continue
            own = {f.name: f for f in dataclasses.fields(cls)}
            for name in set(inspect.get_annotations(cls)) & set(run):  # the fields cls itself declares
                base = next(b for b in cls.__mro__[1:] if name in getattr(b, "__dataclass_fields__", {}))
                was = base.__dataclass_fields__[name]
                assert default(own[name]) != default(was), f"{cls.__qualname__}.{name} redeclares {base.__name__}'s"
                assert own[name].metadata == was.metadata, f"{cls.__qualname__}.{name}: runtime / location kept"


def test_schemas_offer_only_the_run_fields_they_had():
    """No schema gained a run field by the move to the shared bases: a seed is part of identity (PurifyConfig has
    none), and a field a stage does not honour would do nothing (JCDP: no resume or channels_last)."""
    import dataclasses

    from uedist.engine.purifiers.baselines import PurifyConfig
    from uedist.engine.purifiers.jcdp import JCDPConfig
    from uedist.engine.train.ddpm import DDPMConfig

    def names(c):
        return {f.name for f in dataclasses.fields(c)}

    assert not {"seed", "resume", "bf16", "channels_last", "ckpt_every", "log_every", "log_with"} & names(PurifyConfig)
    assert not {"resume", "channels_last", "ckpt_every", "log_every", "log_with"} & names(JCDPConfig)
    assert "channels_last" not in names(DDPMConfig)
    d = DDPMConfig()
    assert (d.ckpt_every, d.log_every, d.bf16) == (5000, 100, False)


def _committed_digests():
    import json

    from tests.conftest import REPO

    return json.loads((REPO / "tests" / "scripts" / "config_digests.json").read_text())


def test_shipped_stage_config_identities_unchanged():
    """identity() of every shipped configs/<stage>/*.yaml (and of every stage's defaults) is what it was at commit
    53a109b (tests/scripts/config_digests.json): it names checkpoints and finished studies' stage folders."""
    from tests.scripts.config_digests import stage_digests

    want, got = _committed_digests()["stage"], stage_digests()
    assert len(want) >= 90
    assert not set(want) - set(got), "shipped configs gone"
    assert {k: got[k] for k in want if got[k] != want[k]} == {}


@pytest.mark.slow
def test_shipped_study_stage_configs_unchanged():
    """Every configs/pipeline/*.yaml expands to stage configs of the identity they had at commit 53a109b (less the
    keys naming an upstream stage's folder: tests/scripts/config_digests.py)."""
    from tests.scripts.config_digests import study_digests

    want, got = _committed_digests()["study"], study_digests()
    assert len(want) >= 20 and not set(want) - set(got)
    assert {k: got[k] for k in want if got[k] != want[k]} == {}


@pytest.mark.parametrize("method", ["sem", "rem", "em", "random"])
def test_old_eps_key_is_refused_with_its_new_name(method, tmp_path):
    from uedist.app.stages import get_stage

    schema = get_stage(method, "attack").schema
    f = tmp_path / "old.yaml"
    f.write_text(f"method: {method}\neps: 8\n")
    for path, over in ((f, []), (None, ["eps=8"])):
        with pytest.raises(ConfigError, match="'eps' is now 'budget'"):
            load_config(schema, path, over)
    assert load_config(schema, None, ["budget=4"]).budget == 4


@pytest.mark.slow
def test_launch_script_refuses_old_eps_key(tmp_path):
    """launch/sem.py with an old config (``eps: 8``) exits 2 before any work, naming the new key."""
    import subprocess
    import sys

    from tests.conftest import REPO

    f = tmp_path / "old.yaml"
    f.write_text("base: " + str(REPO / "configs/sem/demo.yaml") + "\neps: 8\n")
    r = subprocess.run(
        [sys.executable, str(REPO / "launch/sem.py"), "--config", str(f), f"run_root={tmp_path / 'runs'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "'eps' is now 'budget'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


# ---- Reliability II: values that used to end in a traceback or a silent change ---------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batch_size=" + "[" * 3000 + "]" * 3000, "nested"),
        ("seed=" + str(10**30), "seed"),
        ("seed=4294967296", "at most 4294967295"),
        ("steps=" + str(2**60), "at most"),
    ],
    ids=["nested-list", "huge-seed", "seed-over-32-bit", "huge-int"],
)
def test_hostile_values_are_config_errors(override, message):
    from uedist.engine.attacks.sem_rem import SEMConfig

    with pytest.raises(ConfigError, match=message):
        load_config(SEMConfig, None, [override])


def test_a_deeply_nested_yaml_file_is_a_config_error(tmp_path):
    from uedist.engine.attacks.sem_rem import SEMConfig

    f = tmp_path / "deep.yaml"
    f.write_text("steps: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        load_config(SEMConfig, f)


@pytest.mark.parametrize(
    "name, message", [("a" * 300, "at most 255 bytes"), ("two\nlines", "control characters"), ("tab\there", "control")]
)
def test_run_names_that_no_file_system_or_log_keeps_are_refused(name, message):
    from uedist.config import run_dir

    with pytest.raises(ConfigError, match=message):
        run_dir("runs", name)
