"""The synthetic collection: source datasets, their folders, labels and file formats.

Modelled on the public sets the report draws on (TN3K-like thyroid, BUSI-like breast with
benign/malignant/normal folders and masks, FETAL_PLANES-like fetal planes, CAMUS-like apical
views with cine, abdominal and lung POCUS collections, an unlabeled dump). Together they use
every way the label mapping can assign labels: source default, glob rules, a per-file CSV,
and an unlabeled source ([]).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    folder: str                          # relative to the source root ("" = the root)
    scenes: tuple[str, ...]              # scene kinds, used in turn
    labels: tuple[str, ...] | None      # ground-truth labels; None = from the scene via the CSV
    stem: str                            # file stem, formatted with n (1-based counter)
    weight: float = 1.0


@dataclass(frozen=True)
class SourceSpec:
    name: str
    root: str                            # relative to the dataset folder
    labels: tuple[str, ...]              # default labels of the source (mapping `labels`)
    device: str
    weight: float                        # share of the regular still images
    formats: tuple[str, ...]             # "ext:mode" used in turn: png/jpg/bmp x L/RGB/I;16
    variants: tuple[Variant, ...]
    rules: tuple[tuple[str, tuple[str, ...]], ...] = ()
    csv: str | None = None               # per-file labels of the files in `csv_folders`
    csv_folders: tuple[str, ...] = ()
    frame_stride: int | None = None
    masks: str | None = None             # sibling folder (relative to the dataset) for lesion masks
    ecg: bool = False                    # cardiac layout: ECG trace under the sector


# Labels of scenes whose files are labeled through the CSV (breast).
CSV_SCENE_LABELS = {
    "breast_mass": ("breast_mass",),
    "breast_cyst": ("breast_cyst",),
    "breast_mass_cyst": ("breast_mass", "breast_cyst"),
    "breast_normal": ("breast",),
}

SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="Thyroid US", root="Thyroid US", labels=("thyroid",), device="synthetic linear L12-5",
        weight=0.15, formats=("jpg:L", "png:L", "jpg:RGB"),
        rules=(("nodules/*", ("thyroid_nodule",)),),
        variants=(Variant("", ("thyroid",), ("thyroid",), "case {n:03d}", 0.45),
                  Variant("nodules", ("thyroid_nodule",), ("thyroid_nodule",), "nodule {n:03d}", 0.55))),
    SourceSpec(
        name="Breast US", root="Breast US/images", labels=("breast",), device="synthetic linear L15-7",
        weight=0.16, formats=("png:RGB", "png:L", "png:I;16"),
        rules=(("malignant/*", ("breast_mass",)),), csv="labels.csv", csv_folders=("benign", "malignant"),
        masks="Breast US/masks",
        variants=(Variant("benign", ("breast_cyst", "breast_mass", "breast_cyst", "breast_mass_cyst"), None,
                          "benign ({n})", 0.45),
                  Variant("malignant", ("breast_mass", "breast_mass", "breast_mass_cyst"), None,
                          "malignant ({n})", 0.35),
                  Variant("normal", ("breast_normal",), ("breast",), "normal ({n})", 0.2))),
    SourceSpec(
        name="Fetal Planes", root="Fetal Planes", labels=("fetus",), device="synthetic convex C5-1",
        weight=0.14, formats=("png:L", "png:I;16", "bmp:L"),
        rules=(("Fetal brain/**", ("fetal_skull",)), ("Fetal abdomen/*", ("fetal_abdomen",))),
        variants=(Variant("Fetal brain", ("fetal_head",), ("fetal_skull",), "Patient{n:05d}_Plane3_1_of_2", 0.3),
                  Variant("Fetal brain/trans thalamic", ("fetal_head",), ("fetal_skull",),
                          "Patient{n:05d}_Plane3_2_of_2", 0.15),
                  Variant("Fetal abdomen", ("fetal_abdomen",), ("fetal_abdomen",), "Patient{n:05d}_Plane2_1_of_1", 0.3),
                  Variant("Other", ("fetal_head", "fetal_abdomen"), ("fetus",), "Patient{n:05d}_Plane1_1_of_1",
                          0.25))),
    SourceSpec(
        name="Cardiac Echo", root="Cardiac Echo", labels=("heart",), device="synthetic phased array P4-2",
        weight=0.09, formats=("jpg:RGB", "png:RGB", "png:L"), frame_stride=5, ecg=True,
        rules=(("A4C/*", ("left_ventricle",)),),
        variants=(Variant("A4C", ("heart_a4c",), ("left_ventricle",), "frame {n:04d}", 0.6),
                  Variant("Other views", ("heart_a4c",), ("heart",), "view {n:04d}", 0.4))),
    SourceSpec(
        name="Abdomen US", root="Abdomen US", labels=("abdomen",), device="synthetic convex C6-2",
        weight=0.2, formats=("bmp:RGB", "jpg:L", "png:L", "bmp:L"),
        # First match wins: the lesion folder before the liver folder that contains it.
        rules=(("liver/lesions/*", ("liver_lesion",)), ("liver/*", ("liver",)), ("kidney/*", ("kidney",)),
               ("gallbladder/*", ("gallstone",)), ("bladder/*", ("urinary_bladder",))),
        variants=(Variant("liver/lesions", ("liver_lesion_hyper", "liver_lesion_target"), ("liver_lesion",),
                          "lesion {n:03d}", 0.2),
                  Variant("liver", ("liver",), ("liver",), "liver {n:03d}", 0.2),
                  Variant("kidney", ("kidney",), ("kidney",), "kidney {n:03d}", 0.2),
                  Variant("gallbladder", ("gallstone",), ("gallstone",), "gb {n:03d}", 0.15),
                  Variant("bladder", ("bladder",), ("urinary_bladder",), "bladder {n:03d}", 0.1),
                  Variant("misc", ("liver", "kidney"), ("abdomen",), "IMG_{n:04d}", 0.15))),
    SourceSpec(
        name="Carotid US", root="Carotid US", labels=("carotid_artery",), device="synthetic linear L9-3",
        weight=0.06, formats=("png:RGB", "jpg:L"),
        rules=(("plaque/*", ("carotid_plaque",)),),
        variants=(Variant("", ("carotid",), ("carotid_artery",), "cca {n:03d}", 0.6),
                  Variant("plaque", ("carotid_plaque",), ("carotid_plaque",), "plaque {n:03d}", 0.4))),
    SourceSpec(
        name="Lung POCUS", root="Lung POCUS", labels=("lung",), device="synthetic linear/convex",
        weight=0.08, formats=("jpg:L", "png:L"),
        rules=(("A-lines/*", ("a_line",)), ("B-lines/*", ("b_line",))),
        variants=(Variant("A-lines", ("lung_a_lines",), ("a_line",), "pocus {n:03d}", 0.5),
                  Variant("B-lines", ("lung_b_lines",), ("b_line",), "pocus {n:03d}", 0.5))),
    SourceSpec(
        name="Unsorted scans", root="Unsorted scans", labels=(), device="unknown",
        weight=0.12, formats=("png:L", "jpg:RGB", "bmp:L", "png:I;16"),
        variants=(Variant("", (), (), "scan {n:04d}", 0.6),  # () = any scene
                  Variant("export 2021/day 2", (), (), "US{n:06d}", 0.4))),
)

# Clips: (source, folder, file name, scene, RGB, beats per second of the animated phase)
VIDEOS = (
    ("Cardiac Echo", "A4C", "clip {n:02d}.mp4", "heart_a4c", True, 1.2),
    ("Lung POCUS", "B-lines", "clip {n:02d}.avi", "lung_b_lines", False, 0.5),
)
DICOM_CINE = ("Cardiac Echo", "A4C", "cine {n:02d}.dcm", "heart_a4c", 1.2)
DICOM_SINGLE = ("Abdomen US", "liver", "IM {n:04d}.dcm", "liver")

# Special still images: (variant, source, folder, file name)
NEAR_EMPTY = (
    ("black", "Unsorted scans", "", "blank {n:02d}.png"),
    ("speckle_patch", "Cardiac Echo", "Other views", "frame blank {n:02d}.png"),
    ("tiny_text", "Unsorted scans", "export 2021/day 2", "idle {n:02d}.bmp"),
)
DUPLICATES = ("byte_copy", "png_resave", "bmp_export")
NEAR_DUPLICATES = ("noise", "brightness")
CORRUPT = (
    ("truncated_jpeg", "Thyroid US", "nodules", "nodule {n:03d}.jpg", "thyroid_nodule"),
    ("garbage_png", "Unsorted scans", "", "scan {n:04d}.png", ""),
    ("truncated_png", "Fetal Planes", "Other", "Patient{n:05d}_Plane1_1_of_1.png", "fetal_head"),
)
# Byte copies land in the unlabeled dump, as when one public set re-hosts another's images.
COPIES_FOLDER = ("Unsorted scans", "copies")


def source(name: str) -> SourceSpec:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(name)


def folder_labels(src: SourceSpec, folder: str) -> tuple[str, ...]:
    """Ground-truth labels of a file placed in `folder` of `src` (not a CSV-labeled folder)."""
    for v in src.variants:
        if v.folder == folder and v.labels is not None:
            return v.labels
    return src.labels


def all_label_names() -> set[str]:
    names = set()
    for s in SOURCES:
        names.update(s.labels)
        for _, labels in s.rules:
            names.update(labels)
        for v in s.variants:
            names.update(v.labels or ())
    for labels in CSV_SCENE_LABELS.values():
        names.update(labels)
    return names
