"""The model zoo, registered in ``uedist.registry.MODELS``: resnet18, resnet50, wrn34_10, wrn28_10, densenet121,
vgg16, mobilenetv2 — each with ``num_classes``, ``in_channels``, ``stem`` ("cifar" | "imagenet"), ``width``."""

from uedist.models import densenet, mobilenet, resnet, vgg, wrn  # noqa: F401  (registration)
