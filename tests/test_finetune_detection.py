"""finetune.task=detection: box CSV / COCO JSON reading and refusals, CenterNet target encoding and
decoding, COCO AP with pycocotools, and a training run on the synthetic breast scans."""
from __future__ import annotations

import json
from itertools import groupby

import numpy as np
import pytest
import torch
from PIL import Image

from finetune_helpers import exported, flat_image  # noqa: F401 - fixtures are found by name

from echocare_dist.config import load_config
from echocare_dist.finetune.data import DataError
from echocare_dist.finetune.tasks import detection as D
from echocare_dist.finetune.tasks import instance_masks as IM
from echocare_dist.synth.tasks import generate_task_sets


def test_csv_and_coco_give_the_same_boxes_and_empty_images_count(tmp_path):
    flat_image(tmp_path / "im" / "a.png", 50, 40)
    flat_image(tmp_path / "im" / "b.png", 30, 30)
    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2,label\nim/a.png,1,2,11,22,mass\nim/a.png,20,5,50,40,cyst\n"
                                        "im/b.png,,,,,\n")
    names, rows = D.read_boxes(tmp_path / "boxes.csv", tmp_path)
    assert names == ["cyst", "mass"]
    by_name = {p.name: t for p, t in rows}
    assert by_name["a.png"].boxes == ((1, 2, 11, 22, 1), (20, 5, 50, 40, 0)) and by_name["b.png"].boxes == ()
    coco = dict(images=[dict(id=1, file_name="im/a.png"), dict(id=2, file_name="im/b.png")],
                categories=[dict(id=7, name="cyst"), dict(id=9, name="mass")],
                annotations=[dict(image_id=1, bbox=[1, 2, 10, 20], category_id=9),
                             dict(image_id=1, bbox=[20, 5, 30, 35], category_id=7)])
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    names_c, rows_c = D.read_boxes(tmp_path / "boxes.json", tmp_path)
    assert names_c == names and {p.name: t.boxes for p, t in rows_c} == {p.name: t.boxes for p, t in rows}


@pytest.mark.parametrize("text, message", [
    ("path,x1,y1,x2,y2\na.png,10,2,5,8\n", "has x2 <= x1"),
    ("path,x1,y1,x2,y2\na.png,1,2,5,60\n", "extends outside the image"),
    ("path,x1,y1,x2,y2\na.png,1,2,5\n", "line 2: 4 columns, the header has 5"),
    ("path,x1,y1,x2,y2\ngone.png,1,2,5,6\n", "'gone.png' not found"),
    ("path,x,y,w,h\na.png,1,2,5,6\n", "header must be path,x1,y1,x2,y2"),
])
def test_malformed_boxes_name_the_file_and_line(tmp_path, text, message):
    flat_image(tmp_path / "a.png", 50, 40)
    (tmp_path / "b.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        D.read_boxes(tmp_path / "b.csv", tmp_path)
    assert "b.csv" in str(err.value)


def test_coco_refuses_an_unknown_image_id(tmp_path):
    flat_image(tmp_path / "a.png", 50, 40)
    (tmp_path / "c.json").write_text(json.dumps(dict(images=[dict(id=1, file_name="a.png")],
                                                     annotations=[dict(image_id=3, bbox=[1, 1, 2, 2])])))
    with pytest.raises(DataError, match=r"c.json annotations\[0\]: image_id 3"):
        D.read_boxes(tmp_path / "c.json", tmp_path)


def test_perfect_maps_decode_to_the_encoded_boxes():
    boxes = np.array([[4.0, 6.0, 20.0, 18.0, 0], [30.0, 30.0, 60.0, 50.0, 1]])
    t = D.encode_targets(boxes, 2, 64)
    logits = torch.logit(t[:2].clamp(1e-4, 1 - 1e-4))  # heatmaps as the head would ideally predict them
    out = torch.cat([logits, t[2:6]])[None]
    decoded = D.decode_boxes(out, 2, 10)[0]
    best = decoded[np.argsort(-decoded[:, 5])][:2]
    best = best[np.argsort(best[:, 4])]
    assert np.allclose(best[:, :5], boxes, atol=1e-4)


def test_coco_ap_perfect_shifted_and_missing():
    truth = [np.array([[10, 10, 30, 30, 0]], float), np.array([[5, 5, 15, 25, 0]], float)]
    sizes = [(64, 64), (64, 64)]
    perfect = [np.c_[t, np.ones(1)] for t in truth]
    assert D.coco_ap(truth, perfect, sizes, 1) == pytest.approx((1.0, 1.0))
    shifted = [p + np.array([[6, 0, 6, 0, 0, 0]]) for p in perfect]
    ap, ap50 = D.coco_ap(truth, shifted, sizes, 1)
    assert ap < 0.6 and ap < ap50
    assert D.coco_ap(truth, [np.zeros((0, 6))] * 2, sizes, 1) == (0.0, 0.0)


def test_focal_loss_prefers_the_right_centre():
    t = D.encode_targets(np.array([[8.0, 8.0, 24.0, 24.0, 0]]), 1, 32)[None]
    ft = load_config("tiny_cpu").finetune
    good = torch.cat([torch.logit(t[:, :1].clamp(1e-3, 1 - 1e-3)), t[:, 1:5]], dim=1)
    bad = torch.cat([torch.roll(good[:, :1], shifts=9, dims=3), t[:, 1:5]], dim=1)
    assert D.DetectionTask().loss(good, t, ft) < D.DetectionTask().loss(bad, t, ft)


@pytest.mark.slow
def test_detection_with_masks_trains_on_synthetic_scans_and_reports_box_and_mask_ap(tmp_path, exported):
    from echocare_dist.finetune.runner import run_finetune

    generate_task_sets(tmp_path / "data", 14)
    cfg = load_config("tiny_cpu", [f"finetune.checkpoint={exported}", f"finetune.run_dir={tmp_path / 'run'}",
                                   "finetune.task=detection", f"finetune.csv={tmp_path / 'data/detection/boxes.csv'}",
                                   "finetune.epochs=2", "finetune.warmup_epochs=0", "finetune.bootstrap=20",
                                   "finetune.lr=1e-3", "tracking.enabled=true"])
    summary = run_finetune(cfg)
    final = summary["final"]
    assert 0.0 <= final["box_ap"] <= final["box_ap50"] <= 1.0
    assert 0.0 <= final["mask_ap"] <= final["mask_ap50"] <= 1.0   # synth writes a mask for every box
    assert summary["class_names"] == ["lesion"] and summary["num_val"] >= 2
    history = summary["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    run = tmp_path / "run"
    assert (run / "overlays.png").stat().st_size > 0 and (run / "best.safetensors").is_file()
    assert summary["mlflow_run_id"]


def test_boxes_and_extreme_points_from_busi_like_masks(tmp_path):
    from echocare_dist.finetune.tasks.from_masks import main
    from echocare_dist.finetune.tasks.landmarks import read_landmarks

    data = tmp_path / "busi"
    for name, mode in (("benign (1)", "L"), ("malignant (1)", "1"), ("normal (1)", "L")):
        flat_image(data / name.split()[0] / f"{name}.png", 60, 40)
        mask = np.zeros((40, 60), np.uint8)
        if name.startswith("benign"):
            mask[5:15, 10:30] = 255   # the larger lesion
            mask[25:35, 40:48] = 255
        elif name.startswith("malignant"):
            mask[20:30, 5:25] = 255   # saved as a 1-bit image: must read as foreground, not as 0/1 ids
        Image.fromarray(mask).convert(mode).save(data / name.split()[0] / f"{name}_mask.png")
    assert main([str(data), str(tmp_path / "ann")]) == 0
    names, rows = D.read_boxes(tmp_path / "ann" / "boxes.csv", data)
    boxes = {p.name: t.boxes for p, t in rows}
    assert boxes["benign (1).png"] == ((10, 5, 30, 15, 0), (40, 25, 48, 35, 0))
    assert boxes["malignant (1).png"] == ((5, 20, 25, 30, 0),) and boxes["normal (1).png"] == ()
    _, instances = D.read_boxes(tmp_path / "ann" / "instances.json", data)
    by_file = {p.name: t for p, t in instances}
    assert {k: t.boxes for k, t in by_file.items()} == boxes   # the same boxes, now with each lesion's mask
    small = IM.decode(by_file["benign (1).png"].masks[1])
    assert small.sum() == 80 and small[25:35, 40:48].all() and by_file["normal (1).png"].masks == ()
    point_names, points = read_landmarks(tmp_path / "ann" / "landmarks.csv", data)
    by_image = {p.name: pts for p, pts, _, _ in points}
    assert point_names == ["top", "bottom", "left", "right"] and "normal (1).png" not in by_image
    assert by_image["benign (1).png"] == ((19.5, 5.0), (19.5, 14.0), (10.0, 9.5), (29.0, 9.5))


def _disk(shape, cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _box_of(mask: np.ndarray, cls: int = 0) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, cls]


def test_mask_ap_perfect_shifted_filled_and_empty():
    shape = (64, 64)
    ring = _disk(shape, 20, 20, 10) & ~_disk(shape, 20, 20, 5)   # a box is a poor mask of a ring
    disk = _disk(shape, 44, 40, 8)
    masks = [[IM.encode(ring)], [IM.encode(disk)]]
    truth = [np.array([_box_of(ring)], float), np.array([_box_of(disk)], float)]
    pred = [np.c_[t, np.ones(1)] for t in truth]
    sizes = [(64, 64), (64, 64)]
    summary = D.detection_summary(truth, pred, sizes, 1, masks, masks)
    assert summary["mask_ap"] == pytest.approx(1.0) and summary["mask_ap50"] == pytest.approx(1.0)
    shifted = [[IM.encode(np.roll(ring, 3, axis=1))], [IM.encode(np.roll(disk, 3, axis=1))]]
    ap_shift, _ = D.coco_ap(truth, pred, sizes, 1, masks, shifted)
    filled = [IM.filled_boxes(p, 64, 64) for p in pred]
    ap_filled, _ = D.coco_ap(truth, pred, sizes, 1, masks, filled)
    assert 0.0 < ap_shift < 1.0 and ap_filled < 1.0
    assert D.coco_ap(truth, pred, sizes, 1) == pytest.approx((1.0, 1.0))  # the same boxes score 1 as boxes
    empty = [[IM.encode(np.zeros(shape, bool))]] * 2
    assert D.coco_ap(truth, pred, sizes, 1, masks, empty) == (0.0, 0.0)
    assert np.isnan(D.detection_summary(truth, pred, sizes, 1)["mask_ap"])   # no masks annotated


def test_instance_masks_from_coco_polygons_rle_and_mask_files_agree(tmp_path):
    flat_image(tmp_path / "im" / "a.png", 40, 30)
    square = np.zeros((30, 40), bool)
    square[5:15, 4:14] = True
    disk = _disk((30, 40), 28, 18, 6)
    Image.fromarray(((square | disk) * 255).astype(np.uint8)).save(tmp_path / "im" / "a_mask.png")
    (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2,label,mask\nim/a.png,4,5,14,15,lesion,im/a_mask.png\n"
                                        f"im/a.png,{','.join(map(str, _box_of(disk)[:4]))},lesion,im/a_mask.png\n")
    rle = IM.encode(disk)
    coco = dict(images=[dict(id=1, file_name="im/a.png")], categories=[dict(id=1, name="lesion")],
                annotations=[dict(image_id=1, category_id=1, bbox=[4, 5, 10, 10],
                                  segmentation=[[4, 5, 14, 5, 14, 15, 4, 15]]),
                             dict(image_id=1, category_id=1, bbox=[22, 12, 13, 13],
                                  segmentation=dict(size=[30, 40], counts=rle["counts"].decode()))])
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    _, (csv_row,) = D.read_boxes(tmp_path / "boxes.csv", tmp_path)
    _, (coco_row,) = D.read_boxes(tmp_path / "inst.json", tmp_path)
    from_file = [IM.decode(m) for m in csv_row[1].masks]
    assert np.array_equal(from_file[0], square) and np.array_equal(from_file[1], disk)
    from_coco = [IM.decode(m) for m in coco_row[1].masks]
    assert np.array_equal(from_coco[1], disk)
    # pycocotools rasterises a polygon's edges a pixel-half outwards: compare by overlap
    assert (from_coco[0] & square).sum() / (from_coco[0] | square).sum() > 0.8
    assert D.has_masks([D.Sample(p, t, "k") for p, t in (csv_row, coco_row)])
    column_major = disk.flatten(order="F")
    counts = [len(list(run)) for _, run in groupby(column_major)]
    counts = [0] + counts if column_major[0] else counts   # uncompressed RLE starts with a run of zeros
    uncompressed = IM.from_coco(dict(size=[30, 40], counts=counts), 40, 30, "test")
    assert np.array_equal(IM.decode(uncompressed), disk)


@pytest.mark.parametrize("kind, message", [
    ("mixed", "this box has no mask while 1 others have one"),
    ("outside", "is empty inside the box"),
    ("polygon", "polygon 0 must be"),
    ("size", r"segmentation size \[10, 10\] is not the image's"),
    ("cell", "line 2: the mask cell is empty"),
])
def test_bad_instance_masks_name_the_file_and_the_entry(tmp_path, kind, message):
    flat_image(tmp_path / "a.png", 40, 30)
    mask = np.zeros((30, 40), np.uint8)
    mask[2:8, 2:8] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    seg = {"mixed": None, "outside": None, "polygon": [[1, 2, 3]], "size": dict(size=[10, 10], counts="PPP1")}
    if kind in ("outside", "cell"):
        ann = tmp_path / "b.csv"
        ann.write_text("path,x1,y1,x2,y2,mask\n" + ("a.png,20,20,30,28,m.png\n" if kind == "outside" else "a.png,2,2,8,8,\n"))
    else:
        anns = [dict(image_id=1, bbox=[2, 2, 6, 6], segmentation=seg[kind])]
        if kind == "mixed":
            anns.append(dict(image_id=1, bbox=[2, 2, 6, 6], segmentation=[[2, 2, 8, 2, 8, 8]]))
        ann = tmp_path / "b.json"
        ann.write_text(json.dumps(dict(images=[dict(id=1, file_name="a.png")], annotations=anns)))
    with pytest.raises(DataError, match=message) as err:
        D.read_boxes(ann, tmp_path)
    assert ann.name in str(err.value)


def test_predicted_masks_are_the_foreground_map_cropped_to_each_box():
    logits = torch.full((32, 32), -5.0)
    logits[4:12, 4:12] = 5.0    # one finding, and foreground spilling into a second box
    logits[20:28, 20:24] = 5.0
    boxes = np.array([[4, 4, 12, 12, 0, 0.9], [16, 16, 32, 32, 0, 0.8]]) * np.array([2, 2, 2, 2, 1, 1])
    m1, m2 = (IM.decode(r) for r in IM.predicted_masks(logits, boxes, 64, 64))
    assert m1.shape == (64, 64) and m1[8:24, 8:24].all() and m1.sum() == 16 * 16
    assert not m2[:32, :32].any() and m2[40:56, 40:48].all()


def test_mask_branch_loss_prefers_the_true_mask_and_ignores_unannotated_images():
    truth = np.zeros((32, 32), np.float32)
    truth[8:20, 8:20] = 1
    t = D.encode_targets(np.array([[8.0, 8.0, 20.0, 20.0, 0]]), 1, 32, truth)[None]
    assert t.shape[1] == 1 + D.BOX_CHANNELS + 2
    trained = t[0, -1] != IM.NO_MASK   # the box grown by a quarter of its 12 px on each side
    assert torch.equal(trained.nonzero().amin(0), torch.tensor([5, 5])) and trained.sum() == 18 * 18
    assert torch.equal(t[0, -1][trained], torch.from_numpy(truth)[trained])
    heat = torch.logit(t[:, :1].clamp(1e-3, 1 - 1e-3))
    good = torch.cat([heat, (t[:, -1:] * 2 - 1) * 6, t[:, 1:5]], dim=1)
    bad = torch.cat([heat, -(t[:, -1:] * 2 - 1) * 6, t[:, 1:5]], dim=1)
    task, ft = D.DetectionTask(), load_config("tiny_cpu").finetune
    assert task.loss(good, t, ft) < task.loss(bad, t, ft)
    unannotated = t.clone()
    unannotated[:, -1] = IM.NO_MASK
    assert task.loss(good, unannotated, ft) == pytest.approx(task.loss(bad, unannotated, ft).item())


def test_overlays_outline_the_true_and_predicted_masks(tmp_path):
    from echocare_dist.finetune.tasks.overlays import boxes_png

    gray = np.full((64, 64), 60, np.uint8)
    truth_mask, pred_mask = _disk((64, 64), 20, 20, 9), _disk((64, 64), 44, 44, 9)
    items = [(gray, np.array([_box_of(truth_mask)], float), np.zeros((0, 6)), "one")]
    boxes_png(items, ["lesion"], tmp_path / "plain.png")
    boxes_png(items, ["lesion"], tmp_path / "masks.png", masks=[([truth_mask], [pred_mask])])
    plain = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    outlined = np.asarray(Image.open(tmp_path / "masks.png").convert("RGB"))
    def magenta(img):   # outlines are anti-aliased: near the colour, not equal to it
        return (img[..., 0] > 150) & (img[..., 2] > 150) & (img[..., 1] < 110)

    def green(img):
        return (img[..., 1] > 120) & (img[..., 0] < 110) & (img[..., 2] < 110)
    tile, before = outlined[:192, :192].astype(int), plain[:192, :192].astype(int)
    assert magenta(tile).any() and not magenta(before).any()
    ys, xs = np.nonzero(magenta(tile))   # the predicted outline is drawn where the predicted disk is
    assert 100 < xs.mean() < 160 and 100 < ys.mean() < 160
    assert green(tile).sum() > green(before).sum()
