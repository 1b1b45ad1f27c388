import pytest

from uedist.registry import MODELS, SOURCES, Registry, RegistryError


def test_register_build_and_errors():
    r = Registry("widget")

    @r.register("alpha")
    def alpha(x=1):
        return ("alpha", x)

    assert r.build("alpha", x=3) == ("alpha", 3) and "alpha" in r and r.names() == ["alpha"]
    with pytest.raises(RegistryError, match="already registered"):
        r.register("alpha")(lambda: None)
    with pytest.raises(RegistryError) as e:
        r.get("alpah")
    assert "did you mean 'alpha'" in str(e.value) and "known widgets: alpha" in str(e.value)


def test_sources_registered():
    import uedist.data.sources  # noqa: F401

    assert {"imagenet", "facescrub", "cifar", "folder", "synthetic", "synthetic_shapes"} <= set(SOURCES.names())
    assert isinstance(MODELS, Registry)
