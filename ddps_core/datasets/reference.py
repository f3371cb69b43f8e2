"""The six datasets DDPM-Seg (Baranchuk et al. 2022) distributes, by name (``data.dataset``).

Each entry holds the facts of the reference, ``yandex-research/ddpm-segmentation``:

* ``classes`` and ``palette``: ``src/data_util.py`` (``*_class``, ``*_palette``; FFHQ's
  palette is given there as fractions and turned into bytes by ``int(v * 255)``);
* ``num_classes`` (the reference's ``number_class``, the classifier's output slots),
  ``ignore_index`` (``ignore_label``), ``train_images`` / ``test_images``
  (``training_number`` / ``testing_number``: the reference uses the first N sorted images)
  and ``checkpoint`` (``model_path``): ``experiments/<name>/ddpm.json``;
* the layout: ``datasets/<name>/real/{train,test}/<id>.<png|jpg>`` with ``<id>.npy`` beside
  each image (``src/datasets.py``: the label path is the image path with ``.npy``), no
  ``classes.yaml`` and no unlabelled pool.

``bedroom_28`` is the one whose ignore label is a class id: 29 slots (``background`` and the 28
classes its name counts), class 0 ignored in training and in scoring. Ids are kept as shipped
(docs/datasets.md, "Reference datasets by name").
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REFERENCE_DATASETS", "ReferenceDataset", "reference_dataset"]


@dataclass(frozen=True)
class ReferenceDataset:
    """One DDPM-Seg dataset as the reference ships and configures it."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int
    checkpoint: str  # the DDPM the reference extracts its features with
    train_images: int
    test_images: int

    @property
    def num_classes(self) -> int:
        """K: the classifier's output slots (the ignored class included when it is one)."""
        return len(self.classes)

    @property
    def scored_classes(self) -> int:
        """Classes trained on and scored: K, less the ignored class when it is a class id."""
        return self.num_classes - (1 if self.ignore_index < self.num_classes else 0)


_FFHQ = (
    "background", "head", "head***cheek", "head***chin", "head***ear", "head***ear***helix",
    "head***ear***lobule", "head***eye***bottom lid", "head***eye***eyelashes", "head***eye***iris",
    "head***eye***pupil", "head***eye***sclera", "head***eye***tear duct", "head***eye***top lid",
    "head***eyebrow", "head***forehead", "head***frown", "head***hair", "head***hair***sideburns",
    "head***jaw", "head***moustache", "head***mouth***inferior lip", "head***mouth***oral commissure",
    "head***mouth***superior lip", "head***mouth***teeth", "head***neck", "head***nose",
    "head***nose***ala of nose", "head***nose***bridge", "head***nose***nose tip", "head***nose***nostril",
    "head***philtrum", "head***temple", "head***wrinkles",
)  # fmt: skip
_FFHQ_PALETTE = (
    (255, 255, 255), (112, 130, 107), (218, 243, 81), (61, 119, 252), (215, 237, 192), (95, 201, 83),
    (4, 126, 96), (190, 3, 144), (41, 61, 186), (5, 111, 104), (149, 226, 156), (203, 232, 247),
    (173, 159, 218), (254, 119, 98), (136, 210, 69), (44, 92, 212), (135, 170, 125), (54, 88, 120),
    (174, 31, 37), (98, 118, 25), (58, 10, 77), (146, 139, 250), (33, 245, 19), (72, 47, 66),
    (248, 240, 169), (99, 113, 164), (221, 100, 24), (155, 247, 6), (93, 170, 79), (164, 186, 243),
    (157, 27, 230), (86, 126, 185), (42, 235, 167), (240, 171, 157),
)  # fmt: skip

_BEDROOM = (
    "background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling",
    "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser",
    "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall",
    "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth",
    "door / door frame", "pouf", "wardrobe", "plant", "table staff",
)  # fmt: skip
_BEDROOM_PALETTE = (
    (255, 255, 255), (238, 229, 102), (255, 72, 69), (124, 99, 34), (193, 127, 15), (106, 177, 21),
    (248, 213, 43), (252, 155, 83), (220, 147, 77), (99, 83, 3), (116, 116, 138), (63, 182, 24),
    (200, 226, 37), (225, 184, 161), (233, 5, 219), (142, 172, 248), (153, 112, 146), (38, 112, 254),
    (229, 30, 141), (99, 205, 255), (74, 59, 83), (186, 9, 0), (107, 121, 0), (0, 194, 160),
    (255, 170, 146), (255, 144, 201), (185, 3, 170), (221, 239, 255), (0, 0, 53),
)  # fmt: skip

_CAT = ("background", "back", "belly", "chest", "leg", "paw", "head", "ear", "eye", "mouth", "tongue", "nose",
        "tail", "whiskers", "neck")
_CAT_PALETTE = (
    (255, 255, 255), (190, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (102, 102, 156),
    (152, 251, 152), (119, 11, 32), (244, 35, 232), (220, 20, 60), (52, 83, 84), (194, 87, 125),
    (143, 176, 255), (31, 102, 211), (104, 131, 101),
)  # fmt: skip

_HORSE = ("background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head", "hoof",
          "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder", "leg protection")
_HORSE_PALETTE = (
    (255, 255, 255), (255, 74, 70), (0, 137, 65), (0, 111, 166), (163, 0, 89), (255, 219, 229), (122, 73, 0),
    (0, 0, 166), (99, 255, 172), (183, 151, 98), (0, 77, 67), (143, 176, 255), (241, 38, 110), (27, 210, 105),
    (128, 150, 147), (228, 230, 158), (160, 136, 106), (79, 198, 1), (59, 93, 255), (115, 214, 209),
    (255, 47, 128),
)  # fmt: skip

_CELEBA = ("background", "cloth", "ear_r", "eye_g", "hair", "hat", "l_brow", "l_ear", "l_eye", "l_lip", "mouth",
           "neck", "neck_l", "nose", "r_brow", "r_ear", "r_eye", "skin", "u_lip")
_CELEBA_PALETTE = (
    (255, 255, 255), (238, 229, 102), (250, 150, 50), (124, 99, 34), (193, 127, 15), (225, 96, 18),
    (220, 147, 77), (99, 83, 3), (116, 116, 138), (200, 226, 37), (225, 184, 161), (142, 172, 248),
    (153, 112, 146), (38, 112, 254), (229, 30, 141), (52, 83, 84), (194, 87, 125), (248, 213, 42),
    (31, 102, 211),
)  # fmt: skip

# the first 30 of the reference's 50 ADE bedroom classes (ade_bedroom_50_class[:30])
_ADE_BEDROOM = (
    "wall", "bed", "floor", "table", "lamp", "ceiling", "painting", "windowpane", "pillow", "curtain", "cushion",
    "door", "chair", "cabinet", "chest", "mirror", "rug", "armchair", "book", "sconce", "plant", "wardrobe",
    "clock", "light", "flower", "vase", "fan", "box", "shelf", "television",
)  # fmt: skip
_ADE_BEDROOM_PALETTE = (
    (240, 156, 206), (69, 88, 93), (240, 49, 184), (27, 107, 126), (50, 82, 241), (54, 250, 147), (156, 213, 3),
    (176, 108, 79), (251, 150, 149), (66, 51, 34), (210, 97, 53), (30, 53, 102), (232, 164, 118), (204, 150, 17),
    (101, 86, 178), (249, 20, 213), (54, 35, 82), (157, 68, 216), (58, 161, 73), (174, 67, 67), (193, 181, 78),
    (169, 60, 178), (220, 204, 166), (4, 127, 85), (245, 106, 216), (222, 172, 168), (84, 148, 105),
    (137, 220, 89), (68, 252, 126), (29, 193, 187),
)  # fmt: skip

REFERENCE_DATASETS: dict[str, ReferenceDataset] = {
    d.name: d for d in (
        ReferenceDataset("ffhq_34", _FFHQ, _FFHQ_PALETTE, 255, "ffhq.pt", 20, 20),
        ReferenceDataset("bedroom_28", _BEDROOM, _BEDROOM_PALETTE, 0, "lsun_bedroom.pt", 40, 20),
        ReferenceDataset("cat_15", _CAT, _CAT_PALETTE, 255, "lsun_cat.pt", 30, 20),
        ReferenceDataset("horse_21", _HORSE, _HORSE_PALETTE, 255, "lsun_horse.pt", 30, 30),
        ReferenceDataset("celeba_19", _CELEBA, _CELEBA_PALETTE, 255, "ffhq.pt", 20, 500),
        ReferenceDataset("ade_bedroom_30", _ADE_BEDROOM, _ADE_BEDROOM_PALETTE, 255, "lsun_bedroom.pt", 50, 650),
    )
}


def reference_dataset(name: str) -> ReferenceDataset:
    """The entry ``name`` (one of :data:`REFERENCE_DATASETS`)."""
    try:
        return REFERENCE_DATASETS[name]
    except KeyError:
        raise KeyError(f"unknown reference dataset {name!r}; known: {', '.join(REFERENCE_DATASETS)}") from None
