"""Photo metadata from EXIF: when it was taken, with what camera and lens, and where.

Read with Pillow (HEIC through pillow-heif; TIFF-based RAW files such as DNG, NEF, CR2 and ARW directly, others
through the EXIF of their embedded JPEG preview). Only the header is parsed, no pixels are decoded. Anything
missing or unreadable is None; the date then falls back to the file's modification time.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime

# the columns of the images table that hold a PhotoMeta, in this order
META_COLUMNS = ("taken_at", "taken_source", "camera_make", "camera_model", "lens", "gps_lat", "gps_lon")

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_MAKE, _MODEL, _DATETIME = 0x010F, 0x0110, 0x0132
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED, _LENS_MAKE, _LENS_MODEL = 0x9003, 0x9004, 0xA433, 0xA434
_EXIF_DATE = re.compile(r"\s*(\d{4})[:\-](\d\d)[:\-](\d\d)[ T](\d\d):(\d\d):(\d\d)")


@dataclass(frozen=True)
class PhotoMeta:
    taken_at: str | None = None  # ISO 8601 local time as the camera wrote it, "2019-07-14T10:30:00" (no zone)
    taken_source: str | None = None  # "exif" (DateTimeOriginal) or "mtime" (file modification time)
    camera_make: str | None = None
    camera_model: str | None = None
    lens: str | None = None
    gps_lat: float | None = None  # decimal degrees, north positive
    gps_lon: float | None = None  # decimal degrees, east positive

    def as_row(self) -> tuple:
        return tuple(getattr(self, c) for c in META_COLUMNS)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def camera(self) -> str | None:
        """Make and model as people say it: "Canon EOS R5", not "Canon Canon EOS R5"."""
        make, model = self.camera_make or "", self.camera_model or ""
        if make and model.lower().startswith(make.split()[0].lower()):
            return model
        return " ".join(x for x in (make, model) if x) or None


def mtime_iso(mtime_ns: int) -> str:
    return datetime.fromtimestamp(mtime_ns / 1e9).replace(microsecond=0).isoformat()


def read_meta(path: str, mtime_ns: int) -> PhotoMeta:
    """The photo's metadata; never raises for a bad or vanished file (the date is then its mtime)."""
    exif = _read_exif(path)
    taken = None
    make = model = lens = None
    lat = lon = None
    if exif is not None:
        try:
            sub = exif.get_ifd(_EXIF_IFD)
        except Exception:
            sub = {}
        taken = _date(sub.get(_DATETIME_ORIGINAL)) or _date(sub.get(_DATETIME_DIGITIZED))
        make, model = _text(exif.get(_MAKE)), _text(exif.get(_MODEL))
        lens = _text(sub.get(_LENS_MODEL))
        try:
            lat, lon = _gps(exif.get_ifd(_GPS_IFD))
        except Exception:
            lat = lon = None
    if taken is not None:
        return PhotoMeta(taken, "exif", make, model, lens, lat, lon)
    return PhotoMeta(mtime_iso(mtime_ns), "mtime", make, model, lens, lat, lon)


def _read_exif(path: str):
    from PIL import Image

    from retrieval.formats import ensure_plugins, is_raw_name

    ensure_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data" and friends
        try:
            with Image.open(path) as im:
                exif = im.getexif()
                if len(exif):
                    return exif
        except Exception:
            pass
        if is_raw_name(path):
            return _raw_preview_exif(path)
    return None


def _raw_preview_exif(path: str):
    """RAW files Pillow cannot open (CR3, ORF, RW2...): the EXIF of the camera's embedded JPEG preview."""
    try:
        import rawpy
        from PIL import Image

        with rawpy.imread(os.fsdecode(path)) as raw:
            thumb = raw.extract_thumb()
        if thumb.format != rawpy.ThumbFormat.JPEG:
            return None
        with Image.open(io.BytesIO(thumb.data)) as im:
            exif = im.getexif()
            return exif if len(exif) else None
    except Exception:
        return None


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = " ".join(value.replace("\x00", " ").split())
    return value[:200] or None


def _date(value) -> str | None:
    """'2019:07:14 10:30:00' -> '2019-07-14T10:30:00'; None for blanks, '0000:00:00 ...' and garbage."""
    value = _text(value)
    m = _EXIF_DATE.match(value or "")
    if not m:
        return None
    try:
        return datetime(*(int(g) for g in m.groups())).isoformat()
    except ValueError:
        return None


def _gps(g) -> tuple[float | None, float | None]:
    if not g:
        return None, None
    lat, lon = _degrees(g.get(2), g.get(1)), _degrees(g.get(4), g.get(3))
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == 0 and lon == 0):
        return None, None  # (0, 0) is what some cameras write without a fix
    return round(lat, 7), round(lon, 7)


def _degrees(dms, ref) -> float | None:
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if any(x != x for x in (d, m, s)):  # NaN from a 0/0 rational
        return None
    value = d + m / 60 + s / 3600
    ref = _text(ref) or ""
    return -value if ref[:1].upper() in ("S", "W") else value
