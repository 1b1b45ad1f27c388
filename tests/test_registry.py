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
    import uedist.models  # noqa: F401

    # every victim / surrogate architecture the seed papers' tables use is buildable by name
    assert {"resnet18", "resnet50", "wrn34_10", "densenet121", "vgg16", "mobilenetv2"} <= set(MODELS.names())
