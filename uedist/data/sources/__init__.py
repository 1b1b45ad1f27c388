"""Data sources, registered in ``uedist.registry.SOURCES``: imagenet, facescrub, cifar, svhn, pets, folder,
synthetic, synthetic_shapes."""

from uedist.data.sources import cifar, facescrub, folder, imagenet, pets, svhn, synthetic  # noqa: F401  (registration)
from uedist.data.sources.base import Item, Source, SourceError

__all__ = ["Item", "Source", "SourceError"]
