"""Shard sets built from the real sample data beside the checkout verify and load (skipped when it is absent)."""

import pytest

from tests.conftest import build
from uedist.data.loaders import make_map_loader, make_train_loader
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples, verify_shard_set
from uedist.data.sources.imagenet import imagenet_synsets


def test_imagenet_sample_photos_give_100_classes_with_correct_indices(shared_data, tmp_path):
    root = shared_data / "imagenet100_sample"
    out = build(
        tmp_path / "in100",
        f"imagenet.root={root}",
        "splits=[train]",
        "imagenet.size=[64,64]",
        "shard_size=25",
        "workers=2",
        source="imagenet",
    )
    folder = out / "train"
    m = load_manifest(folder)
    assert m.num_samples == 100 and m.num_classes == 100 and m.class_counts == [1] * 100
    assert verify_shard_set(folder, decode=True).ok
    syn = imagenet_synsets()
    for s in iter_samples(folder):
        assert s.extras["src"].decode().split("/")[1] == syn[s.label]  # train/<synset>/file
    assert m.extra["class_names"][0] == "tench"
    batch = next(iter(make_train_loader(folder, batch_size=8, num_steps=1, num_workers=0)))
    assert batch["image"].shape == (8, 3, 64, 64)


def test_imagenet_extra_and_nips_png_folders(shared_data, tmp_path):
    """Photos of other sizes/formats (299 px PNG) land on the same global indices."""
    nips = shared_data / "imagenet100_nips17_ccby"
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "train").symlink_to(nips / "images")
    out = build(
        tmp_path / "o",
        f"imagenet.root={tmp_path / 'tree'}",
        "splits=[train]",
        "imagenet.size=[32,32]",
        source="imagenet",
    )
    import csv

    want = {
        r["file"].split("/", 1)[1]: int(r["imagenet_index"]) for r in csv.DictReader(open(nips / "labels_first100.csv"))
    }
    got = {s.extras["src"].decode().split("/", 1)[1]: s.label for s in iter_samples(out / "train")}
    assert got == want and len(got) == 51


@pytest.mark.slow
def test_facescrub_crops_give_6_identities(shared_data, tmp_path):
    out = build(
        tmp_path / "fs",
        f"facescrub.root={shared_data / 'facescrub_crops6' / 'images'}",
        "facescrub.size=[48,48]",
        "shard_size=200",
        "workers=2",
        source="facescrub",
    )
    tr, te = load_manifest(out / "train"), load_manifest(out / "test")
    assert tr.num_classes == te.num_classes == 6 and tr.classes[0] == "Alec_Baldwin"
    assert tr.num_samples + te.num_samples == 868
    assert abs(tr.num_samples / 868 - 0.8) < 0.02
    assert verify_shard_set(out / "train").ok and verify_shard_set(out / "test").ok
    keys = [k for b in make_map_loader(out / "test", batch_size=32) for k in b["key"]]
    assert len(keys) == len(set(keys)) == te.num_samples


@pytest.mark.slow
def test_cifar10_jpg_folders_give_10_classes(shared_data, tmp_path):
    out = build(tmp_path / "c10", f"cifar.root={shared_data / 'cifar10_jpg'}", "workers=2", source="cifar")
    tr, te = load_manifest(out / "train"), load_manifest(out / "test")
    assert tr.classes[:3] == ["airplane", "automobile", "bird"] and tr.num_classes == 10
    assert tr.num_samples == te.num_samples == 10000 and tr.class_counts == [1000] * 10
    assert tr.encoding == "jpg"  # the source JPEGs are kept byte for byte (no second lossy pass)
    s = next(iter_samples(out / "test"))
    assert s.data == (shared_data / "cifar10_jpg" / s.extras["src"].decode()).read_bytes()
    assert verify_shard_set(out / "test").ok
