"""Compressed DICOM transfer syntaxes: decoded when a plugin of the `dicom` extra is installed,
rejected as `unsupported_codec` naming the syntax (never `corrupt`) when nothing here decodes them.

Files are made from the synthetic generator's raw DICOM and compressed with pydicom's own encoders
(RLE: pydicom; JPEG-LS: pyjpegls; JPEG 2000: pylibjpeg-openjpeg). Nothing installed encodes JPEG
Lossless (process 14): `jpeg_lossless_sv1` below writes that bitstream (ITU T.81 annex H, first-order
prediction, the standard DC Huffman table), which the extra's libjpeg then has to decode exactly.
Video syntaxes are constructed (a real header, an encapsulated frame): only the rejection is checked.
"""
from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, MPEG4HP41, RLELossless, UID)

from echocare_dist.curation.dicom_codecs import UNSUPPORTED_CODEC
from echocare_dist.curation.media import iter_frames
from echocare_dist.curation.preprocess import Rejected
from echocare_dist.synth.writers import encode_dicom


def _cine(n: int = 3, h: int = 64, w: int = 80) -> np.ndarray:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, (h, w), dtype=np.uint8)
    return np.stack([np.roll(base, k, axis=1) for k in range(n)])


def _raw_dataset(frames: np.ndarray) -> pydicom.Dataset:
    raw = encode_dicom(frames, uid_seed="codec-test", frame_time_ms=40.0, study_date="20260101",
                       description="codec test")
    return pydicom.dcmread(io.BytesIO(raw))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_lossless_syntaxes_decode_to_the_original_pixels(tmp_path, syntax):
    frames = _cine()
    ds = _raw_dataset(frames)
    ds.compress(syntax)
    path = tmp_path / "cine.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    decoded = list(iter_frames(path, "dicom", stride=1))
    assert [i for i, _ in decoded] == [0, 1, 2]
    for (_, got), want in zip(decoded, frames):
        assert got.dtype == np.uint8 and np.array_equal(got, want)


# T.81 table K.3 (luminance DC): code lengths 1..16 and the difference categories they code.
DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
DC_CATEGORIES = tuple(range(12))  # 8-bit differences need categories 0..8 only


def _huffman_codes() -> dict[int, tuple[int, int]]:
    codes, code, k = {}, 0, 0
    for length, count in enumerate(DC_BITS, start=1):
        for _ in range(count):
            codes[DC_CATEGORIES[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return codes


def jpeg_lossless_sv1(img: np.ndarray) -> bytes:
    """One 8-bit gray frame as a JPEG Lossless, process 14, selection value 1 bitstream."""
    h, w = img.shape
    codes = _huffman_codes()
    x = img.astype(np.int32)
    pred = np.empty_like(x)
    pred[0, 0] = 128                          # 2^(P-1) for the very first sample
    pred[0, 1:], pred[1:, 0] = x[0, :-1], x[:-1, 0]  # first row: left; first column: above
    pred[1:, 1:] = x[1:, :-1]                 # selection value 1: left neighbour
    out, acc, nbits = bytearray(), 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, nbits
        acc, nbits = (acc << length) | (value & ((1 << length) - 1)), nbits + length
        while nbits >= 8:
            byte = (acc >> (nbits - 8)) & 0xFF
            out.extend((byte, 0) if byte == 0xFF else (byte,))  # 0xFF in entropy data is stuffed
            nbits -= 8
            acc &= (1 << nbits) - 1

    for d in (x - pred).ravel().tolist():
        category = abs(d).bit_length()
        put(*codes[category])
        if category:
            put(d if d > 0 else d + (1 << category) - 1, category)
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)  # pad with 1-bits
    sof3 = struct.pack(">HBHHBBBB", 11, 8, h, w, 1, 1, 0x11, 0)
    dht = struct.pack(">HB", 3 + 16 + len(DC_CATEGORIES), 0x00) + bytes(DC_BITS) + bytes(DC_CATEGORIES)
    sos = struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 1, 0, 0)  # predictor 1, point transform 0
    return (b"\xff\xd8\xff\xc3" + sof3 + b"\xff\xc4" + dht + b"\xff\xda" + sos + bytes(out) + b"\xff\xd9")


def _jpeg_lossless_file(tmp_path, frames: np.ndarray, name: str = "lossless.dcm"):
    ds = _raw_dataset(frames)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([jpeg_lossless_sv1(f) for f in frames])
    ds["PixelData"].VR = "OB"
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_jpeg_lossless_cine_decodes_to_the_original_pixels(tmp_path):
    frames = _cine()
    frames[0, :8] = 255  # runs of 0xFF bytes in the entropy data: byte stuffing exercised
    path = _jpeg_lossless_file(tmp_path, frames)
    decoded = list(iter_frames(path, "dicom", stride=2))
    assert [i for i, _ in decoded] == [0, 2]
    for (i, got) in decoded:
        assert np.array_equal(got, frames[i])


def _constructed(tmp_path, syntax: UID, name: str):
    """A real header in `syntax` around one encapsulated frame of bytes no decoder will be asked to read."""
    ds = _raw_dataset(_cine(1)[0])
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _rejection(path) -> Rejected:
    with pytest.raises(Rejected) as info:
        list(iter_frames(path, "dicom", stride=1))
    return info.value


def test_jpeg_lossless_without_a_plugin_is_unsupported_codec_naming_the_syntax(tmp_path, monkeypatch):
    path = _jpeg_lossless_file(tmp_path, _cine())
    decoder = get_decoder(JPEGLosslessSV1)
    monkeypatch.setattr(decoder, "_available", {})  # an installation without the dicom extra
    rej = _rejection(path)
    assert rej.reason == UNSUPPORTED_CODEC
    assert "JPEG Lossless" in str(rej) and str(JPEGLosslessSV1) in str(rej) and "dicom" in str(rej)


def test_video_syntax_is_unsupported_codec(tmp_path):
    rej = _rejection(_constructed(tmp_path, MPEG4HP41, "mpeg4.dcm"))
    assert rej.reason == UNSUPPORTED_CODEC and "MPEG-4" in str(rej) and str(MPEG4HP41) in str(rej)


def test_unknown_transfer_syntax_is_unsupported_codec(tmp_path):
    rej = _rejection(_constructed(tmp_path, UID("1.2.3.4.5.6.7"), "private.dcm"))
    assert rej.reason == UNSUPPORTED_CODEC and "1.2.3.4.5.6.7" in str(rej)


def test_garbage_in_a_decodable_syntax_is_still_a_decode_error(tmp_path):
    """The codec check must not hide real damage: an installed decoder failing stays an error
    (stage.py files it as corrupt)."""
    path = _constructed(tmp_path, JPEG2000Lossless, "damaged.dcm")
    with pytest.raises(Exception) as info:
        list(iter_frames(path, "dicom", stride=1))
    assert not isinstance(info.value, Rejected)


def test_shard_build_counts_unsupported_codecs_apart_from_corrupt_files(tmp_path, ontology):
    """Through the real builder: the decodable files become samples, the undecodable syntaxes are
    filed under `unsupported_codec` (with the syntax in the detail), a damaged file under `corrupt`."""
    import yaml

    from echocare_dist.config import load_config
    from echocare_dist.curation import build_shards
    from echocare_dist.synth.patterns import sector_frame

    folder = tmp_path / "export" / "scans"
    folder.mkdir(parents=True)
    frames = [sector_frame(320, 400, seed=60 + i)[0] for i in range(3)]
    _raw_dataset(frames[0]).save_as(folder / "raw.dcm", enforce_file_format=True)
    j2k = _raw_dataset(frames[1])
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(folder / "j2k.dcm", enforce_file_format=True)
    _jpeg_lossless_file(folder, frames[2][None], "lossless.dcm")
    _constructed(folder, MPEG4HP41, "cine-h264.dcm")
    _constructed(folder, UID("1.2.3.4.5.6.7"), "private.dcm")
    (folder / "cut.dcm").write_bytes((folder / "raw.dcm").read_bytes()[:1000])
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(yaml.safe_dump({"sources": [{"name": "clinic", "root": "export", "labels": []}]}))
    # deid off: the manifest then names the files (else it holds salted ids)
    cfg = load_config("tiny_cpu", ["curation.workers=1", "curation.near_dedup=false", "curation.deid=false"])
    manifest = build_shards([mapping], tmp_path / "shards", cfg, ontology, progress=False)

    unsupported = manifest.rejected["unsupported_codec"]
    assert unsupported["count"] == 2
    assert sorted(p.rsplit("/", 1)[-1] for p in unsupported["paths"]) == ["cine-h264.dcm", "private.dcm"]
    details = " ".join(d["detail"] for d in unsupported["details"])
    assert str(MPEG4HP41) in details and "1.2.3.4.5.6.7" in details
    corrupt = manifest.rejected.get("corrupt", {"paths": []})["paths"]
    assert [p.rsplit("/", 1)[-1] for p in corrupt] == ["cut.dcm"]
    assert manifest.per_source["clinic"] == 3  # raw, JPEG 2000 and JPEG Lossless decoded
