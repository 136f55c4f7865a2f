"""Search filters on photo metadata: date taken, camera, place. They select image ids from SQLite, which the
search hands to FAISS as an id selector, so a filtered search still returns k results when k match.

Dates are ISO: YYYY, YYYY-MM, YYYY-MM-DD or a full date and time. Both ends are inclusive of the period named:
`after="2019-06", before="2019-08"` is June through August 2019.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from retrieval.errors import RetrievalError

EARTH_RADIUS_KM = 6371.0088
DEFAULT_KM = 10.0


@dataclass(frozen=True)
class PhotoFilter:
    after: str | None = None  # ISO lower bound of taken_at (inclusive)
    before: str | None = None  # ISO exclusive upper bound of taken_at (the end of the period named)
    camera: str | None = None  # case-insensitive substring of make + model
    near: tuple[float, float] | None = None
    km: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.after, self.before, self.camera, self.near))

    @classmethod
    def make(cls, after=None, before=None, camera=None, near=None, km=None) -> "PhotoFilter":
        """Validated from user input (strings, dates, a (lat, lon) pair or "LAT,LON"); RetrievalError if bad."""
        lo = _period(after, "--after")[0] if after not in (None, "") else None
        hi = _period(before, "--before")[1] if before not in (None, "") else None
        if lo is not None and hi is not None and lo >= hi:
            raise RetrievalError(f"--after {after} is not before --before {before}: no date can match")
        camera = camera.strip() if isinstance(camera, str) and camera.strip() else None
        point = parse_near(near) if near not in (None, "") else None
        if km is not None:
            if point is None:
                raise RetrievalError("--km needs --near LAT,LON")
            km = float(km)
            if not (km > 0 and math.isfinite(km)):
                raise RetrievalError(f"--km must be a positive distance, got {km:g}")
        elif point is not None:
            km = DEFAULT_KM
        return cls(lo, hi, camera, point, km)

    def image_ids(self, store) -> list[int]:
        """Ids of the images that pass, from the images table."""
        if not store.has_photo_meta():
            raise RetrievalError(
                "this index has no photo metadata yet (made by an older version): "
                "run `retrieval index` on its folders once to read it; nothing is re-encoded"
            )
        where, args = ["meta_hash IS NOT NULL"], []
        if self.after is not None:
            where.append("taken_at >= ?")
            args.append(self.after)
        if self.before is not None:
            where.append("taken_at < ?")
            args.append(self.before)
        if self.camera is not None:
            where.append("instr(lower(coalesce(camera_make, '') || ' ' || coalesce(camera_model, '')), ?) > 0")
            args.append(self.camera.lower())
        cols = "id"
        if self.near is not None:
            lat, lon = self.near
            dlat = math.degrees(self.km / EARTH_RADIUS_KM)
            where.append("gps_lat BETWEEN ? AND ?")
            args += [lat - dlat, lat + dlat]  # a cheap box first; the exact distance below
            cols = "id, gps_lat, gps_lon"
        rows = store.db.execute(f"SELECT {cols} FROM images WHERE {' AND '.join(where)}", args)
        if self.near is None:
            return [r[0] for r in rows]
        return [i for i, la, lo in rows if lo is not None and haversine_km(self.near, (la, lo)) <= self.km]


def haversine_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def parse_near(value) -> tuple[float, float]:
    if isinstance(value, str):
        parts = value.replace(" ", "").split(",")
    else:
        parts = list(value) if isinstance(value, (tuple, list)) else []
    try:
        if len(parts) != 2:
            raise ValueError
        lat, lon = float(parts[0]), float(parts[1])
    except (TypeError, ValueError):
        raise RetrievalError(
            f"--near must be LAT,LON in decimal degrees (e.g. 48.8584,2.2945), got {value!r}"
        ) from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise RetrievalError(f"--near {lat:g},{lon:g} is not on Earth (latitude -90..90, longitude -180..180)")
    return lat, lon


def _period(value, flag: str) -> tuple[str, str]:
    """(start, exclusive end) of the period a date names, as ISO strings comparable with taken_at."""
    if isinstance(value, datetime):
        start = value.replace(tzinfo=None)  # taken_at is the camera's local time, without a zone
        end = start + timedelta(seconds=1)
    elif isinstance(value, date):
        start = datetime(value.year, value.month, value.day)
        end = start + timedelta(days=1)
    else:
        text = str(value).strip()
        try:
            if len(text) == 4 and text.isdigit():
                start = datetime(int(text), 1, 1)
                end = datetime(start.year + 1, 1, 1)
            elif len(text) == 7 and text[4] == "-":
                start = datetime(int(text[:4]), int(text[5:]), 1)
                end = datetime(start.year + (start.month == 12), start.month % 12 + 1, 1)
            elif len(text) == 10:
                start = datetime.fromisoformat(text)
                end = start + timedelta(days=1)
            else:
                start = datetime.fromisoformat(text).replace(tzinfo=None)
                end = start + timedelta(seconds=1)
        except ValueError:
            raise RetrievalError(
                f"{flag} must be an ISO date (2019, 2019-07, 2019-07-14 or 2019-07-14T10:30), got {text!r}"
            ) from None
    return start.replace(microsecond=0).isoformat(), end.replace(microsecond=0).isoformat()
