"""SVHN (.mat files) and Oxford-IIIT Pets (images/ + annotations/) sources on small trees the tests write."""

import os

import numpy as np
import pytest
import scipy.io

from tests.conftest import build, write_image
from uedist.data.images import decode_image
from uedist.data.manifest import load_manifest
from uedist.data.shards import iter_samples
from uedist.data.sources import SourceError
from uedist.data.sources.pets import PetsConfig
from uedist.data.sources.svhn import SvhnConfig
from uedist.registry import SOURCES

# ------------------------------------------------------------------------------------------------------------ SVHN


def _svhn_mat(path, n, seed, *, labels=None, **override):
    """An official-layout file: X uint8 (32, 32, 3, N), y uint8 (N, 1) in 1..10 with some 10s (digit 0)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels if labels is not None else rng.integers(1, 11, n), dtype=np.uint8).reshape(-1, 1)
    y[0] = 10  # always at least one digit 0
    d = {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": y, **override}
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, d)
    return d


@pytest.fixture
def svhn_root(tmp_path):
    root = tmp_path / "svhn"
    files = {
        "train": _svhn_mat(root / "train_32x32.mat", 13, 1),
        "test": _svhn_mat(root / "test_32x32.mat", 6, 2),
        "extra": _svhn_mat(root / "extra_32x32.mat", 4, 3),
    }
    return root, files


def test_svhn_items_labels_and_pixels(svhn_root):
    root, files = svhn_root
    src = SOURCES.build("svhn", SvhnConfig(root=str(root)), "train")
    assert src.name == "svhn" and src.classes == [str(d) for d in range(10)]
    assert src.image_size == (32, 32) and src.resize_mode == "none" and src.default_encoding == "png"
    items = src.items()
    x, y = files["train"]["X"], files["train"]["y"][:, 0]
    assert [it.ref for it in items] == [f"train_32x32.mat#{i}" for i in range(13)]
    assert [it.label for it in items] == [0 if v == 10 else int(v) for v in y]
    assert items[0].label == 0 and all(0 <= it.label <= 9 for it in items)
    for i, it in enumerate(items):
        px = src.read(it)
        assert px.shape == (32, 32, 3) and px.dtype == np.uint8 and (px == x[..., i]).all()


def test_svhn_cache_follows_a_rewritten_file(svhn_root):
    root, _ = svhn_root
    src = SOURCES.build("svhn", SvhnConfig(root=str(root)), "test")
    assert len(src.items()) == 6
    path = root / "test_32x32.mat"
    d = _svhn_mat(path, 9, 7, labels=[10] * 9)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    items = src.items()
    assert len(items) == 9 and {it.label for it in items} == {0}
    assert (src.read(items[8]) == d["X"][..., 8]).all()


def test_svhn_builds_and_reads_back(svhn_root, tmp_path):
    root, files = svhn_root
    out = build(tmp_path / "out", f"svhn.root={root}", "splits=[train,test,extra]", "shard_size=5", source="svhn")
    for split, n in (("train", 13), ("test", 6), ("extra", 4)):
        m = load_manifest(out / split)
        assert m.dataset == "svhn" and m.split == split and m.num_samples == n
        assert m.num_classes == 10 and m.classes == [str(d) for d in range(10)]
        assert m.image_size == (32, 32) and m.encoding == "png"
        x, y = files[split]["X"], files[split]["y"][:, 0]
        seen = set()
        for s in iter_samples(out / split):
            name, row = s.extras["src"].decode().split("#")
            i = int(row)
            assert name == f"{split}_32x32.mat" and s.label == int(y[i]) % 10
            assert (decode_image(s.data, s.ext, (32, 32)) == x[..., i]).all()
            seen.add(i)
        assert seen == set(range(n))
        assert sum(m.class_counts) == n and m.class_counts[0] == int((y == 10).sum())


def _write_bad(path, case):
    x = np.zeros((32, 32, 3, 4), np.uint8)
    y = np.array([[1], [2], [3], [10]], np.uint8)
    if case == "not_mat":
        path.write_bytes(b"this is not a MATLAB file " * 20)
    elif case == "truncated":
        scipy.io.savemat(path, {"X": x, "y": y})
        path.write_bytes(path.read_bytes()[:300])
    elif case == "empty":
        path.write_bytes(b"")
    else:
        d = {
            "wrong_keys": {"images": x, "labels": y},
            "x_shape": {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": y},
            "x_layout": {"X": np.zeros((4, 32, 32, 3), np.uint8), "y": y},  # samples first: not the official layout
            "x_dtype": {"X": x.astype(np.float32), "y": y},
            "y_shape": {"X": x, "y": y[:3]},
            "y_fraction": {"X": x, "y": y.astype(np.float64) + 0.5},
            "label_0": {"X": x, "y": np.array([[1], [0], [3], [4]], np.uint8)},
            "label_11": {"X": x, "y": np.array([[1], [2], [11], [4]], np.uint8)},
        }[case]
        scipy.io.savemat(path, d)


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_mat", "not a valid MATLAB .mat file"),
        ("truncated", "not a valid MATLAB .mat file"),
        ("empty", "not a valid MATLAB .mat file"),
        ("wrong_keys", r"no variable X or y \(found: \['images', 'labels'\]\)"),
        ("x_shape", r"X must be uint8 \(32, 32, 3, N\), got uint8 \(28, 28, 3, 4\)"),
        ("x_layout", r"X must be uint8 \(32, 32, 3, N\), got uint8 \(4, 32, 32, 3\)"),
        ("x_dtype", r"X must be uint8 \(32, 32, 3, N\), got float32"),
        ("y_shape", r"y must be \(4, 1\) to match X's 4 samples, got \(3, 1\)"),
        ("y_fraction", "y must hold whole numbers"),
        ("label_0", "label 0 at sample 1 outside 1..10"),
        ("label_11", "label 11 at sample 2 outside 1..10"),
    ],
)
def test_svhn_bad_files_name_the_file(tmp_path, case, message):
    root = tmp_path / "svhn"
    root.mkdir()
    _write_bad(root / "train_32x32.mat", case)
    src = SOURCES.build("svhn", SvhnConfig(root=str(root)), "train")
    with pytest.raises(SourceError, match=message) as e:
        src.items()
    assert "train_32x32.mat" in str(e.value)


def test_svhn_missing_file_split_and_root(tmp_path):
    (tmp_path / "svhn").mkdir()
    _svhn_mat(tmp_path / "svhn" / "train_32x32.mat", 3, 0)
    cfg = SvhnConfig(root=str(tmp_path / "svhn"))
    with pytest.raises(SourceError, match="test_32x32.mat not found in .*svhn"):
        SOURCES.build("svhn", cfg, "test")
    with pytest.raises(SourceError, match="extra_32x32.mat not found"):
        build(tmp_path / "o", f"svhn.root={cfg.root}", "splits=[extra]", source="svhn")
    with pytest.raises(SourceError, match="unknown split 'val'; choose train, test, extra"):
        SOURCES.build("svhn", cfg, "val")
    with pytest.raises(SourceError, match=r"no root folder configured \(svhn.root=...\)"):
        SOURCES.build("svhn", SvhnConfig(), "train")


# ------------------------------------------------------------------------------------------------------------ Pets

BREEDS = [  # the official class ids 1..37 (cats capitalised, dogs lower case, as in the published file names)
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel", "english_setter",
    "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond", "leonberger", "Maine_Coon",
    "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll", "Russian_Blue",
    "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx", "staffordshire_bull_terrier",
    "wheaten_terrier", "yorkshire_terrier",
]  # fmt: skip


def _row(breed_id, n):
    """An annotation line ``<name> <class id> <species> <breed id>`` for breed ``breed_id`` (1-based)."""
    breed = BREEDS[breed_id - 1]
    species = 1 if breed[0].isupper() else 2
    same = [b for b in BREEDS if (b[0].isupper()) == (species == 1)]
    return f"{breed}_{n} {breed_id} {species} {same.index(breed) + 1}"


def _pets_tree(root, train, test):
    """Write ``annotations/{trainval,test}.txt`` from the given lines and a JPEG for every image they list."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for fname, lines in (("trainval.txt", train), ("test.txt", test)):
        head = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", ""]  # comments and a blank line
        (root / "annotations" / fname).write_text("\n".join(head + lines) + "\n")
        for line in lines:
            write_image(root / "images" / f"{line.split()[0]}.jpg", size=(40, 30), fmt="JPEG")
    return root


@pytest.fixture
def pets_root(tmp_path):
    """Every breed once in trainval (Abyssinian twice); test holds only class ids 1, 2 and 5."""
    train = [_row(i, 100) for i in range(1, 38)] + [_row(1, 101)]
    test = [_row(1, 7), _row(2, 7), _row(5, 7), _row(5, 8)]
    return _pets_tree(tmp_path / "pets", train, test)


def test_pets_items_labels_and_classes(pets_root):
    src = SOURCES.build("pets", PetsConfig(root=str(pets_root)), "test")
    assert src.name == "pets" and src.classes == BREEDS and len(src.classes) == 37
    assert src.image_size == (224, 224) and src.resize_mode == "center_crop" and src.default_encoding == "jpg"
    items = src.items()  # the comment lines and the blank line are skipped; file order is kept
    assert [(it.ref, it.label) for it in items] == [
        ("images/Abyssinian_7.jpg", 0),
        ("images/american_bulldog_7.jpg", 1),
        ("images/beagle_7.jpg", 4),
        ("images/beagle_8.jpg", 4),
    ]
    assert src.read(items[0]) == (pets_root / "images" / "Abyssinian_7.jpg").read_bytes()
    assert src.describe()["class_species"][:2] == ["cat", "dog"]
    train = SOURCES.build("pets", PetsConfig(root=str(pets_root)), "train")
    assert train.classes == src.classes and len(train.items()) == 38
    assert [it.label for it in train.items()] == list(range(37)) + [0]


def test_pets_builds_and_reads_back(pets_root, tmp_path):
    out = build(tmp_path / "out", f"pets.root={pets_root}", "pets.size=[24,24]", "shard_size=16", source="pets")
    tr, te = load_manifest(out / "train"), load_manifest(out / "test")
    assert tr.dataset == te.dataset == "pets" and tr.classes == te.classes == BREEDS
    assert tr.num_classes == te.num_classes == 37  # the test split names only 3 breeds, yet shares the class list
    assert tr.image_size == te.image_size == (24, 24) and tr.encoding == "jpg"
    assert tr.num_samples == 38 and tr.class_counts == [2] + [1] * 36
    assert te.num_samples == 4 and te.class_counts == [1, 1, 0, 0, 2] + [0] * 32
    assert te.extra["annotations"] == "annotations/test.txt"
    for folder in (out / "train", out / "test"):
        for s in iter_samples(folder):
            name = s.extras["src"].decode().removeprefix("images/").removesuffix(".jpg")
            assert BREEDS[s.label] == name.rsplit("_", 1)[0]
            assert decode_image(s.data, s.ext, (24, 24)).shape == (24, 24, 3)


@pytest.mark.parametrize(
    "train, message",
    [
        (["Abyssinian_1 1 1"], r"trainval.txt:4: expected '<image> <class id> <species> <breed id>'"),
        (["Abyssinian_1 one 1 1"], r"trainval.txt:4: expected '<image>"),
        (["Abyssinian 1 1 1"], r"trainval.txt:4: image name 'Abyssinian' is not '<breed>_<number>'"),
        (["../Abyssinian_1 1 1 1"], r"image name '../Abyssinian_1' is not '<breed>_<number>' inside images/"),
        (["sub/Abyssinian_1 1 1 1"], r"image name 'sub/Abyssinian_1' is not"),
        (["Abyssinian_1 0 1 1"], r"trainval.txt:4: class id 0 outside 1..37"),
        (["Abyssinian_1 38 1 1"], r"trainval.txt:4: class id 38 outside 1..37"),
        (["Abyssinian_1 1 3 1"], r"species 3 is neither 1 \(cat\) nor 2 \(dog\)"),
        (["Abyssinian_1 1 1 1", "Abyssinian_1 1 1 1"], r"trainval.txt:5: Abyssinian_1 is listed twice"),
        (["Abyssinian_1 1 1 1", "Bengal_1 1 1 6"], r"trainval.txt:5: class id 1 is 'Bengal' \(cat\) here but 'Abys"),
        (["Abyssinian_1 1 1 1", "Abyssinian_2 1 2 1"], r"class id 1 is 'Abyssinian' \(dog\) here"),
        (["Abyssinian_1 1 1 1", "Abyssinian_2 2 1 1"], r"breed 'Abyssinian' has class id 2 here but 1 at .*:4"),
        (["Abyssinian_1 1 1 1", "beagle_1 5 2 4"], r"class id\(s\) \[2, 3, 4\] named in no annotation file"),
        (["Abyssinian_1 1 1 1"], r"1 image\(s\) listed in both trainval.txt and test.txt, e.g. \['Abyssinian_1'\]"),
    ],
)
def test_pets_bad_annotations(tmp_path, train, message):
    test = ["Abyssinian_1 1 1 1"] if "both" in message else ["Abyssinian_9 1 1 1"]
    root = tmp_path / "pets"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "trainval.txt").write_text("# header\n#\n\n" + "\n".join(train) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(test) + "\n")
    with pytest.raises(SourceError, match=message):
        SOURCES.build("pets", PetsConfig(root=str(root)), "test")


def test_pets_missing_files_split_and_root(pets_root, tmp_path):
    cfg = PetsConfig(root=str(pets_root))
    (pets_root / "images" / "beagle_8.jpg").unlink()
    src = SOURCES.build("pets", cfg, "test")
    with pytest.raises(SourceError, match=r"test.txt:7: lists beagle_8, but .*images/beagle_8.jpg is missing"):
        src.items()
    with pytest.raises(SourceError, match="beagle_8.jpg is missing"):
        build(tmp_path / "o", f"pets.root={pets_root}", "splits=[test]", source="pets")
    assert len(SOURCES.build("pets", cfg, "train").items()) == 38  # the train split does not list it
    with pytest.raises(SourceError, match="unknown split 'val'; choose train or test"):
        SOURCES.build("pets", cfg, "val")
    with pytest.raises(SourceError, match=r"no root folder configured \(pets.root=...\)"):
        SOURCES.build("pets", PetsConfig(), "train")
    (pets_root / "annotations" / "test.txt").unlink()
    with pytest.raises(SourceError, match="annotation file not found: .*annotations/test.txt"):
        SOURCES.build("pets", cfg, "train")  # both lists name the classes, so both must be there
    (pets_root / "annotations" / "trainval.txt").write_text("# only comments\n")
    (pets_root / "annotations" / "test.txt").write_text("")
    with pytest.raises(SourceError, match="trainval.txt and test.txt list no images"):
        SOURCES.build("pets", cfg, "train")
