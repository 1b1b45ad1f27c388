"""Oxford-IIIT Pets (37 cat and dog breeds) as published: ``images.tar.gz`` and ``annotations.tar.gz`` unpacked
side by side into ``root``.

Layout: ``root/images/<Breed_name>_<n>.jpg`` and ``root/annotations/{trainval,test}.txt``, one image per line:
``<image name> <class id 1..37> <species 1 cat, 2 dog> <breed id within the species>``, e.g.
``Abyssinian_100 1 1 1``; lines starting with ``#`` are comments. Split ``train`` = trainval.txt (3,680 images),
``test`` = test.txt (3,669). Label = class id - 1; classes = the breed names (an image name without its trailing
``_<n>``) of every class id named in either file, in class id order, so both splits share one class list even
when a split lacks a class. The ids named must run 1..K without a gap (K = 37 for the full set). Canonical size
224×224: shorter side to 224, centre crop (``pets.size=[256,256]`` for a random-resized-crop pipeline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from uedist.config import require
from uedist.data.images import ResizeMode
from uedist.data.sources.base import Item, Source, SourceError
from uedist.registry import SOURCES

PETS_NUM_CLASSES = 37
PETS_SPLITS = {"train": "trainval.txt", "test": "test.txt"}
SPECIES = {1: "cat", 2: "dog"}
_NAME = re.compile(r"(?P<breed>[^/\\]+)_(?P<n>[0-9]+)")


@dataclass
class PetsConfig:
    root: str = ""  # holds images/ and annotations/
    size: Tuple[int, int] = (224, 224)  # canonical (height, width)
    resize_mode: ResizeMode = "center_crop"

    def validate(self) -> None:
        require(self.size[0] > 0 and self.size[1] > 0, f"size must be positive, got {self.size}")


@dataclass(frozen=True)
class PetsRow:
    image: str  # file name without .jpg
    breed: str
    class_id: int  # 1..37
    species: int  # 1 cat, 2 dog
    where: str  # "<file>:<line>", for error messages


def _parse_line(text: str, where: str) -> PetsRow:
    parts = text.split()
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts[1:]):
        raise SourceError(f"{where}: expected '<image> <class id> <species> <breed id>', got {text.strip()!r}")
    image = parts[0]
    m = _NAME.fullmatch(image)
    if ".." in image or image.startswith(".") or m is None:
        raise SourceError(f"{where}: image name {image!r} is not '<breed>_<number>' inside images/")
    class_id, species = int(parts[1]), int(parts[2])
    if not 1 <= class_id <= PETS_NUM_CLASSES:
        raise SourceError(f"{where}: class id {class_id} outside 1..{PETS_NUM_CLASSES}")
    if species not in SPECIES:
        raise SourceError(f"{where}: species {species} is neither 1 (cat) nor 2 (dog)")
    return PetsRow(image, m["breed"], class_id, species, where)


def read_pets_list(path: Path) -> List[PetsRow]:
    """An official annotation list (trainval.txt / test.txt) -> its rows in file order. Errors name file and line."""
    if not path.is_file():
        raise SourceError(f"pets: annotation file not found: {path}")
    rows: List[PetsRow] = []
    seen: Dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        row = _parse_line(line, f"{path}:{i}")
        if row.image in seen:
            raise SourceError(f"{row.where}: {row.image} is listed twice (first at {seen[row.image]})")
        seen[row.image] = row.where
        rows.append(row)
    return rows


def pets_classes(rows: List[PetsRow]) -> Tuple[List[str], List[str]]:
    """(breed names, species names) indexed by class id - 1, from the rows of both lists.

    Every class id must always carry the same breed and species, and every breed the same id; the ids named
    must run 1..K, so that label = class id - 1 keeps the official meaning.
    """
    by_id: Dict[int, PetsRow] = {}
    by_breed: Dict[str, PetsRow] = {}
    for r in rows:
        first = by_id.setdefault(r.class_id, r)
        if (first.breed, first.species) != (r.breed, r.species):
            raise SourceError(
                f"{r.where}: class id {r.class_id} is {r.breed!r} ({SPECIES[r.species]}) here but "
                f"{first.breed!r} ({SPECIES[first.species]}) at {first.where}"
            )
        other = by_breed.setdefault(r.breed, r)
        if other.class_id != r.class_id:
            raise SourceError(
                f"{r.where}: breed {r.breed!r} has class id {r.class_id} here but {other.class_id} at {other.where}"
            )
    if not by_id:
        raise SourceError("pets: trainval.txt and test.txt list no images")
    gaps = [i for i in range(1, max(by_id) + 1) if i not in by_id]
    if gaps:
        raise SourceError(
            f"pets: class id(s) {gaps} named in no annotation file; the ids named must run 1..K (label = class id - 1)"
        )
    ids = sorted(by_id)
    return [by_id[i].breed for i in ids], [SPECIES[by_id[i].species] for i in ids]


class PetsSource(Source):
    name = "pets"
    default_encoding = "jpg"

    def __init__(self, cfg: PetsConfig, split: str) -> None:
        if not cfg.root:
            raise SourceError("pets: no root folder configured (pets.root=...)")
        if split not in PETS_SPLITS:
            raise SourceError(f"pets: unknown split {split!r}; choose {' or '.join(PETS_SPLITS)}")
        self.root = Path(cfg.root).expanduser()
        self.cfg, self.split = cfg, split
        self.image_size, self.resize_mode = tuple(cfg.size), cfg.resize_mode
        lists = {s: read_pets_list(self.root / "annotations" / f) for s, f in PETS_SPLITS.items()}
        both = {r.image for r in lists["train"]} & {r.image for r in lists["test"]}
        if both:
            raise SourceError(
                f"{self.root / 'annotations'}: {len(both)} image(s) listed in both trainval.txt and test.txt, "
                f"e.g. {sorted(both)[:3]}"
            )
        self.rows = lists[split]
        self.classes, self.species = pets_classes(lists["train"] + lists["test"])

    def items(self) -> List[Item]:
        items: List[Item] = []
        for r in self.rows:
            ref = f"images/{r.image}.jpg"
            if not (self.root / ref).is_file():
                raise SourceError(f"{r.where}: lists {r.image}, but {self.root / ref} is missing")
            items.append(Item(ref, r.class_id - 1))
        return items

    def describe(self) -> Dict[str, object]:
        return {"annotations": f"annotations/{PETS_SPLITS[self.split]}", "class_species": self.species}


@SOURCES.register("pets")
def build_pets_source(cfg: PetsConfig, split: str) -> PetsSource:
    return PetsSource(cfg, split)
