"""The baseline purifiers (ISS: grayscale, JPEG, bit depth; mean / median / Gaussian filters) as shard map passes:
exactly the op applied to every sample, keys/labels/provenance kept, PSNR against the clean set, bad input, a
crash mid-pass resumed to the same bytes, the launcher, and the registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import uedist.engine.purifiers.baselines as purify
import uedist.engine.purifiers.dvae  # noqa: F401  (registers "dvae")
from tests.conftest import REPO
from uedist.config import load_config
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.dist import make_accelerator
from uedist.engine.purifiers.baselines import BASELINES, PurifyConfig, PurifyInputError, baseline_op
from uedist.ops.images import to_uint8, to_unit
from uedist.registry import STAGES


def _cfg(synth_sets, tmp_path, *overrides):
    return load_config(
        PurifyConfig,
        None,
        [
            f"data.src={synth_sets / 'train'}",
            f"run_root={tmp_path}",
            "data.workers=0",
            "data.batch_size=40",
            "progress=false",
            *overrides,
        ],
    )


def _images(folder):
    m = load_manifest(folder)
    return [(s.key, s.label, decode_image(s.data, s.ext, m.image_size)) for s in iter_samples(folder)]


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}


def test_registry_holds_every_purifier():
    assert set(BASELINES) | {"dvae"} <= set(STAGES.names())
    with pytest.raises(KeyError, match="unknown stage 'jpg'; did you mean 'jpeg'"):
        STAGES.get("jpg")


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_is_its_op_on_every_sample(synth_sets, tmp_path, method):
    cfg = _cfg(synth_sets, tmp_path, f"method={method}", f"name={method}", f"data.clean={synth_sets / 'train'}")
    s = STAGES.build(method, cfg, make_accelerator(), tmp_path / method)
    out = tmp_path / method / "purified"
    assert verify_shard_set(out).ok
    m = load_manifest(out)
    assert m.encoding == "png" and m.provenance["stage"] == f"purify:{method}"
    assert m.extra["purify"]["method"] == method
    src, res = _images(synth_sets / "train"), _images(out)
    assert [(k, y) for k, y, _ in src] == [(k, y) for k, y, _ in res]
    x = torch.from_numpy(np.stack([a for _, _, a in src])).permute(0, 3, 1, 2)
    want = to_uint8(baseline_op(cfg)(to_unit(x))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([a for _, _, a in res]), want)
    assert s["psnr_input_vs_clean"] == 100.0 and 5 < s["psnr_output_vs_clean"] < 100  # clean in, changed out
    assert json.loads((tmp_path / method / "metrics.json").read_text())["purified"] == str(out)
    assert (tmp_path / method / "grid.png").is_file()


def test_grayscale_and_bit_depth_do_what_they_say(synth_sets, tmp_path):
    acc = make_accelerator()
    STAGES.build("grayscale", _cfg(synth_sets, tmp_path, "method=grayscale", "name=g"), acc, tmp_path / "g")
    STAGES.build("bit_depth", _cfg(synth_sets, tmp_path, "method=bit_depth", "bits=2", "name=b"), acc, tmp_path / "b")
    g = np.stack([a for *_, a in _images(tmp_path / "g" / "purified")]).astype(int)
    assert (np.abs(g - g[..., :1]) == 0).all()  # one channel replicated
    b = np.unique(np.stack([a for *_, a in _images(tmp_path / "b" / "purified")]))
    assert set(b.tolist()) <= {0, 85, 170, 255}  # 2 bits: 4 levels


def test_input_that_differs_from_the_config_is_a_clear_error(synth_sets, tmp_path):
    acc = make_accelerator()
    with pytest.raises(PurifyInputError, match=r"classes 4 \(config expects 10\)"):
        STAGES.build("jpeg", _cfg(synth_sets, tmp_path, "data.num_classes=10"), acc, tmp_path / "x")
    with pytest.raises(PurifyInputError, match=r"image size 16 \(config expects 32\)"):
        STAGES.build("jpeg", _cfg(synth_sets, tmp_path, "data.image_size=32"), acc, tmp_path / "x")
    with pytest.raises(PurifyInputError, match="not sharded like"):
        STAGES.build("jpeg", _cfg(synth_sets, tmp_path, f"data.clean={synth_sets / 'test'}"), acc, tmp_path / "x")
    assert not (tmp_path / "x" / "purified").exists()


def test_crash_mid_pass_resumes_to_the_same_bytes(synth_sets, tmp_path, monkeypatch, caplog):
    acc = make_accelerator()
    STAGES.build("median", _cfg(synth_sets, tmp_path, "method=median", "name=ref"), acc, tmp_path / "ref")
    real, calls = baseline_op, []

    def crashing(cfg):
        op = real(cfg)

        def f(x):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated crash")
            return op(x)

        return f

    monkeypatch.setattr(purify, "baseline_op", crashing)
    cfg = _cfg(synth_sets, tmp_path, "method=median", "name=crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        STAGES.build("median", cfg, acc, tmp_path / "crash")
    out = tmp_path / "crash" / "purified"
    assert not (out / "manifest.json").exists() and len(list((out / "_progress").glob("shard-*.json"))) == 2
    monkeypatch.setattr(purify, "baseline_op", real)
    with caplog.at_level("INFO"):
        STAGES.build("median", cfg, acc, tmp_path / "crash")
    assert "2 of its 6 shards already written" in caplog.text
    assert verify_shard_set(out).ok and _shards(out) == _shards(tmp_path / "ref" / "purified")


def test_launcher(synth_sets, tmp_path, capsys):
    from uedist.app.jobs import run_stage_main  # what launch/purify.py runs

    def main(argv):
        return run_stage_main("purify", argv)

    args = [f"data.src={synth_sets / 'train'}", f"run_root={tmp_path}", "name=j", "data.workers=0", "progress=false"]
    assert main(["--config", str(REPO / "configs/purify/jpeg10.yaml"), *args]) == 0
    assert "jpeg {'quality': 10}: 240 images" in capsys.readouterr().out
    assert main(["--config", str(REPO / "configs/purify/jpeg10.yaml"), *args, "name=k", "data.num_classes=3"]) == 2
    assert (tmp_path / "j" / "config.yaml").is_file() and verify_shard_set(tmp_path / "j" / "purified").ok


def test_noise_view_and_one_sample_per_class(synth_sets, tmp_path):
    """The papers' noise figure: a − b stretched to the full range per image (mid-grey if all equal), and one
    sample of each class read from every set at the same positions."""
    from uedist.engine.purifiers.common import noise_view, read_one_per_class

    a = np.full((2, 4, 4, 3), 100, np.uint8)
    b = a.copy()
    a[0, 0, 0, 0], a[0, 1, 1, 1] = 108, 96
    v = noise_view(a, b)
    assert (v[0, 0, 0, 0], v[0, 1, 1, 1], v[0, 2, 2, 2]) == (255, 0, 85) and (v[1] == 128).all()  # -4..8 -> 0..255
    train = synth_sets / "train"
    cols = read_one_per_class([("clean", train), ("again", train)], 3)
    assert [t for t, _ in cols] == ["clean", "again"] and (cols[0][1] == cols[1][1]).all()
    m = load_manifest(train)
    first = {}
    for s in iter_samples(train):  # shard 0 first; its 40 samples hold every class
        first.setdefault(s.label, decode_image(s.data, s.ext, m.image_size))
        if len(first) == 3:
            break
    assert np.array_equal(cols[0][1], np.stack(list(first.values())))
