"""Anatomical scenes: what lies under the probe, as tissue maps on the scan-line grid.

Each scene paints a `TissueMaps` from a layout RNG and returns the shapes a segmentation mask
would outline. Sizes are fractions of the imaging depth `S` (pixels), positions are given as
(depth fraction, lateral fraction) through `probe.point`, so a scene looks the same at any
image size and on any footprint. `phase` (0..1) animates the scenes that move (the heart).
A video re-creates the layout RNG from the same seed every frame, so only `phase` changes.

SCENES maps a scene kind to (renderer, default probe, the ontology node it shows).
"""
from __future__ import annotations

import math

import numpy as np

from .probe import Probe
from .tissue import Blob, TissueMaps, scatterer_texture, smooth_field


def _texture(rng, maps: TissueMaps, cells=(10, 12), contrast=0.25) -> np.ndarray:
    return smooth_field(rng, maps.X.shape, cells, contrast)


def _body_wall(rng, maps: TissueMaps, bottom: float, muscle: float = 0.35) -> None:
    """Skin (bright), subcutaneous fat (dark), muscle with fascia lines, down to depth `bottom`."""
    skin = rng.uniform(0.018, 0.03)
    fat = skin + rng.uniform(0.03, 0.08)
    bottom = max(bottom, fat + 0.02)
    maps.depth_band(0.0, skin, rng.uniform(1.3, 1.9))
    maps.depth_band(skin, fat, rng.uniform(0.18, 0.3), texture=_texture(rng, maps, (6, 14), 0.35))
    maps.depth_band(fat, bottom, muscle, texture=_texture(rng, maps, (18, 6), 0.3))
    for d in (fat, bottom, *rng.uniform(fat, bottom, size=rng.integers(0, 3))):
        maps.depth_band(d, d + rng.uniform(0.004, 0.009), rng.uniform(1.0, 1.6))


def _soft_tissue(rng, maps: TissueMaps, level: float, contrast: float = 0.25) -> None:
    tex = _texture(rng, maps, (8, 10), contrast) * scatterer_texture(rng, maps.X.shape, 0.002, 2.0)
    maps.reflectivity[:] = level * tex


def _at(probe: Probe, d: float, lat: float) -> tuple[float, float]:
    return probe.point(d, lat)


# ----------------------------------------------------------------------------- head & neck
def thyroid(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0, nodule: bool = False) -> list[Blob]:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.42)
    _body_wall(rng, maps, bottom=rng.uniform(0.2, 0.27), muscle=0.28)
    side = rng.choice([-1.0, 1.0])
    lobe = Blob.random(rng, *_at(probe, rng.uniform(0.42, 0.5), rng.uniform(-0.15, 0.15) * side),
                       ax=S * rng.uniform(0.36, 0.48), ay=S * rng.uniform(0.15, 0.2), irregularity=0.05,
                       angle=rng.uniform(-0.15, 0.15), edge=2.0)
    maps.paint(lobe, rng.uniform(0.75, 0.95), texture=_texture(rng, maps, (30, 30), 0.12))
    maps.ring(lobe, 0.7, width=2.0)
    carotid = Blob.random(rng, *_at(probe, rng.uniform(0.45, 0.55), 0.78 * side),
                          ax=S * rng.uniform(0.08, 0.11), ay=S * rng.uniform(0.08, 0.11))
    maps.paint(carotid, 0.008, attenuation=-0.85)
    maps.ring(carotid, 1.6, width=2.5)
    trachea = Blob.random(rng, *_at(probe, rng.uniform(0.28, 0.34), -0.9 * side),
                          ax=S * 0.16, ay=S * 0.12)
    maps.ring(trachea, 2.8, width=3.0, attenuation=10.0)
    lesions = []
    if nodule:
        r = S * rng.uniform(0.05, 0.1)
        nod = Blob.random(rng, lobe.cx + rng.uniform(-0.4, 0.4) * lobe.ax, lobe.cy + rng.uniform(-0.2, 0.2) * lobe.ay,
                          ax=r, ay=r * rng.uniform(0.8, 1.3), irregularity=rng.uniform(0.02, 0.15))
        cystic = rng.random() < 0.3
        maps.paint(nod.scaled(1.15), 0.05)  # hypoechoic halo
        maps.paint(nod, 0.01 if cystic else rng.uniform(0.15, 0.35),
                   attenuation=-0.7 if cystic else 0.5, texture=_texture(rng, maps, (40, 40), 0.3))
        for _ in range(rng.integers(0, 5)):
            c = Blob(nod.cx + rng.uniform(-0.6, 0.6) * r, nod.cy + rng.uniform(-0.6, 0.6) * r,
                     max(1.0, 0.006 * S), max(1.0, 0.006 * S))
            maps.paint(c, 4.0, attenuation=60.0)
        lesions.append(nod)
    return lesions


def carotid(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0, plaque: bool = False) -> list[Blob]:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.4)
    _body_wall(rng, maps, bottom=rng.uniform(0.25, 0.35), muscle=0.3)
    cx, cy = _at(probe, rng.uniform(0.5, 0.6), 0.0)
    lumen = Blob(cx, cy, ax=S * 3.0, ay=S * rng.uniform(0.07, 0.1), angle=rng.uniform(-0.08, 0.08), edge=1.0)
    maps.paint(lumen.scaled(1.18), 0.9)  # adventitia
    maps.paint(lumen.scaled(1.09), 0.25)  # media
    maps.paint(lumen, 0.006, attenuation=-0.8)
    maps.ring(lumen, 1.2, width=1.5)  # intima
    lesions = [lumen]
    if plaque:
        p = Blob.random(rng, cx + rng.uniform(-0.3, 0.3) * S, cy + lumen.ay * 0.85, ax=S * rng.uniform(0.06, 0.12),
                        ay=S * 0.03, irregularity=0.1, angle=lumen.angle)
        maps.paint(p, 1.5, attenuation=8.0)
        lesions.append(p)
    return lesions


# ----------------------------------------------------------------------------- chest
def breast(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0, lesion: str = "") -> list[Blob]:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.25)
    skin = rng.uniform(0.02, 0.035)
    glandular = (rng.uniform(0.22, 0.32), rng.uniform(0.58, 0.7))
    maps.depth_band(0.0, skin, 1.6)
    maps.depth_band(glandular[0], glandular[1], rng.uniform(0.6, 0.85), texture=_texture(rng, maps, (14, 8), 0.4))
    maps.depth_band(glandular[1] + 0.1, 1.0, 0.4, texture=_texture(rng, maps, (30, 4), 0.35))  # pectoralis
    for _ in range(rng.integers(3, 7)):  # fat lobules in the subcutaneous layer
        maps.paint(Blob.random(rng, *_at(probe, rng.uniform(0.08, glandular[0]), rng.uniform(-1, 1)),
                               ax=S * rng.uniform(0.05, 0.12), ay=S * rng.uniform(0.03, 0.06), irregularity=0.1),
                   0.18)
    for _ in range(rng.integers(2, 5)):  # Cooper's ligaments
        lat = rng.uniform(-0.9, 0.9)
        maps.line(_at(probe, skin, lat), _at(probe, glandular[0], lat + rng.uniform(-0.3, 0.3)), 0.9, 1.5)
    lesions = []
    kinds = {"mass": ["mass"], "cyst": ["cyst"], "both": ["mass", "cyst"]}.get(lesion, [])
    for i, kind in enumerate(kinds):
        lat = rng.uniform(-0.5, 0.5) if len(kinds) == 1 else (-0.45 if i == 0 else 0.45)
        cx, cy = _at(probe, rng.uniform(0.35, 0.55), lat)
        r = S * rng.uniform(0.08, 0.15)
        if kind == "mass":
            blob = Blob.random(rng, cx, cy, ax=r, ay=r * rng.uniform(0.9, 1.4), irregularity=rng.uniform(0.15, 0.3))
            maps.paint(blob.scaled(1.12), 0.9)  # echogenic halo
            maps.paint(blob, rng.uniform(0.08, 0.2), attenuation=rng.uniform(1.0, 3.0),
                       texture=_texture(rng, maps, (40, 40), 0.4))
        else:
            blob = Blob.random(rng, cx, cy, ax=r, ay=r * rng.uniform(0.6, 0.9), irregularity=0.03, angle=0.0)
            maps.paint(blob, 0.006, attenuation=-0.9)
            maps.ring(blob, 0.9, width=1.5)
        lesions.append(blob)
    return lesions


def heart_a4c(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    """Apical four-chamber view: ventricles near the apex (top), atria deep; they beat in antiphase."""
    S = probe.scale()
    _soft_tissue(rng, maps, 0.12, contrast=0.5)
    maps.depth_band(0.0, rng.uniform(0.05, 0.09), 0.5)
    systole = 0.5 - 0.5 * math.cos(2 * math.pi * phase)
    fv, fa = 1 - 0.2 * systole, 1 - 0.2 * (1 - systole)
    tilt = rng.uniform(-0.12, 0.12)
    heart = Blob.random(rng, *_at(probe, 0.55, tilt), ax=S * 0.33, ay=S * 0.43, irregularity=0.05, angle=tilt)
    maps.paint(heart, rng.uniform(0.45, 0.6), texture=_texture(rng, maps, (20, 20), 0.3))
    maps.ring(heart, 1.6, width=3.0)  # pericardium
    c, s = math.cos(tilt), math.sin(tilt)
    sep = rng.uniform(0.11, 0.14)  # half the distance between left and right chambers, in S
    # (lateral offset, depth offset) from the heart centre and semi-axes, in S; f = beat scale
    chambers = {
        "lv": ((sep, -0.17), (0.09, 0.2), fv),
        "rv": ((-sep, -0.15), (0.075, 0.16), fv),
        "la": ((sep * 0.95, 0.22), (0.09, 0.08), fa),
        "ra": ((-sep * 0.95, 0.22), (0.085, 0.08), fa),
    }
    blobs = {}
    for name, ((u, v), (ax, ay), f) in chambers.items():
        cx, cy = heart.cx + S * (c * u - s * v), heart.cy + S * (s * u + c * v)
        blobs[name] = Blob(cx, cy, ax=S * ax * f, ay=S * ay * f, angle=tilt,
                           harmonics=((3, 0.04, 1.0), (5, 0.03, 2.0)), edge=1.5)
        maps.paint(blobs[name], 0.015, attenuation=-0.5)
    opening = 1.0 - systole  # the mitral and tricuspid leaflets open towards the apex in diastole
    for side in ("lv", "rv"):
        v = blobs[side]
        x, y = v.cx, v.cy + v.ay * 1.02  # the valve plane, between ventricle and atrium
        for sign in (-1, 1):
            hinge = (x + sign * v.ax * 0.9, y)
            tip = (x + sign * v.ax * (0.08 + 0.6 * opening), y - S * (0.02 + 0.06 * opening))
            maps.line(hinge, tip, 1.4, 1.5)
    return [blobs["lv"]]


def lung(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0, pattern: str = "a_lines") -> list[Blob]:
    """Intercostal view: rib shadows, the pleural line, and A-lines (reverberation) or B-lines (comets)."""
    S = probe.scale()
    _soft_tissue(rng, maps, 0.35)
    pleura = rng.uniform(0.24, 0.34)
    _body_wall(rng, maps, bottom=pleura - 0.03, muscle=0.4)
    maps.depth_band(pleura + 0.008, 1.0, 0.12, texture=_texture(rng, maps, (6, 10), 0.5))  # aerated lung
    for lat in (-0.75, 0.75):
        rib = Blob.random(rng, *_at(probe, pleura - 0.05, lat + rng.uniform(-0.08, 0.08)),
                          ax=S * rng.uniform(0.09, 0.13), ay=S * 0.05, angle=0.0)
        maps.paint(rib, 0.2, attenuation=40.0)
        maps.ring(rib, 2.5, width=2.0)
    slide = 0.01 * math.sin(2 * math.pi * phase)  # lung sliding moves the comet tails
    maps.depth_band(pleura, pleura + 0.008, rng.uniform(2.8, 3.6))
    if pattern == "a_lines":
        k = 2
        while k * pleura < 0.98:
            maps.depth_band(k * pleura, k * pleura + 0.006, 3.0 / k)
            k += 1
    else:
        for lat in rng.uniform(-0.55, 0.55, size=rng.integers(1, 4)):
            maps.line(_at(probe, pleura, lat + slide), _at(probe, 1.0, lat + slide), rng.uniform(1.5, 2.5), S * 0.025)
    return []


# ----------------------------------------------------------------------------- abdomen & pelvis
def _liver_background(rng, maps: TissueMaps, probe: Probe) -> None:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.5, contrast=0.15)
    _body_wall(rng, maps, bottom=rng.uniform(0.1, 0.16), muscle=0.3)
    for _ in range(rng.integers(2, 6)):  # hepatic / portal veins, portal ones with bright walls
        v = Blob.random(rng, *_at(probe, rng.uniform(0.25, 0.85), rng.uniform(-0.8, 0.8)),
                        ax=S * rng.uniform(0.03, 0.1), ay=S * rng.uniform(0.015, 0.035),
                        angle=rng.uniform(-1.5, 1.5))
        maps.paint(v, 0.01, attenuation=-0.6)
        if rng.random() < 0.5:
            maps.ring(v, 1.5, width=2.0)


def liver(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0, lesion: str = "") -> list[Blob]:
    S = probe.scale()
    _liver_background(rng, maps, probe)
    dia = Blob.random(rng, *_at(probe, rng.uniform(1.25, 1.45), rng.uniform(-0.3, 0.3)),
                      ax=S * 0.9, ay=S * 0.5, angle=rng.uniform(-0.3, 0.3))
    maps.ring(dia, 3.0, width=3.0)  # diaphragm
    lesions = []
    if lesion:
        r = S * rng.uniform(0.05, 0.11)
        blob = Blob.random(rng, *_at(probe, rng.uniform(0.35, 0.7), rng.uniform(-0.5, 0.5)), ax=r,
                           ay=r * rng.uniform(0.8, 1.2), irregularity=0.08)
        if lesion == "hyper":  # haemangioma-like
            maps.paint(blob, rng.uniform(1.2, 1.8), attenuation=-0.2)
        else:  # target lesion: hypoechoic rim around an echogenic centre
            maps.paint(blob, 0.1)
            maps.paint(blob.scaled(0.6), 0.8)
        lesions.append(blob)
    return lesions


def kidney(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    S = probe.scale()
    _liver_background(rng, maps, probe)
    k = Blob.random(rng, *_at(probe, rng.uniform(0.5, 0.6), rng.uniform(-0.2, 0.2)), ax=S * rng.uniform(0.3, 0.38),
                    ay=S * rng.uniform(0.15, 0.19), irregularity=0.04, angle=rng.uniform(-0.35, 0.35), edge=2.0)
    maps.paint(k.scaled(1.12), 1.1)  # perirenal fat
    maps.paint(k, rng.uniform(0.3, 0.4), texture=_texture(rng, maps, (30, 30), 0.15))
    maps.ring(k, 1.5, width=2.0)  # capsule
    c, s = math.cos(k.angle), math.sin(k.angle)
    for i in range(6):  # medullary pyramids around the sinus
        t = 2 * math.pi * i / 6 + rng.uniform(-0.2, 0.2)
        u, v = 0.62 * k.ax * math.cos(t), 0.55 * k.ay * math.sin(t)
        maps.paint(Blob(k.cx + c * u - s * v, k.cy + s * u + c * v, ax=S * 0.035, ay=S * 0.03, angle=t), 0.1)
    sinus = Blob.random(rng, k.cx, k.cy, ax=k.ax * 0.45, ay=k.ay * 0.35, irregularity=0.3, angle=k.angle)
    maps.paint(sinus, rng.uniform(1.2, 1.6), texture=scatterer_texture(rng, maps.X.shape, 0.01, 2.0))
    return [k]


def gallbladder(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    S = probe.scale()
    _liver_background(rng, maps, probe)
    gb = Blob.random(rng, *_at(probe, rng.uniform(0.4, 0.5), rng.uniform(-0.2, 0.2)), ax=S * rng.uniform(0.22, 0.3),
                     ay=S * rng.uniform(0.09, 0.13), irregularity=0.08, angle=rng.uniform(-0.3, 0.3))
    maps.paint(gb, 0.006, attenuation=-0.85)
    maps.ring(gb, 1.0, width=2.0)
    stones = []
    for i in range(rng.integers(1, 4)):  # stones lie on the dependent (deep) wall and shadow
        r = S * rng.uniform(0.02, 0.04)
        st = Blob.random(rng, gb.cx + (i - 1) * 2.4 * r + rng.uniform(-0.3, 0.3) * r, gb.cy + gb.ay - 1.2 * r,
                         ax=r, ay=r * 0.8, irregularity=0.1)
        maps.paint(st, rng.uniform(3.0, 4.5), attenuation=80.0)
        stones.append(st)
    return stones


def bladder(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.4)
    _body_wall(rng, maps, bottom=rng.uniform(0.1, 0.15), muscle=0.3)
    b = Blob(*_at(probe, rng.uniform(0.4, 0.5), rng.uniform(-0.15, 0.15)), ax=S * rng.uniform(0.3, 0.4),
             ay=S * rng.uniform(0.2, 0.26), angle=rng.uniform(-0.15, 0.15),
             harmonics=((4, 0.07, 0.0), (2, rng.uniform(0.0, 0.08), rng.uniform(0, 6.28))), edge=2.0)
    maps.paint(b, 0.005, attenuation=-0.9)
    maps.ring(b, 1.3, width=2.5)
    behind = Blob.random(rng, b.cx, b.cy + b.ay * 1.6, ax=b.ax * 0.6, ay=b.ay * 0.5, irregularity=0.05)
    maps.paint(behind, 0.55, texture=_texture(rng, maps, (20, 20), 0.2))  # uterus / prostate
    return [b]


# ----------------------------------------------------------------------------- fetus
def _amniotic(rng, maps: TissueMaps, probe: Probe) -> None:
    S = probe.scale()
    _soft_tissue(rng, maps, 0.45)
    _body_wall(rng, maps, bottom=rng.uniform(0.12, 0.18), muscle=0.5)
    sac = Blob.random(rng, *_at(probe, 0.6, 0.0), ax=S * 1.0, ay=S * 0.42, irregularity=0.06, angle=0.0, edge=3.0)
    maps.paint(sac, 0.01, attenuation=-0.9)
    if rng.random() < 0.5:  # anterior placenta
        maps.depth_band(0.2, 0.2 + rng.uniform(0.06, 0.12), 0.7, texture=_texture(rng, maps, (10, 20), 0.3))


def fetal_head(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    S = probe.scale()
    _amniotic(rng, maps, probe)
    head = Blob.random(rng, *_at(probe, rng.uniform(0.55, 0.62), rng.uniform(-0.15, 0.15)),
                       ax=S * rng.uniform(0.25, 0.3), ay=S * rng.uniform(0.19, 0.23), irregularity=0.02,
                       angle=rng.uniform(-0.6, 0.6), edge=2.0)
    maps.paint(head, 0.13, texture=_texture(rng, maps, (20, 20), 0.4))
    maps.ring(head, 3.2, width=S * 0.025, attenuation=4.0)  # skull
    c, s = math.cos(head.angle), math.sin(head.angle)
    ends = [(head.cx + sign * 0.92 * head.ax * c, head.cy + sign * 0.92 * head.ax * s) for sign in (-1, 1)]
    maps.line(ends[0], ends[1], 0.9, 1.5)  # falx / midline echo
    for sign in (-1, 1):  # thalami either side of the midline
        u, v = 0.1 * head.ax, sign * 0.22 * head.ay
        maps.paint(Blob(head.cx + c * u - s * v, head.cy + s * u + c * v, ax=0.16 * head.ax, ay=0.12 * head.ay,
                        angle=head.angle), 0.04)
    u = -0.35 * head.ax
    maps.paint(Blob(head.cx + c * u, head.cy + s * u, ax=0.07 * head.ax, ay=0.09 * head.ay, angle=head.angle),
               0.01)  # cavum septi pellucidi
    return [head]


def fetal_abdomen(rng, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    S = probe.scale()
    _amniotic(rng, maps, probe)
    abd = Blob.random(rng, *_at(probe, rng.uniform(0.55, 0.62), rng.uniform(-0.15, 0.15)),
                      ax=S * rng.uniform(0.2, 0.25), ay=S * rng.uniform(0.18, 0.22), irregularity=0.03, edge=2.0)
    maps.paint(abd, 0.45, texture=_texture(rng, maps, (20, 20), 0.25))
    maps.ring(abd, 1.0, width=2.0)
    maps.paint(Blob.random(rng, abd.cx - 0.35 * abd.ax, abd.cy - 0.1 * abd.ay, ax=0.25 * abd.ax,
                           ay=0.2 * abd.ay, irregularity=0.05), 0.01, attenuation=-0.8)  # stomach bubble
    maps.paint(Blob(abd.cx + 0.15 * abd.ax, abd.cy - 0.05 * abd.ay, ax=0.35 * abd.ax, ay=0.05 * abd.ay,
                    angle=rng.uniform(-0.6, 0.6)), 0.01)  # umbilical vein
    for i in (-1, 0, 1):  # spine ossification centres shadow
        maps.paint(Blob(abd.cx + i * 0.12 * abd.ax, abd.cy + 0.72 * abd.ay - abs(i) * 0.05 * abd.ay,
                        ax=S * 0.015, ay=S * 0.012), 3.0, attenuation=30.0)
    return [abd]


# kind -> (renderer, keyword arguments, probe kind)
SCENES = {
    "thyroid": (thyroid, {}, "linear"),
    "thyroid_nodule": (thyroid, {"nodule": True}, "linear"),
    "carotid": (carotid, {}, "linear"),
    "carotid_plaque": (carotid, {"plaque": True}, "linear"),
    "breast_normal": (breast, {}, "linear"),
    "breast_mass": (breast, {"lesion": "mass"}, "linear"),
    "breast_cyst": (breast, {"lesion": "cyst"}, "linear"),
    "breast_mass_cyst": (breast, {"lesion": "both"}, "linear"),
    "heart_a4c": (heart_a4c, {}, "phased"),
    "lung_a_lines": (lung, {"pattern": "a_lines"}, "linear"),
    "lung_b_lines": (lung, {"pattern": "b_lines"}, "convex"),
    "liver": (liver, {}, "convex"),
    "liver_lesion_hyper": (liver, {"lesion": "hyper"}, "convex"),
    "liver_lesion_target": (liver, {"lesion": "target"}, "convex"),
    "kidney": (kidney, {}, "convex"),
    "gallstone": (gallbladder, {}, "convex"),
    "bladder": (bladder, {}, "convex"),
    "fetal_head": (fetal_head, {}, "convex"),
    "fetal_abdomen": (fetal_abdomen, {}, "convex"),
}


def paint_scene(kind: str, rng: np.random.Generator, maps: TissueMaps, probe: Probe, phase: float = 0.0) -> list[Blob]:
    try:
        fn, kwargs, _ = SCENES[kind]
    except KeyError:
        raise ValueError(f"unknown synthetic scene {kind!r}; known: {sorted(SCENES)}") from None
    return fn(rng, maps, probe, phase, **kwargs)


def default_probe(kind: str) -> str:
    return SCENES[kind][2]
