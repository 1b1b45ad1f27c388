"""Sources on small generated trees: ImageNet-100 indices, Facescrub protocol, CIFAR batches, bad input."""

import pickle

import numpy as np
import pytest

from tests.conftest import build, write_image
from uedist.config import ConfigError, load_config
from uedist.data.build import BuildConfig
from uedist.data.images import CorruptImageError
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples
from uedist.data.sources import SourceError
from uedist.data.sources.imagenet import imagenet_synsets

SYN = imagenet_synsets()


def _imagenet_tree(root, synsets, n=2):
    for s in synsets:
        for i in range(n):
            write_image(root / "train" / s / f"{s}_{i}.JPEG", size=(40, 30), fmt="JPEG")
    return root


def _labels_by_src(folder):
    return {s.extras["src"].decode(): s.label for s in iter_samples(folder)}


def test_imagenet_indices_are_global_synset_indices(tmp_path):
    present = [SYN[3], SYN[57], SYN[99], SYN[100], SYN[500]]  # two beyond the first 100
    root = _imagenet_tree(tmp_path / "in", present)
    out = build(tmp_path / "out", f"imagenet.root={root}", "imagenet.size=[24,24]", "splits=[train]", source="imagenet")
    m = load_manifest(out / "train")
    assert m.dataset == "imagenet100" and m.num_classes == 100 and m.classes[:2] == list(SYN[:2])
    assert m.num_samples == 6 and m.image_size == (24, 24) and m.encoding == "jpg"
    assert m.extra["excluded_synsets"] == 2 and m.extra["excluded_images"] == 4
    for src, label in _labels_by_src(out / "train").items():
        assert SYN[label] == src.split("/")[1]
    assert m.class_counts[3] == m.class_counts[57] == m.class_counts[99] == 2 and sum(m.class_counts) == 6


def test_imagenet_unknown_synset_and_empty_folder(tmp_path):
    root = _imagenet_tree(tmp_path / "in", [SYN[0], "n99999999"])
    with pytest.raises(SourceError, match="n99999999.*not an ImageNet-1k synset"):
        build(tmp_path / "o1", f"imagenet.root={root}", "splits=[train]", source="imagenet")
    build(
        tmp_path / "o2",
        f"imagenet.root={root}",
        "splits=[train]",
        "imagenet.unknown_synsets=skip",
        "imagenet.size=[16,16]",
        source="imagenet",
    )
    (root / "train" / SYN[1]).mkdir()
    with pytest.raises(SourceError, match=f"{SYN[1]} holds no images"):
        build(
            tmp_path / "o3",
            f"imagenet.root={root}",
            "splits=[train]",
            "imagenet.unknown_synsets=skip",
            source="imagenet",
        )


@pytest.mark.parametrize("style", ["plain", "index", "loc_csv"])
def test_imagenet_flat_val_with_label_file(tmp_path, style):
    root = tmp_path / "in"
    wanted = {
        "ILSVRC2012_val_00000001": SYN[5],
        "ILSVRC2012_val_00000002": SYN[42],
        "ILSVRC2012_val_00000003": SYN[700],
    }
    for stem in wanted:
        write_image(root / "val" / f"{stem}.JPEG", fmt="JPEG")
    lab = tmp_path / "labels.txt"
    if style == "plain":
        lab.write_text("".join(f"{k}.JPEG {v}\n" for k, v in wanted.items()))
    elif style == "index":
        lab.write_text("".join(f"{k}.JPEG {SYN.index(v)}\n" for k, v in wanted.items()))
    else:
        lab.write_text("ImageId,PredictionString\n" + "".join(f"{k},{v} 1 2 3 4\n" for k, v in wanted.items()))
    out = build(
        tmp_path / "out",
        f"imagenet.root={root}",
        "splits=[val]",
        f"imagenet.val_labels={lab}",
        "imagenet.size=[16,16]",
        source="imagenet",
    )
    got = {k.split("/")[-1].split(".")[0]: v for k, v in _labels_by_src(out / "val").items()}
    assert got == {"ILSVRC2012_val_00000001": 5, "ILSVRC2012_val_00000002": 42}  # synset 700 is beyond 100


def test_imagenet_flat_val_without_labels_errors(tmp_path):
    write_image(tmp_path / "in" / "val" / "a.JPEG", fmt="JPEG")
    with pytest.raises(SourceError, match="set imagenet.val_labels"):
        build(tmp_path / "o", f"imagenet.root={tmp_path / 'in'}", "splits=[val]", source="imagenet")


def test_corrupt_image_fails_naming_it_or_is_skipped_and_recorded(tmp_path):
    root = _imagenet_tree(tmp_path / "in", [SYN[0], SYN[1]], n=3)
    bad = root / "train" / SYN[1] / "broken.JPEG"
    data = (root / "train" / SYN[1] / f"{SYN[1]}_0.JPEG").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    args = (f"imagenet.root={root}", "splits=[train]", "imagenet.size=[16,16]")
    with pytest.raises(CorruptImageError, match="broken.JPEG.*skip_corrupt=true"):
        build(tmp_path / "o1", *args, source="imagenet")
    out = build(tmp_path / "o2", *args, "skip_corrupt=true", source="imagenet")
    m = load_manifest(out / "train")
    assert m.num_samples == 6 and len(m.skipped) == 1 and m.skipped[0]["ref"].endswith("broken.JPEG")
    assert "cannot decode" in m.skipped[0]["error"]


def test_facescrub_protocol(tmp_path):
    root = tmp_path / "crops"
    counts = {"Bob_B": 10, "Alice_A": 12, "Zed_Z": 4}  # Zed has too few images
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"{i}.jpg", size=(50, 60), fmt="JPEG")
    out = build(
        tmp_path / "o", f"facescrub.root={root}", "facescrub.min_images=5", "facescrub.size=[28,28]", source="facescrub"
    )
    tr, te = load_manifest(out / "train"), load_manifest(out / "test")
    assert tr.classes == te.classes == ["Alice_A", "Bob_B"]
    assert tr.class_counts == [10, 8] and te.class_counts == [2, 2] and tr.image_size == (28, 28)
    train_src, test_src = set(_labels_by_src(out / "train")), set(_labels_by_src(out / "test"))
    assert not train_src & test_src and len(train_src | test_src) == 22
    assert tr.extra["identities_dropped"] == {"Zed_Z": 4}
    # the split of one identity does not depend on the others
    for i in range(6):
        write_image(root / "New_N" / f"{i}.jpg", fmt="JPEG")
    out2 = build(
        tmp_path / "o2",
        f"facescrub.root={root}",
        "facescrub.min_images=5",
        "facescrub.size=[28,28]",
        source="facescrub",
    )
    assert {s for s in _labels_by_src(out2 / "test") if not s.startswith("New_N")} == test_src
    with pytest.raises(SourceError, match="3 identities.*expects 6"):
        build(
            tmp_path / "o3",
            f"facescrub.root={root}",
            "facescrub.min_images=5",
            "facescrub.num_classes=6",
            source="facescrub",
        )
    with pytest.raises(ConfigError, match="train_fraction"):
        load_config(BuildConfig, None, ["facescrub.train_fraction=1.5"])


def test_facescrub_subset_protocol(tmp_path):
    """The SEM paper's Table 8 protocol, k identities x n images, 85/15: a seeded choice recorded in the manifest."""
    root = tmp_path / "crops"
    counts = {"A_a": 9, "B_b": 8, "C_c": 12, "D_d": 5}  # D_d has fewer than n = 6 images
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"{i}.jpg", size=(30, 30), fmt="JPEG")
    args = [f"facescrub.root={root}", "facescrub.min_images=2", "facescrub.size=[16,16]"]
    proto = ["facescrub.identities=2", "facescrub.images_per_identity=6", "facescrub.train_fraction=0.5"]
    out = build(tmp_path / "o", *args, *proto, source="facescrub")
    tr, te = load_manifest(out / "train"), load_manifest(out / "test")
    assert len(tr.classes) == 2 and set(tr.classes) < {"A_a", "B_b", "C_c"} and tr.classes == te.classes
    assert tr.class_counts == [3, 3] and te.class_counts == [3, 3]
    assert tr.extra["identities_dropped"] == {"D_d": 5}
    assert set(tr.extra["identities_not_chosen"]) | set(tr.classes) == {"A_a", "B_b", "C_c"}
    assert tr.extra["protocol"]["identities"] == 2 and tr.extra["protocol"]["images_per_identity"] == 6
    # the n images of an identity are the first n of its split permutation: the same set whatever k is
    out_all = build(
        tmp_path / "o2", *args, "facescrub.images_per_identity=6", "facescrub.train_fraction=0.5", source="facescrub"
    )
    assert load_manifest(out_all / "train").classes == ["A_a", "B_b", "C_c"]
    picked = set(_labels_by_src(out / "train")) | set(_labels_by_src(out / "test"))
    every = set(_labels_by_src(out_all / "train")) | set(_labels_by_src(out_all / "test"))
    assert picked <= every and len(every) == 18
    with pytest.raises(SourceError, match="3 identities with >= 6 images, the protocol asks for 4"):
        build(tmp_path / "o3", *args, "facescrub.identities=4", "facescrub.images_per_identity=6", source="facescrub")
    with pytest.raises(ConfigError, match="images_per_identity"):
        load_config(BuildConfig, None, ["facescrub.images_per_identity=1"])


def _cifar_batch(path, n, seed, key=b"labels", classes=10):
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"x",
        key: rng.integers(0, classes, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"f%d.png" % i for i in range(n)],
    }
    path.write_bytes(pickle.dumps(d, protocol=2))
    return d


def test_cifar10_python_batches_exact_pixels(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = [_cifar_batch(root / f"data_batch_{i}", 7, i) for i in range(1, 6)]
    _cifar_batch(root / "test_batch", 5, 9)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    out = build(tmp_path / "o", f"cifar.root={root}", source="cifar")
    m = load_manifest(out / "train")
    assert m.dataset == "cifar10" and m.num_samples == 35 and m.encoding == "png" and m.classes[0] == "airplane"
    from uedist.data.images import decode_image

    for s in iter_samples(out / "train"):
        name, row = s.extras["src"].decode().split("#")
        b = batches[int(name[-1]) - 1]
        want = b[b"data"][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)
        assert (decode_image(s.data, s.ext) == want).all() and s.label == b[b"labels"][int(row)]


def test_cifar100_and_malicious_pickle(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _cifar_batch(root / "train", 6, 1, key=b"fine_labels", classes=100)
    _cifar_batch(root / "test", 4, 2, key=b"fine_labels", classes=100)
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}))
    out = build(tmp_path / "o", f"cifar.root={root}", "cifar.variant=cifar100", source="cifar")
    assert load_manifest(out / "test").num_classes == 100

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (root / "train").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(SourceError, match="refusing to load builtins.print"):
        build(tmp_path / "o2", f"cifar.root={root}", "cifar.variant=cifar100", source="cifar")


def test_folder_empty_class_and_wrong_count(tmp_path):
    root = tmp_path / "f"
    for c in ("a", "b"):
        write_image(root / "train" / c / "1.png", fmt="PNG")
    (root / "train" / "c").mkdir()
    args = (f"folder.root={root}", "splits=[train]", "folder.size=[8,8]")
    with pytest.raises(SourceError, match="train/c holds no images"):
        build(tmp_path / "o", *args, source="folder")
    with pytest.raises(SourceError, match="found 3 class folders, the config expects 10"):
        build(tmp_path / "o", *args, "folder.num_classes=10", source="folder")
    build(tmp_path / "o", *args, "folder.allow_empty_classes=true", source="folder")
    assert load_manifest(tmp_path / "o" / "train").class_counts == [1, 1, 0]
