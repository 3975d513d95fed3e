"""Which compressed DICOM transfer syntaxes this installation can decode.

pydicom decodes uncompressed data and RLE itself; JPEG Lossless, JPEG-LS and JPEG 2000 need a
plugin (the `dicom` extra: pylibjpeg + pylibjpeg-libjpeg + pylibjpeg-openjpeg + pyjpegls), and
video syntaxes (MPEG-2, MPEG-4/H.264, HEVC) have no pixel decoder in pydicom at all. A file in a
syntax nothing here decodes is rejected as `unsupported_codec` naming the syntax, before any
decoding: it is a fact about the installation, not damage to the file, so it must not be
counted as `corrupt` (installing the plugin and rebuilding recovers it).
"""
from __future__ import annotations

from .preprocess import Rejected

UNSUPPORTED_CODEC = "unsupported_codec"
INSTALL_HINT = "pip install 'echocare-dist[dicom]'"


def transfer_syntax(ds):
    """The file's transfer syntax as a pydicom UID, or None when the file meta does not state it
    (read with force=True: pydicom then assumes an uncompressed syntax)."""
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    value = getattr(value, "value", value)
    return UID(str(value).strip()) if value else None


def check_decodable(ds) -> None:
    """Rejected(UNSUPPORTED_CODEC) when the pixel data of `ds` is in a syntax nothing here decodes."""
    from pydicom.pixels.decoders.base import get_decoder

    uid = transfer_syntax(ds)
    if uid is None:
        return
    if not uid.is_transfer_syntax:
        raise Rejected(UNSUPPORTED_CODEC, f"transfer syntax {uid} is not one pydicom knows "
                                          f"(a private or mistyped UID): cannot decode the pixel data")
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise Rejected(UNSUPPORTED_CODEC, f"transfer syntax {uid.name} ({uid}): pydicom has no pixel decoder "
                                          f"for it (video syntaxes need the frames exported first)") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise Rejected(UNSUPPORTED_CODEC, f"transfer syntax {uid.name} ({uid}): no decoder installed "
                                          f"(needs {needs}; {INSTALL_HINT})")
