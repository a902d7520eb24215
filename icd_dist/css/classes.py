"""Class names of the supported datasets and each dataset's raw-id -> CSS-id mapping.

In every dataset the CSS id 0 is background (the pixels of classes not learned yet) and
255 is ignored. VOC and ADE20K label files already use these ids; CamVid's files use
0..10 for its classes and 11 for void, which the project maps to k+1 and 255.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from icd_dist.config import DATASETS as DATASET_NAMES
from icd_dist.config import ConfigError

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# objectInfo150 order (the first name of each entry); id 0 is the unlabelled "other" pixels,
# which the CSS protocol (PLOP, RCIL) treats as a scored background class.
ADE20K_CLASSES: tuple[str, ...] = (
    "background",
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

CAMVID_CLASSES: tuple[str, ...] = (
    "background", "sky", "building", "pole", "road", "pavement", "tree", "signsymbol",
    "fence", "car", "pedestrian", "bicyclist",
)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's CSS class names and how its label files' raw ids become CSS ids."""

    name: str
    class_names: tuple[str, ...]
    # raw id -> CSS id for every uint8 value; -1 marks a raw id the dataset never uses.
    raw_to_css: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        """Number of CSS classes, background included."""
        return len(self.class_names)

    def raw_lut(self) -> np.ndarray:
        """The raw -> CSS lookup table as an int16 array of 256 entries (-1 = invalid id)."""
        return np.asarray(self.raw_to_css, dtype=np.int16)

    def to_css_ids(self, raw: np.ndarray, source: str = "label map") -> np.ndarray:
        """Map a raw uint8 label map to CSS ids (uint8); raises ValueError naming `source`
        and the offending values when it holds ids the dataset does not define."""
        mapped = self.raw_lut()[np.asarray(raw, dtype=np.uint8)]
        if (mapped < 0).any():
            bad = sorted(int(v) for v in np.unique(np.asarray(raw)[mapped < 0]))
            raise ValueError(
                f"{source}: label ids {bad} are not valid for dataset {self.name!r} "
                f"(valid: 0..{self._max_raw_id()} and 255)"
            )
        return mapped.astype(np.uint8)

    def _max_raw_id(self) -> int:
        return max(i for i, v in enumerate(self.raw_to_css) if v >= 0 and i != IGNORE_INDEX)


def _identity_lut(num_classes: int) -> tuple[int, ...]:
    lut = [-1] * 256
    for i in range(num_classes):
        lut[i] = i
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return tuple(lut)


def _camvid_lut() -> tuple[int, ...]:
    lut = [-1] * 256
    for k in range(11):
        lut[k] = k + 1
    lut[11] = IGNORE_INDEX  # void
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return tuple(lut)


_SPECS = {
    "voc": (VOC_CLASSES, _identity_lut(len(VOC_CLASSES))),
    "ade20k": (ADE20K_CLASSES, _identity_lut(len(ADE20K_CLASSES))),
    "camvid": (CAMVID_CLASSES, _camvid_lut()),
}
# config.DATASETS names them (once); here each one's classes and label table.
DATASETS: dict[str, DatasetSpec] = {name: DatasetSpec(name, *_SPECS[name])
                                    for name in DATASET_NAMES}


def generic_spec(name: str, num_classes: int,
                 class_names: tuple[str, ...] | None = None) -> DatasetSpec:
    """A dataset whose label files already hold CSS ids 0..num_classes-1 (and 255): the
    synthetic data and user-supplied pairs. Names default to background, class_1, ..."""
    if not 2 <= num_classes <= 255:
        raise ConfigError("num_classes", f"must be in 2..255 (background included), got "
                          f"{num_classes}")
    names = class_names or ("background", *(f"class_{i}" for i in range(1, num_classes)))
    if len(names) != num_classes:
        raise ConfigError("class_names", f"{len(names)} names for {num_classes} classes")
    return DatasetSpec(name, tuple(names), _identity_lut(num_classes))


def get_dataset(name: str) -> DatasetSpec:
    """The DatasetSpec registered under `name`; raises ConfigError listing the known names."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            "data.dataset", f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}"
        ) from None


def format_class_ids(ids: Iterable[int]) -> str:
    """Class ids for a console line: [4] -> '4', [0, 1, 2, 3] -> '0..3', [1, 3, 7] -> '1,3,7'."""
    ids = [int(i) for i in ids]
    if len(ids) == 1:
        return str(ids[0])
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}..{ids[-1]}"
    return ",".join(str(i) for i in ids)
