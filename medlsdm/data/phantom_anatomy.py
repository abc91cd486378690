"""The shapes of one phantom subject (used by :mod:`medlsdm.data.phantom`).

:class:`Anatomy` draws the random shape parameters of a subject and maps continuous coordinates to
organ masks. Coordinates are broadcastable tensors in units of :data:`UNIT_MM` (half the in-plane
field of view): on a grid ``z`` is (D, 1, 1), ``y`` (1, H, 1) and ``x`` (1, 1, W); at scattered
points all three are (N,). Axes: x -> patient's right, y -> anterior, z -> superior (RAS).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter

UNIT_MM = 192.0
Z_HALF = 0.25  # nominal half-height of the slab in UNIT_MM units (96 mm slab)


class NoiseField:
    """A smooth random field of about unit variance, defined at any coordinates.

    Gaussian-smoothed white noise on a coarse lattice (``cell`` units apart) that covers the nominal
    field of view, interpolated trilinearly: the field does not depend on the output resolution.
    """

    HALF_EXTENT = (0.4, 1.2, 1.2)  # (z, y, x) in units

    def __init__(self, rng: np.random.Generator, cell: float) -> None:
        size = [math.ceil(2 * e / cell) + 1 for e in self.HALF_EXTENT]
        self.half = [(n - 1) * cell / 2 for n in size]
        noise = torch.from_numpy(rng.standard_normal(size, dtype=np.float32))[None, None]
        smooth = GaussianFilter(3, 1.0)(noise)
        self.lattice = smooth / smooth.std()  # (1, 1, Lz, Ly, Lx)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x, y, z = torch.broadcast_tensors(x, y, z)
        grid = torch.stack([x / self.half[2], y / self.half[1], z / self.half[0]], -1).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(self.lattice, grid, mode="bilinear", padding_mode="border", align_corners=True)
        return out.reshape(x.shape)


def ellipsoid(x, y, z, c, r) -> torch.Tensor:
    """Normalised ellipsoid radius (< 1 inside) around centre ``c`` with radii ``r``."""
    return (((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2).sqrt()


class Anatomy:
    """The random shape of one subject; each method maps coordinates to masks or fields."""

    def __init__(self, rng: np.random.Generator) -> None:
        u = rng.uniform
        # body: superelliptic cylinder, flatter at the back, radii drifting slowly along z
        self.body_c = (u(-0.04, 0.04), u(-0.06, 0.04))
        self.body_r = (u(0.68, 0.84), u(0.52, 0.64))
        self.back = u(0.85, 0.95)
        self.body_p, self.taper = u(2.0, 2.8), u(-0.3, 0.3)
        self.body_wobble, self.fat_wobble = NoiseField(rng, 0.3), NoiseField(rng, 0.15)
        self.fat = u(0.045, 0.09)  # subcutaneous fat thickness in units (9-17 mm)
        # spine: vertebral bodies with posterior arches, stacked along z with disc gaps
        self.rv, self.rc = u(0.085, 0.11), u(0.035, 0.045)
        self.spine_c = (self.body_c[0] + u(-0.03, 0.03), self.body_c[1] - self.body_r[1] * self.back + u(0.33, 0.38))
        self.period, self.disc, self.vert_phase = u(0.13, 0.16), u(0.03, 0.045), u(0, 1)
        sx, sy = self.spine_c
        self.aorta = (sx - u(0.05, 0.09), sy + self.rv + u(0.06, 0.08), u(0.04, 0.055))
        self.ivc = (sx + u(0.1, 0.15), sy + self.rv + u(0.03, 0.05), u(0.045, 0.06))
        # liver: deformed ellipsoid on the patient's right (+x) with a left lobe crossing the midline
        self.liver_c = (u(0.3, 0.42), u(0.0, 0.15), u(-0.08, 0.08))
        self.liver_r = (u(0.3, 0.4), u(0.28, 0.38), u(0.3, 0.45))
        self.lobe = u(0.4, 0.6)
        self.liver_wobble = NoiseField(rng, 0.12)
        # kidneys: oblique bean shapes either side of the spine; sometimes only one
        sides = [1.0, -1.0] if rng.random() > 0.15 else [float(rng.choice([1.0, -1.0]))]
        self.kidneys = [
            dict(
                side=s,
                c=(sx + s * u(0.25, 0.32), sy + u(-0.04, 0.06), u(-0.1, 0.1)),
                r=(u(0.13, 0.17), u(0.08, 0.1), u(0.22, 0.3)),
                angle=s * math.radians(u(25, 45)),
                lobes=int(rng.integers(4, 7)),
                phase=u(0, 2 * math.pi),
            )
            for s in sides
        ]
        self.kidney_wobble = NoiseField(rng, 0.08)
        # unlabelled texture regions: visceral fat and bowel gas
        self.visceral, self.visceral_thr = NoiseField(rng, 0.05), u(0.5, 1.1)
        self.gas = [
            ((u(-0.6, 0.15), u(0.0, 0.45), u(-Z_HALF, Z_HALF)), [u(0.02, 0.05) for _ in range(3)])
            for _ in range(int(rng.integers(3, 12)))
        ]
        # lesions and vessels, placed at random points inside the liver
        n_lesions = int(rng.choice(4, p=[0.15, 0.4, 0.3, 0.15]))
        self.lesions = [(p, [u(0.05, 0.1) * u(0.8, 1.2) for _ in range(3)]) for p in self._liver_points(rng, n_lesions)]
        self.lesion_wobble = NoiseField(rng, 0.04)
        dirs = rng.normal(size=(6, 3))
        points = self._liver_points(rng, int(rng.integers(3, 7)))
        self.vessels = [(p, d / np.linalg.norm(d), u(0.015, 0.028)) for p, d in zip(points, dirs)]

    # --- body, spine, great vessels ------------------------------------------------------------------
    def body_rho(self, x, y, z) -> torch.Tensor:
        """Normalised body radius: < 1 inside the skin."""
        (cx, cy), (ax, ay), p = self.body_c, self.body_r, self.body_p
        s = 1 + self.taper * z
        ay = torch.where(y > cy, ay, ay * self.back)
        rho = ((x - cx).abs() / (ax * s)) ** p + ((y - cy).abs() / (ay * s)) ** p
        return rho ** (1 / p) + 0.03 * self.body_wobble(x, y, z)

    def inner(self, x, y, z, body_rho=None) -> torch.Tensor:
        """Inside the subcutaneous fat layer."""
        rho = self.body_rho(x, y, z) if body_rho is None else body_rho
        thickness = self.fat * (1 + 0.35 * self.fat_wobble(x, y, z)).clamp(0.7, 1.6)
        return rho < 1 - thickness / min(self.body_r[0], self.body_r[1] * self.back)

    def spine(self, x, y, z) -> dict[str, torch.Tensor]:
        """Masks ``bone`` (vertebrae), ``disc`` (intervertebral gaps) and ``canal`` (spinal canal)."""
        (sx, sy), rv, rc = self.spine_c, self.rv, self.rc
        vertebra = torch.remainder(z / self.period + self.vert_phase, 1.0) > self.disc / self.period
        centrum = torch.hypot(x - sx, (y - sy) / 0.9) < rv
        canal_y = sy - rv - 0.9 * rc
        dc = torch.hypot(x - sx, y - canal_y)
        arch = (dc >= rc) & (dc < rc + 0.028)
        spinous = ((x - sx) / 0.02) ** 2 + ((y - canal_y + rc + 0.045) / 0.05) ** 2 < 1
        transverse = (((x - sx).abs() - 0.09) / 0.065) ** 2 + ((y - canal_y) / 0.02) ** 2 < 1
        bone = (centrum | arch | spinous | transverse) & vertebra
        return dict(bone=bone, disc=centrum & ~vertebra, canal=dc < rc)

    def great_vessels(self, x, y, z) -> torch.Tensor:
        """Aorta (value 1) and inferior vena cava (value 2); 0 elsewhere."""
        (ax, ay, ar), (vx, vy, vr) = self.aorta, self.ivc
        aorta = torch.hypot(x - ax - 0.03 * z, y - ay) < ar
        ivc = torch.hypot((x - vx) / 1.3, (y - vy) / 0.8) < vr
        return aorta.to(torch.uint8) + 2 * (ivc & ~aorta).to(torch.uint8)

    # --- organs --------------------------------------------------------------------------------------
    def kidney(self, k: dict, x, y, z) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask, clean normalised radius, in-plane angle) of one kidney."""
        (cx, cy, cz), r, a = k["c"], k["r"], k["angle"]
        dx, dy = x - cx, y - cy
        u, v = math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy
        rho = ellipsoid(u, v, z, (0, 0, cz), r)
        hx, hy = -k["side"] * 0.8, 0.6  # the hilum faces medially and anteriorly
        hilum = ellipsoid(x, y, z, (cx + hx * r[1], cy + hy * r[1], cz), (0.5 * r[1], 0.5 * r[1], 0.45 * r[2])) < 1
        mask = (rho + 0.05 * self.kidney_wobble(x, y, z) < 1) & ~hilum
        return mask, rho, torch.atan2(v, u)

    def liver_shape(self, x, y, z) -> torch.Tensor:
        """The deformed liver before anything else (kidneys, spine, vessels, body wall) cuts it."""
        c, r = self.liver_c, self.liver_r
        lobe_c, lobe_r = (c[0] - 0.85 * r[0], c[1] + 0.35 * r[1], c[2]), (self.lobe * r[0], 0.45 * r[1], 0.8 * r[2])
        rho = torch.minimum(ellipsoid(x, y, z, c, r), ellipsoid(x, y, z, lobe_c, lobe_r))
        return rho + 0.15 * self.liver_wobble(x, y, z) < 1

    def liver(self, x, y, z) -> torch.Tensor:
        """Liver label at any coordinates: its shape inside the body wall, minus what overrides it."""
        other = self.spine(x, y, z)["bone"] | (self.great_vessels(x, y, z) > 0)
        for k in self.kidneys:
            other = other | self.kidney(k, x, y, z)[0]
        return self.liver_shape(x, y, z) & self.inner(x, y, z) & ~other

    def _liver_points(self, rng: np.random.Generator, n: int) -> list[np.ndarray]:
        """Up to ``n`` random points inside the liver and the slab."""
        (cx, cy, _), (rx, ry, _) = self.liver_c, self.liver_r
        lo, hi = np.array([cx - rx, cy - ry, -0.8 * Z_HALF]), np.array([cx + rx, cy + ry, 0.8 * Z_HALF])
        pts = rng.uniform(lo, hi, size=(256, 3))
        t = torch.from_numpy(pts).float()
        inside = self.liver(t[:, 0], t[:, 1], t[:, 2]).numpy()
        return list(pts[inside][:n])

    def lesions_mask(self, x, y, z) -> torch.Tensor:
        out = torch.zeros((), dtype=torch.bool)
        if self.lesions:
            wobble = 0.12 * self.lesion_wobble(x, y, z)
            for c, r in self.lesions:
                out = out | (ellipsoid(x, y, z, c, r) + wobble < 1)
        return out

    def gas_mask(self, x, y, z) -> torch.Tensor:
        """Small bowel-gas pockets in the anterior left abdomen (unlabelled)."""
        out = torch.zeros((), dtype=torch.bool)
        for c, r in self.gas:
            out = out | (ellipsoid(x, y, z, c, r) < 1)
        return out

    def vessels_mask(self, x, y, z) -> torch.Tensor:
        """Thin straight tubes through the liver (unlabelled)."""
        out = torch.zeros((), dtype=torch.bool)
        for p, d, r in self.vessels:
            wx, wy, wz = x - p[0], y - p[1], z - p[2]
            along = wx * d[0] + wy * d[1] + wz * d[2]
            out = out | ((wx**2 + wy**2 + wz**2) - along**2 < r * r)
        return out
