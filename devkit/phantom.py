"""An analytic abdominal CT phantom defined in patient coordinates (mm, DICOM LPS).

Shapes live in physical space, so any voxel grid (any origin, spacing, field of view or
slice thickness) samples the same anatomy; that is what lets a test compare a model's
output on one series with the truth of another. Every seed jitters positions, sizes and
enhancement a little, so a model trained on many seeds generalises to an unseen one.

LPS: +x is the patient's left, +y posterior, +z superior (head). Arrays sampled on a grid
are indexed [z, y, x].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Truth label ids. Later entries override earlier ones where shapes overlap (the tumour
# overrides the kidney, the ureter overrides both).
STRUCTURES: dict[str, int] = {
    "body": 1,
    "liver": 2,
    "spleen": 3,
    "kidney_left": 4,
    "kidney_right": 5,
    "kidney_tumor": 6,
    "aorta": 7,
    "inferior_vena_cava": 8,
    "ureter_left": 9,
    "ureter_right": 10,
    "vertebra": 11,
}

# Tissue classes that change the HU but not the truth: they all belong to "body".
TISSUES: dict[str, int] = {**STRUCTURES, "fat": 12, "muscle": 13}

PHASES = ("N", "A", "P", "D")

# Mean HU per tissue and phase (N non-contrast, A arterial, P portal venous, D delayed).
_PHASE_HU: dict[str, tuple[float, float, float, float]] = {
    "body": (30, 35, 45, 40),
    "liver": (55, 70, 110, 80),
    "spleen": (50, 75, 115, 80),
    "kidney_left": (30, 160, 180, 130),
    "kidney_right": (30, 160, 180, 130),
    "kidney_tumor": (35, 80, 90, 70),
    "aorta": (40, 300, 160, 100),
    "inferior_vena_cava": (40, 70, 150, 100),
    "ureter_left": (20, 25, 40, 500),
    "ureter_right": (20, 25, 40, 500),
    "vertebra": (700, 700, 700, 700),
    "fat": (-100, -100, -100, -100),
    "muscle": (50, 55, 60, 55),
}
AIR_HU = -1000.0

_TRUTH_OF_TISSUE = np.zeros(256, dtype=np.uint8)
for _name, _tissue_id in TISSUES.items():
    _TRUTH_OF_TISSUE[_tissue_id] = STRUCTURES.get(_name, STRUCTURES["body"])


def truth_from_tissues(tissues: np.ndarray) -> np.ndarray:
    """Map a tissue map (``TISSUES`` ids) to truth labels (``STRUCTURES`` ids)."""
    return _TRUTH_OF_TISSUE[tissues]


def grid_points(
    origin_lps: Sequence[float],
    spacing_zyx: Sequence[float],
    shape_zyx: Sequence[int],
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Physical LPS positions (float64 [z, y, x, 3]) of the voxel centres of a grid.

    ``direction`` is a 3x3 matrix whose columns are the LPS unit vectors of the column (x),
    row (y) and slice (z) index axes, as in SimpleITK; identity means axial HFS slices with
    ImageOrientationPatient 1\\0\\0\\0\\1\\0 stacked towards the head.
    """
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape_zyx), indexing="ij")
    steps = np.stack([i * spacing_zyx[2], j * spacing_zyx[1], k * spacing_zyx[0]], axis=-1)
    return np.asarray(origin_lps, dtype=np.float64) + steps @ direction.T


# --- shapes -----------------------------------------------------------------------------
# Each shape answers "inside?" for broadcastable x, y, z arrays, so the same code serves a
# list of points and a separable grid (1-D axes broadcast against each other).


@dataclass(frozen=True)
class _Ellipsoid:
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle_rad: float = 0.0  # rotation about z, in the axial plane

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        r = max(self.semi_axes[0], self.semi_axes[1])
        half = np.array([r, r, self.semi_axes[2]])
        c = np.array(self.center)
        return c - half, c + half

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy, dz = x - self.center[0], y - self.center[1], z - self.center[2]
        c, s = np.cos(self.angle_rad), np.sin(self.angle_rad)
        u, v = c * dx + s * dy, -s * dx + c * dy
        a, b, h = self.semi_axes
        return (u / a) ** 2 + (v / b) ** 2 + (dz / h) ** 2 <= 1.0


@dataclass(frozen=True)
class _EllipticCylinder:
    center_xy: tuple[float, float]
    semi_axes_xy: tuple[float, float]
    z_range: tuple[float, float] = (-1e4, 1e4)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        (cx, cy), (a, b) = self.center_xy, self.semi_axes_xy
        return (
            np.array([cx - a, cy - b, self.z_range[0]]),
            np.array([cx + a, cy + b, self.z_range[1]]),
        )

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        (cx, cy), (a, b) = self.center_xy, self.semi_axes_xy
        in_plane = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
        return in_plane & (z >= self.z_range[0]) & (z <= self.z_range[1])


@dataclass(frozen=True)
class _Tube:
    """A tube of constant radius around a polyline (the ureters)."""

    path: tuple[tuple[float, float, float], ...]
    radius: float

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        p = np.array(self.path)
        return p.min(axis=0) - self.radius, p.max(axis=0) + self.radius

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        result = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), bool)
        for a, b in zip(self.path[:-1], self.path[1:], strict=True):
            d = np.subtract(b, a)
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / float(d @ d), 0.0, 1.0)
            dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
            result |= dist2 <= self.radius**2
        return result


_Shape = _Ellipsoid | _EllipticCylinder | _Tube


@dataclass(frozen=True)
class _Paint:
    tissue: int
    shape: _Shape
    clip: _Shape | None = None  # paint only inside this shape too (organs stay in the body)


class Phantom:
    """One synthetic patient: anatomy and enhancement jittered by ``seed``.

    Attributes worth knowing: ``z_extent_mm`` (the craniocaudal range that covers the
    kidneys and ureters), ``tumor_side`` ("left" or "right") and ``noise_hu``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        rng = np.random.default_rng([self.seed, 0x50A7])
        self._paints, self.z_extent_mm, self.tumor_side = _build_anatomy(rng)
        self.noise_hu = float(rng.uniform(10.0, 15.0))
        # Bolus strength varies between patients: scale the enhancement above baseline.
        self._enhancement = float(rng.uniform(0.95, 1.05))
        self._baseline_shift = rng.uniform(-3.0, 3.0, size=len(TISSUES) + 1)

    # -- sampling --------------------------------------------------------------------------

    def tissues(self, points_lps: np.ndarray) -> np.ndarray:
        """Tissue ids (``TISSUES``, uint8) at arbitrary LPS points [..., 3]."""
        pts = np.asarray(points_lps, dtype=np.float64)
        flat = pts.reshape(-1, 3)
        out = np.zeros(flat.shape[0], dtype=np.uint8)
        for paint in self._paints:
            lo, hi = _bbox(paint)
            idx = np.flatnonzero(np.all((flat >= lo) & (flat <= hi), axis=1))
            if idx.size == 0:
                continue
            x, y, z = flat[idx, 0], flat[idx, 1], flat[idx, 2]
            hit = paint.shape.inside(x, y, z)
            if paint.clip is not None:
                hit &= paint.clip.inside(x, y, z)
            out[idx[hit]] = paint.tissue
        return out.reshape(pts.shape[:-1])

    def tissues_on_grid(
        self,
        origin_lps: Sequence[float],
        spacing_zyx: Sequence[float],
        shape_zyx: Sequence[int],
    ) -> np.ndarray:
        """Tissue ids on an axis-aligned grid (identity direction), [z, y, x] uint8.

        Much faster than ``tissues(grid_points(...))``: each shape is evaluated only on the
        sub-block its bounding box covers, with separable 1-D coordinate axes.
        """
        if min(spacing_zyx) <= 0:
            raise ValueError(
                f"spacing {tuple(spacing_zyx)} must be positive on an axis-aligned grid"
            )
        # LPS x, y, z of the voxel centres along each index axis (ascending, for searchsorted).
        axes = [origin_lps[a] + np.arange(shape_zyx[2 - a]) * spacing_zyx[2 - a] for a in range(3)]
        out = np.zeros(tuple(shape_zyx), dtype=np.uint8)
        for paint in self._paints:
            lo, hi = _bbox(paint)
            sl = []
            for a in range(3):
                i0 = int(np.searchsorted(axes[a], lo[a], side="left"))
                i1 = int(np.searchsorted(axes[a], hi[a], side="right"))
                sl.append(slice(i0, i1))
            if any(s.start >= s.stop for s in sl):
                continue
            x = axes[0][sl[0]][None, None, :]
            y = axes[1][sl[1]][None, :, None]
            z = axes[2][sl[2]][:, None, None]
            hit = paint.shape.inside(x, y, z)
            if paint.clip is not None:
                hit = hit & paint.clip.inside(x, y, z)
            block = out[sl[2], sl[1], sl[0]]
            block[hit] = paint.tissue
        return out

    def labels(self, points_lps: np.ndarray) -> np.ndarray:
        """Truth labels (``STRUCTURES`` ids, uint8) at LPS points [..., 3]."""
        return truth_from_tissues(self.tissues(points_lps))

    def labels_on_grid(
        self,
        origin_lps: Sequence[float],
        spacing_zyx: Sequence[float],
        shape_zyx: Sequence[int],
    ) -> np.ndarray:
        """Truth labels on an axis-aligned grid, [z, y, x] uint8."""
        return truth_from_tissues(self.tissues_on_grid(origin_lps, spacing_zyx, shape_zyx))

    # -- intensities -----------------------------------------------------------------------

    def mean_hu(self, phase: str) -> np.ndarray:
        """Noise-free HU per tissue id (a lookup table of 256 entries) for ``phase``."""
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r} is not one of {PHASES}")
        p = PHASES.index(phase)
        lut = np.full(256, AIR_HU, dtype=np.float32)
        for name, tissue_id in TISSUES.items():
            values = _PHASE_HU[name]
            base = values[0] + self._baseline_shift[tissue_id]
            if name in ("vertebra", "fat"):
                base = values[0]
            lut[tissue_id] = base + (values[p] - values[0]) * self._enhancement
        return lut

    def hu(
        self,
        labels: np.ndarray,
        phase: str,
        rng: np.random.Generator,
        noise_hu: float | None = None,
    ) -> np.ndarray:
        """HU (float32, same shape as ``labels``) as a CT in ``phase`` would show them.

        ``labels`` may be a tissue map (``tissues*``; fat and muscle then look like fat and
        muscle) or a truth map (``labels*``; the body is then plain soft tissue). Gaussian
        noise of ``noise_hu`` (default: this patient's ``noise_hu``) is added.
        """
        values = self.mean_hu(phase)[labels]
        sigma = self.noise_hu if noise_hu is None else noise_hu
        if sigma > 0:
            noise = rng.standard_normal(size=values.shape, dtype=np.float32)
            noise *= np.float32(sigma)
            values += noise
        return values


def _bbox(paint: _Paint) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = paint.shape.bbox()
    if paint.clip is not None:
        clo, chi = paint.clip.bbox()
        lo, hi = np.maximum(lo, clo), np.minimum(hi, chi)
    return lo, hi


def _build_anatomy(rng: np.random.Generator) -> tuple[list[_Paint], tuple[float, float], str]:
    """Place the organs for one patient; returns paints in override order."""

    def jit(scale: float) -> float:
        return float(rng.uniform(-scale, scale))

    def size(value: float, rel: float = 0.1) -> float:
        return value * float(rng.uniform(1.0 - rel, 1.0 + rel))

    t = TISSUES
    body_c = (jit(8), 10 + jit(8))
    body_ab = (size(165, 0.08), size(120, 0.08))
    fat_mm = float(rng.uniform(12, 25))
    outer = _EllipticCylinder(body_c, body_ab)
    inner = _EllipticCylinder(body_c, (body_ab[0] - fat_mm, body_ab[1] - fat_mm))

    spine_y = body_c[1] + body_ab[1] - fat_mm - 50 + jit(4)
    vertebra = _EllipticCylinder((jit(3), spine_y), (size(21), size(17)))
    psoas = [
        _EllipticCylinder((s * (38 + jit(3)), spine_y - 2 + jit(3)), (size(15), size(17)))
        for s in (1, -1)
    ]
    aorta_r = size(11, 0.12)
    aorta = _EllipticCylinder((16 + jit(4), spine_y - 32 + jit(4)), (aorta_r, aorta_r))
    ivc = _EllipticCylinder((-24 + jit(4), spine_y - 34 + jit(4)), (size(13), size(10)))

    kidneys: dict[str, _Ellipsoid] = {}
    perirenal: list[_Ellipsoid] = []
    for side, s, z0 in (("left", 1, 12.0), ("right", -1, -4.0)):
        c = (s * (74 + jit(6)), spine_y + jit(6), z0 + jit(8))
        semi = (size(26), size(22), size(52))
        angle = s * np.deg2rad(20 + jit(8))
        kidneys[side] = _Ellipsoid(c, semi, angle)
        perirenal.append(_Ellipsoid(c, (semi[0] + 9, semi[1] + 9, semi[2] + 10), angle))

    liver = _Ellipsoid(
        (-68 + jit(8), -5 + jit(8), 78 + jit(8)), (size(75), size(88), size(75)), jit(0.2)
    )
    spleen = _Ellipsoid(
        (82 + jit(6), spine_y - 12 + jit(6), 62 + jit(8)),
        (size(30), size(42), size(45)),
        np.deg2rad(-35 + jit(10)),
    )

    tumor_side = "left" if rng.random() < 0.5 else "right"
    kidney = kidneys[tumor_side]
    tumor_r = float(rng.uniform(7.5, 17.5))
    # Put the tumour centre near the kidney surface, away from the hilum (medial side).
    while True:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        lateral = d[0] * (1 if tumor_side == "left" else -1)
        if lateral > -0.2:
            break
    depth = float(rng.uniform(0.55, 0.9))
    c, sn = np.cos(kidney.angle_rad), np.sin(kidney.angle_rad)
    u, v, w = (d * np.array(kidney.semi_axes) * depth).tolist()
    tumor_c = (
        kidney.center[0] + c * u - sn * v,
        kidney.center[1] + sn * u + c * v,
        kidney.center[2] + w,
    )
    tumor = _Ellipsoid(tumor_c, (size(tumor_r, 0.15), size(tumor_r, 0.15), size(tumor_r, 0.15)))

    z_end = -125.0 + jit(5)
    ureters = {}
    for side, s in (("left", 1), ("right", -1)):
        k = kidneys[side]
        kx, ky, kz = k.center
        r = float(rng.uniform(2.0, 3.0))
        path = (
            (kx - s * 0.35 * k.semi_axes[0], ky - 2, kz - 8),  # renal pelvis
            (kx - s * (k.semi_axes[0] + 6), ky - 10 + jit(3), kz - 22),  # hilum exit
            (s * (44 + jit(4)), spine_y - 20 + jit(3), kz - 70 + jit(6)),  # on psoas
            (s * (38 + jit(4)), spine_y - 24 + jit(4), z_end),
        )
        ureters[side] = _Tube(path, r)

    paints = [
        _Paint(t["fat"], outer),
        _Paint(t["body"], inner),
        *(_Paint(t["muscle"], p) for p in psoas),
        _Paint(t["liver"], liver, clip=inner),
        _Paint(t["spleen"], spleen, clip=inner),
        *(_Paint(t["fat"], p) for p in perirenal),
        _Paint(t["kidney_left"], kidneys["left"]),
        _Paint(t["kidney_right"], kidneys["right"]),
        _Paint(t["kidney_tumor"], tumor, clip=inner),
        _Paint(t["aorta"], aorta),
        _Paint(t["inferior_vena_cava"], ivc),
        _Paint(t["ureter_left"], ureters["left"]),
        _Paint(t["ureter_right"], ureters["right"]),
        _Paint(t["vertebra"], vertebra),
    ]
    z_top = max(k.center[2] + k.semi_axes[2] for k in kidneys.values()) + 10.0
    return paints, (z_end - 5.0, z_top), tumor_side
