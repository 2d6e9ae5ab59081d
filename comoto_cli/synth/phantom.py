"""Breast phantoms for ``comoto synth``: cheap numpy models of DBT volumes and mammograms (docs/design.md section 7).

The model, in the order it is built:

- *Breast outline*: a half ellipse against the chest wall (one image edge), with a thickness profile that
  falls to zero at the skin: a compressed breast is thinner at its periphery, so the outer DBT slices show
  air there and a mammogram darkens towards the edge. MLO views add a pectoral muscle triangle at the
  chest wall.
- *Anatomical background*: a 3-D Gaussian random field with a power-law spectrum 1/f^beta (beta about 3,
  the value measured on real mammograms), made at low resolution (that spectrum has almost no fine detail,
  so nothing is lost) and pushed through a sigmoid into a fibroglandular fraction per voxel.
- *Imaging*: a mammogram is the projection (sum) of all layers, so overlapping tissue hides lesions; a DBT
  slice shows its own layer sharp plus every other layer attenuated and blurred by an amount growing with the
  distance in depth (the tomosynthesis out-of-plane artefact). Lesions go through the same operator at full
  resolution, so they are sharp over a few slices around their centre and fade away.
- *Lesions*: soft-edged elliptical masses (lobulated boundary; some spiculated) and clusters of small bright
  calcifications. A radiologist only boxes what stands out from its surroundings, so a lesion's amplitude is
  raised when needed until the mean inside its box exceeds the mean of the ring around it (see
  :func:`ring_around`); otherwise the contrast is moderate, comparable to glandular tissue.
- *Noise*: signal-dependent (Poisson-like) noise, slightly correlated in DBT (reconstruction); a skin line.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``; boxes are integer
``(x0, y0, x1, y1)`` pixel edges. Everything is generated in the *canonical* orientation (chest wall at the
left edge, x = 0) and mirrored for right breasts, so image laterality follows the official pixel rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

# ------------------------------------------------------------------------------------------------ fields


def power_law_field(
    rng: np.random.Generator, shape: tuple[int, ...], beta: float, axis_scale=None
) -> np.ndarray:
    """Gaussian random field whose power spectrum falls as 1/|f|^beta; zero mean, unit standard deviation.

    ``axis_scale`` stretches frequencies per axis (a value > 1 shortens the correlation along that axis).
    """
    scale = axis_scale or (1.0,) * len(shape)
    grids = [np.fft.fftfreq(n) * s for n, s in zip(shape[:-1], scale[:-1])]
    grids.append(np.fft.rfftfreq(shape[-1]) * scale[-1])
    k2 = np.zeros([len(g) for g in grids], dtype=np.float64)
    for axis, g in enumerate(grids):
        k2 = k2 + (g.reshape([-1 if a == axis else 1 for a in range(len(shape))]) ** 2)
    k2.flat[0] = np.inf  # no DC: the mean is set by the caller
    amplitude = (k2 ** (-beta / 4.0)).astype(np.float32)
    spectrum = np.fft.rfftn(rng.standard_normal(shape, dtype=np.float32)) * amplitude
    out = np.fft.irfftn(spectrum, s=shape, axes=tuple(range(len(shape))))
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _interp_index(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation (low index, high index, weight of high) aligning pixel centres, like a resize."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int64)
    return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)


def resize_bilinear(images: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of the last two axes (float32), by gathers: far cheaper than matrix products."""
    images = images.astype(np.float32, copy=False)
    lo, hi, wt = _interp_index(rows, images.shape[-2])
    wt = wt[:, None]
    tall = images[..., lo, :] * (1 - wt) + images[..., hi, :] * wt
    lo, hi, wt = _interp_index(cols, images.shape[-1])
    return tall[..., lo] * (1 - wt) + tall[..., hi] * wt


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _freq2(rows: int, cols: int) -> np.ndarray:
    fy = np.fft.fftfreq(rows)[:, None]
    fx = np.fft.rfftfreq(cols)[None, :]
    return fy**2 + fx**2


def _freq_y(rows: int, cols: int) -> np.ndarray:
    """|f_y| on the grid of :func:`_freq2` (the sweep axis of the DBT acquisition is y)."""
    return np.broadcast_to(np.abs(np.fft.fftfreq(rows))[:, None], (rows, cols // 2 + 1))


# ------------------------------------------------------------------------------------------------ breast


@dataclass
class Breast:
    """Half-ellipse breast against the chest wall at x = 0 (canonical orientation), full-resolution pixels."""

    rows: int
    cols: int
    a: float  # extent from the chest wall towards the nipple
    b: float  # half height
    cy: float
    mlo: bool
    pec_x: float = 0.0
    pec_y: float = 0.0

    @staticmethod
    def sample(rng: np.random.Generator, rows: int, cols: int, mlo: bool, width: float | None = None) -> Breast:
        """``width``: the field width the breast's depth is a fraction of (default ``cols``; a wider field of the
        same pixels gives less, so the breast keeps its physical size)."""
        width = cols if width is None else width
        a = width * rng.uniform(0.70, 0.88)
        b = rows * (rng.uniform(0.43, 0.48) if mlo else rng.uniform(0.38, 0.46))
        cy = rows * (0.5 + rng.uniform(-0.025, 0.025))
        pec = (width * rng.uniform(0.18, 0.32), rows * rng.uniform(0.35, 0.55)) if mlo else (0.0, 0.0)
        return Breast(rows, cols, a, b, cy, mlo, *pec)

    def radius(self, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        """Normalised elliptical radius (1 at the skin) on a grid of the given size covering the image."""
        rows, cols = rows or self.rows, cols or self.cols
        y = (np.arange(rows, dtype=np.float32) + 0.5) * (self.rows / rows)
        x = (np.arange(cols, dtype=np.float32) + 0.5) * (self.cols / cols)
        return np.sqrt((x[None, :] / self.a) ** 2 + ((y[:, None] - self.cy) / self.b) ** 2)

    @staticmethod
    def thickness(r: np.ndarray) -> np.ndarray:
        """Relative compressed thickness: 1 in the body of the breast, falling to 0 at the skin (r = 1)."""
        edge = np.clip((r - 0.6) / 0.4, 0.0, 1.0)
        return np.sqrt(np.clip(1.0 - edge**2, 0.0, 1.0))

    def pectoral(self) -> np.ndarray:
        """Soft pectoral-muscle triangle in the upper chest-wall corner (zeros for CC views)."""
        if not self.mlo:
            return np.zeros((self.rows, self.cols), dtype=np.float32)
        y = np.arange(self.rows, dtype=np.float32)[:, None] + 0.5
        x = np.arange(self.cols, dtype=np.float32)[None, :] + 0.5
        signed = 1.0 - x / self.pec_x - y / self.pec_y  # > 0 inside the triangle
        return np.clip(signed * min(self.pec_x, self.pec_y) / 2.0, 0.0, 1.0).astype(np.float32)

    def inside(self, x: float, y: float, limit: float) -> bool:
        return (x / self.a) ** 2 + ((y - self.cy) / self.b) ** 2 < limit**2


# ------------------------------------------------------------------------------------------------ lesions


@dataclass
class Lesion:
    """One lesion: centre (continuous pixels), size, kind and its integer box (x0, y0, x1, y1)."""

    kind: str  # "mass", "spiculated" or "calcification"
    x: float
    y: float
    rx: float
    ry: float
    angle: float
    slice: int | None = None
    half_depth: int = 0
    dots: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # calcification (dx, dy, sigma)
    spicules: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))  # (angle, length, width)
    amplitude: float = 1.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def radius(self) -> float:
        return float(math.sqrt(self.rx * self.ry))

    def half_extent(self) -> tuple[float, float]:
        if self.kind == "calcification":
            ext_x = float(np.max(np.abs(self.dots[:, 0]) + 2 * self.dots[:, 2])) + 1.0
            ext_y = float(np.max(np.abs(self.dots[:, 1]) + 2 * self.dots[:, 2])) + 1.0
            return ext_x, ext_y
        c, s = math.cos(self.angle), math.sin(self.angle)
        # a drawn box hugs the visible body of the mass (the soft edge reaches about 1.1 radii)
        return 1.1 * math.hypot(self.rx * c, self.ry * s), 1.1 * math.hypot(self.rx * s, self.ry * c)

    def set_box(self, rows: int, cols: int) -> None:
        hx, hy = self.half_extent()
        x0 = max(0, math.floor(self.x - hx))
        y0 = max(0, math.floor(self.y - hy))
        x1 = min(cols, math.ceil(self.x + hx))
        y1 = min(rows, math.ceil(self.y + hy))
        self.box = (x0, y0, x1, y1)

    def mirrored(self, cols: int) -> Lesion:
        """The same lesion after a left-right mirror of an image ``cols`` wide."""
        x0, y0, x1, y1 = self.box
        dots = self.dots.copy()
        dots[:, 0] = -dots[:, 0]
        spicules = self.spicules.copy()
        spicules[:, 0] = math.pi - spicules[:, 0]
        return Lesion(
            self.kind,
            cols - self.x,
            self.y,
            self.rx,
            self.ry,
            math.pi - self.angle,
            self.slice,
            self.half_depth,
            dots,
            spicules,
            self.amplitude,
            (cols - x1, y0, cols - x0, y1),
        )


def sample_lesion(rng: np.random.Generator, kind: str, cols: int, size_range: tuple[float, float]) -> Lesion:
    """Shape of a new lesion (position set later). Sizes are fractions of the image width, log-uniform."""
    size = cols * math.exp(rng.uniform(math.log(size_range[0]), math.log(size_range[1])))
    if kind == "calcification":
        n = int(rng.integers(7, 18))
        spread = max(size / 4.0, 3.0)
        dxy = rng.normal(0.0, spread / 1.6, size=(n, 2)).clip(-spread, spread)
        sig = rng.uniform(0.6, 1.1, size=(n, 1)) * max(1.0, cols / 700)
        return Lesion(kind, 0.0, 0.0, spread, spread, 0.0, dots=np.concatenate([dxy, sig], axis=1))
    r = size / 2.0
    elong = rng.uniform(1.0, 1.5)
    lesion = Lesion(kind, 0.0, 0.0, r * math.sqrt(elong), r / math.sqrt(elong), rng.uniform(0, math.pi))
    if kind == "spiculated":
        n = int(rng.integers(7, 15))
        lesion.spicules = np.stack(
            [
                rng.uniform(0, 2 * math.pi, n),
                r * rng.uniform(1.4, 2.4, n),
                rng.uniform(0.7, 1.3, n) * max(1.0, cols / 800),
            ],
            axis=1,
        )
    return lesion


def lesion_profile(
    lesion: Lesion,
    size: int,
    scale: float,
    rng_phase: np.ndarray,
    with_spicules: bool,
    offset: tuple[float, float],
) -> np.ndarray:
    """In-plane density of a lesion on a square ``size`` patch; ``scale`` shrinks it (off-centre layers).

    ``offset`` is the lesion centre inside the patch (continuous pixels). Calcifications are handled apart.
    """
    y = np.arange(size, dtype=np.float32)[:, None] + 0.5 - offset[1]
    x = np.arange(size, dtype=np.float32)[None, :] + 0.5 - offset[0]
    c, s = math.cos(lesion.angle), math.sin(lesion.angle)
    u, v = x * c + y * s, -x * s + y * c
    phi = np.arctan2(v, u)
    # lobulated boundary: low-order harmonics of the radius with random phases
    lobes = 1.0 + 0.08 * np.cos(3 * phi + rng_phase[0]) + 0.05 * np.cos(5 * phi + rng_phase[1])
    d = np.sqrt((u / (lesion.rx * scale)) ** 2 + (v / (lesion.ry * scale)) ** 2) / lobes
    edge = 0.12 if lesion.kind == "mass" else 0.07
    body = _sigmoid((1.0 - d) / edge) * (0.7 + 0.3 * np.sqrt(np.clip(1.0 - d**2, 0.0, 1.0)))
    if with_spicules and len(lesion.spicules):
        spic = np.zeros_like(body)
        for ang, length, width in lesion.spicules:
            t = x * math.cos(ang) + y * math.sin(ang)
            perp = -x * math.sin(ang) + y * math.cos(ang)
            fade = np.clip(1.0 - t / length, 0.0, 1.0) * (t > 0)
            spic = np.maximum(spic, 0.55 * fade * np.exp(-0.5 * (perp / width) ** 2))
        body = np.maximum(body, spic * scale)
    return body.astype(np.float32)


def stamp_gaussian(image: np.ndarray, x: float, y: float, sigma: float, amplitude: float) -> None:
    """Add a small Gaussian spot in place (calcifications), clipped to the image."""
    rad = math.ceil(3 * sigma) + 1
    xi, yi = math.floor(x), math.floor(y)
    y0, y1 = max(0, yi - rad), min(image.shape[0], yi + rad + 1)
    x0, x1 = max(0, xi - rad), min(image.shape[1], xi + rad + 1)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - y
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - x
    image[y0:y1, x0:x1] += amplitude * np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)


def ring_around(box: tuple[int, int, int, int], rows: int, cols: int) -> tuple[slice, slice, np.ndarray]:
    """The region around a box used to judge conspicuity: the box grown by half its size on every side
    (clipped to the image). Returns the region's slices and a boolean mask of the ring (region minus box)."""
    x0, y0, x1, y1 = box
    gx, gy = max(2, (x1 - x0) // 2), max(2, (y1 - y0) // 2)
    rx0, ry0, rx1, ry1 = max(0, x0 - gx), max(0, y0 - gy), min(cols, x1 + gx), min(rows, y1 + gy)
    ring = np.ones((ry1 - ry0, rx1 - rx0), dtype=bool)
    ring[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = False
    return slice(ry0, ry1), slice(rx0, rx1), ring


def box_minus_ring(image: np.ndarray, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """(mean inside the box - mean of its ring, standard deviation in the ring) of a 2-D image."""
    rows, cols = image.shape
    sy, sx, ring = ring_around(box, rows, cols)
    region = image[sy, sx]
    inside = region[~ring]
    outside = region[ring]
    return float(inside.mean() - outside.mean()), float(outside.std())


def _place(rng: np.random.Generator, lesion: Lesion, breast: Breast, placed: list[Lesion]) -> bool:
    """Put ``lesion`` inside the breast body, away from the image edges and other lesions."""
    hx, hy = lesion.half_extent()
    for _ in range(60):
        r = math.sqrt(rng.uniform(0.05, 0.55))
        theta = rng.uniform(-math.pi / 2, math.pi / 2)
        x = breast.a * r * math.cos(theta)
        y = breast.cy + breast.b * r * math.sin(theta)
        margin = 1.0 * max(hx, hy) + 2
        if x - margin < 0.04 * breast.cols or y - margin < 0 or y + margin > breast.rows:
            continue
        if not breast.inside(x, y, 0.72):
            continue
        if any(math.hypot(x - o.x, y - o.y) < 2.5 * (max(hx, hy) + max(o.half_extent())) for o in placed):
            continue
        lesion.x, lesion.y = x, y
        lesion.set_box(breast.rows, breast.cols)
        return True
    return False


# ------------------------------------------------------------------------------------------------ DBT


@dataclass
class DbtParams:
    """Imaging parameters of the DBT model (full-resolution pixels unless stated)."""

    lowres: int = 2  # tissue field made at 1/lowres resolution
    inplane_sigma: float = 1.0  # reconstruction blur of the in-focus plane
    blur_per_slice: float = (
        0.012  # out-of-plane blur growth, as a fraction of the width per slice of distance
    )
    out_of_plane_weight: float = 0.45  # weight of the adjacent layer; decays with depth distance
    out_of_plane_decay: float = 3.0  # slices
    noise: float = 0.035  # relative noise standard deviation at the mean breast signal
    # lesion density relative to glandular tissue (1). At 0.6-1.0 a DBT-only student trained on 10 % of the demo
    # patients stayed near chance (0.09 mean sensitivity); 1.0-1.6 puts it at about 0.2 (all patients: 0.74).
    lesion_contrast: tuple[float, float] = (1.0, 1.6)
    tissue_gain: float = 0.9  # display gain of the glandular fraction after the depth operator
    size_range: tuple[float, float] = (0.05, 0.16)  # lesion box side, fraction of the image width
    # Limited-angle acquisition (the "realistic" domain gap): 0 keeps the isotropic out-of-plane blur above. N > 0:
    # a layer d slices away is seen as N copies shifted along the sweep axis (y) by d * slice spacing * tan(angle)
    # for N angles evenly over +- sweep_half_angle (shift-and-add: the blur and ripple of a reconstruction), with
    # only cross_sweep_fraction of the isotropic blur left across it.
    sweep_projections: int = 0
    sweep_half_angle: float = 7.5  # degrees (a 15-degree sweep)
    cross_sweep_fraction: float = 0.25
    slice_spacing_px: float = 0.0  # full-resolution pixels between slices; set per volume by dbt_volume


def _depth_operator(
    freq2: np.ndarray, distance: np.ndarray, sigma0: float, growth: float, p: DbtParams,
    fy: np.ndarray | None = None, pixel_scale: float = 1.0,
) -> np.ndarray:
    """Fourier transfer function (len(distance), *freq2.shape) of a layer seen from a slice ``distance`` away.

    Sigmas are in the pixels of the grid ``freq2`` was made for; ``fy`` (|f_y| on that grid) and ``pixel_scale``
    (full-resolution pixels per grid pixel) are needed by the limited-angle model (``p.sweep_projections``)."""
    d = np.abs(distance).astype(np.float64)
    weight = np.where(d == 0, 1.0, p.out_of_plane_weight * np.exp(-(d - 1) / p.out_of_plane_decay))
    if p.sweep_projections <= 0:
        sigma = sigma0 + growth * d
        return weight[:, None, None] * np.exp(-2 * math.pi**2 * sigma[:, None, None] ** 2 * freq2[None])
    sigma = sigma0 + p.cross_sweep_fraction * growth * d
    out = weight[:, None, None] * np.exp(-2 * math.pi**2 * sigma[:, None, None] ** 2 * freq2[None])
    comb = np.zeros_like(out)
    for shift in sweep_shifts(p) / pixel_scale:  # the projections' copies, d * shift grid pixels along y
        comb += np.cos(2 * math.pi * fy[None] * (d * shift)[:, None, None])
    return out * (comb / p.sweep_projections)


def sweep_shifts(p: DbtParams) -> np.ndarray:
    """Shift along the sweep axis per slice of depth distance, full-resolution pixels, one per projection."""
    angles = np.radians(np.linspace(-p.sweep_half_angle, p.sweep_half_angle, p.sweep_projections))
    return p.slice_spacing_px * np.tan(angles)


def _slice_reach(depth: np.ndarray) -> np.ndarray:
    """Thickness a slice at relative ``depth`` (-0.5..0.5) needs to lie inside the breast: outer slices cut
    the thinner periphery (a broader plateau than a pure ellipse; the compression paddle flattens it)."""
    return (1.4 * np.abs(depth) ** 1.5).astype(np.float32)[:, None, None]


def _operator_norm(slices: int, p: DbtParams) -> float:
    """Total weight of the depth operator seen by a central slice, so that gains do not depend on depth."""
    return 1.0 + 2 * sum(
        p.out_of_plane_weight * math.exp(-(d - 1) / p.out_of_plane_decay) for d in range(1, slices // 2 + 1)
    )


def dbt_volume(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    slices: int,
    view: str,
    kinds: list[str],
    n_calc_distractors: int,
    params: DbtParams | None = None,
) -> tuple[np.ndarray, list[Lesion], tuple[float, float]]:
    """One DBT volume in the official reader frame: uint16 (slices, rows, cols) with 12-bit values.

    ``view`` is ``lcc``/``lmlo``/``rcc``/``rmlo``; the chest wall is on the left edge for left views and the
    right edge for right views, so the official pixel laterality rule agrees with the view. ``kinds`` lists
    the boxed lesions to insert ("mass", "spiculated"). Returns the volume, the lesions (official frame, with
    boxes and central slices) and the VOI window (centre, width).
    """
    p = params or DbtParams()
    if p.sweep_projections > 0 and p.slice_spacing_px <= 0:
        # A 50 mm compressed breast over the slices, a 200 mm field over the columns.
        p = replace(p, slice_spacing_px=(50.0 / slices) / (200.0 / cols))
    breast = Breast.sample(rng, rows, cols, mlo=view.endswith("mlo"))
    f = p.lowres
    h, w = -(-rows // f), -(-cols // f)
    depth = (np.arange(slices) + 0.5) / slices - 0.5  # -0.5..0.5 through the compressed breast

    # --- tissue: 3-D power-law field -> glandular fraction, only where the breast is thick enough
    field3 = power_law_field(rng, (slices, h, w), beta=3.0, axis_scale=(3.0, 1.0, 1.0))
    density = rng.uniform(-0.6, 0.9)  # higher = more fat
    r_low = breast.radius(h, w)
    gland = _sigmoid((field3 - density - 1.2 * r_low[None]) / 0.35)
    t_low = Breast.thickness(r_low)
    gland *= np.clip((t_low[None] - _slice_reach(depth)) / 0.05, 0.0, 1.0)
    spec = np.fft.rfft2(gland)
    freq_low = _freq2(h, w)
    dist = np.arange(slices)
    transfer = _depth_operator(freq_low, dist, p.inplane_sigma / f, p.blur_per_slice * cols / f, p,
                               fy=_freq_y(h, w), pixel_scale=f)
    mixed = np.empty_like(spec)
    for z in range(slices):
        mixed[z] = np.einsum("kyx,kyx->yx", transfer[np.abs(z - dist)], spec)
    gain = p.tissue_gain / _operator_norm(slices, p)
    tissue = resize_bilinear(np.fft.irfft2(mixed, s=(h, w)).astype(np.float32) * gain, rows, cols)

    r = breast.radius()
    thick = Breast.thickness(r)
    masks = np.clip((thick[None] - _slice_reach(depth)) / 0.04, 0.0, 1.0).astype(np.float32)
    pec = breast.pectoral()
    image = masks * (0.30 + tissue + 0.3 * pec[None])
    # skin line: a thin brighter band just inside the breast outline
    skin_w = max(1.5, 0.006 * cols)
    skin = ((r > 1 - skin_w / min(breast.a, breast.b)) & (r < 1)).astype(np.float32)
    image += 0.12 * skin[None] * masks

    # --- lesions: rendered at full resolution through the same depth operator
    lesions: list[Lesion] = []
    for kind in kinds:
        lesion = sample_lesion(rng, kind, cols, p.size_range)
        if not _place(rng, lesion, breast, lesions):
            continue
        lesion.slice = int(
            rng.integers(max(1, round(slices * 0.3)), min(slices - 1, round(slices * 0.7)) + 1)
        )
        lesion.half_depth = int(np.clip(round(lesion.radius / (0.05 * cols) * 1.5), 1, 3))
        _render_dbt_lesion(rng, image, lesion, p, cols, gain)
        lesions.append(lesion)
    for _ in range(n_calc_distractors):  # unboxed benign calcifications: bright, but not lesions
        calc = sample_lesion(rng, "calcification", cols, (0.03, 0.08))
        if _place(rng, calc, breast, lesions):
            calc.slice = int(rng.integers(0, slices))
            _render_dbt_calcs(image, calc, rng.uniform(0.8, 1.4), p, cols)

    # --- noise (Poisson-like, correlated by the reconstruction) and 12-bit quantisation
    signal = np.clip(image, 0, None)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise[:, :, 1:] += noise[:, :, :-1]  # correlated along the sweep, as reconstruction noise is
    noise *= np.float32(1 / math.sqrt(2))
    image += np.float32(p.noise) * np.sqrt(signal * np.float32(1 / 0.6) + np.float32(0.02)) * noise
    image *= np.float32(2400)
    image += np.float32(60.5)  # + 0.5: truncation below rounds to nearest
    volume = np.clip(image, 0, 4095).astype(np.uint16)
    centre_vals = volume[slices // 2][masks[slices // 2] > 0.5]
    lo, hi = np.percentile(centre_vals, [0.5, 99.7]) if centre_vals.size else (0.0, 4095.0)
    window = (float(round((lo + hi) / 2)), float(max(2.0, round(hi - lo))))

    if view[0].lower() == "r":  # right breasts: chest wall on the right edge
        volume = np.ascontiguousarray(volume[:, :, ::-1])
        lesions = [lesion.mirrored(cols) for lesion in lesions]
    return volume, lesions, window


def _render_dbt_lesion(
    rng: np.random.Generator, image: np.ndarray, lesion: Lesion, p: DbtParams, cols: int, gain: float
) -> None:
    slices, rows, _ = image.shape
    hx, hy = lesion.half_extent()
    spic = float(lesion.spicules[:, 1].max()) if len(lesion.spicules) else 0.0
    reach = max(hx, hy, spic) + 3 * (p.inplane_sigma + p.blur_per_slice * cols * 4) + 4
    size = int(2 ** math.ceil(math.log2(2 * reach)))
    ox, oy = math.floor(lesion.x) - size // 2, math.floor(lesion.y) - size // 2
    offset = (lesion.x - ox, lesion.y - oy)
    phase = rng.uniform(0, 2 * math.pi, 2)
    layers = np.arange(lesion.slice - lesion.half_depth, lesion.slice + lesion.half_depth + 1)
    layers = layers[(layers >= 0) & (layers < slices)]
    profiles = []
    for k in layers:
        dk = abs(int(k) - lesion.slice)
        scale = math.sqrt(max(0.05, 1.0 - (dk / (lesion.half_depth + 1)) ** 2))
        profiles.append(lesion_profile(lesion, size, scale, phase, with_spicules=dk <= 1, offset=offset))
    spec = np.fft.rfft2(np.stack(profiles))
    freq = _freq2(size, size)
    reach_z = lesion.half_depth + 6
    out_slices = np.arange(max(0, lesion.slice - reach_z), min(slices, lesion.slice + reach_z + 1))
    contributions = np.empty((len(out_slices), size, size), dtype=np.float32)
    for i, z in enumerate(out_slices):
        transfer = _depth_operator(freq, z - layers, p.inplane_sigma, p.blur_per_slice * cols, p,
                                   fy=_freq_y(size, size))
        contributions[i] = np.fft.irfft2((transfer * spec).sum(axis=0), s=(size, size))
    # placement of the patch in the image (the patch may hang over the edges)
    y0, x0 = max(0, oy), max(0, ox)
    y1, x1 = min(rows, oy + size), min(image.shape[2], ox + size)
    py, px = slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)
    centre = int(np.flatnonzero(out_slices == lesion.slice)[0])
    unit = np.zeros((rows, image.shape[2]), dtype=np.float32)
    unit[y0:y1, x0:x1] = contributions[centre][py, px]
    background_delta, ring_std = box_minus_ring(image[lesion.slice], lesion.box)
    unit_delta, _ = box_minus_ring(unit, lesion.box)
    amplitude = rng.uniform(*p.lesion_contrast) * gain
    # conspicuity floor: the boxed lesion must stand out from its ring on its central slice
    needed = (0.6 * ring_std + 0.02 - background_delta) / max(unit_delta, 1e-6)
    lesion.amplitude = float(max(amplitude, needed))
    image[out_slices, y0:y1, x0:x1] += lesion.amplitude * contributions[:, py, px]


def _render_dbt_calcs(image: np.ndarray, calc: Lesion, amplitude: float, p: DbtParams, cols: int) -> None:
    """Calcifications are tiny: a slice away shows them blurred, as an analytic Gaussian of the same mass."""
    slices = image.shape[0]
    sweep = p.sweep_projections > 0
    # Limited angle: one copy per projection along the sweep axis, each with 1/N of the weight (the ripple of a
    # calcification a few slices away); otherwise one isotropic blur.
    shifts = sweep_shifts(p) if sweep else np.zeros(1)
    for z in range(max(0, calc.slice - 3), min(slices, calc.slice + 4)):
        d = abs(z - calc.slice)
        weight = 1.0 if d == 0 else p.out_of_plane_weight * math.exp(-(d - 1) / p.out_of_plane_decay)
        blur = p.inplane_sigma + (p.cross_sweep_fraction if sweep else 1.0) * p.blur_per_slice * cols * d
        for dx, dy, sigma in calc.dots:
            s_eff = math.hypot(sigma, blur)
            for shift in shifts:
                stamp_gaussian(image[z], calc.x + dx, calc.y + dy + d * shift, s_eff,
                               amplitude * weight * (sigma / s_eff) ** 2 / len(shifts))


# ------------------------------------------------------------------------------------------------ mammography


@dataclass
class MammoParams:
    """Mammography model: sharper, less noisy and with a different contrast curve than DBT."""

    lowres: int = 2
    layers: int = 8
    noise: float = 0.012
    # Projected lesion density, in layers of glandular tissue. Tuned so that a small detector trained on a few
    # hundred mammograms learns them (the teacher premise of CoMoTo: plentiful, informative mammography).
    lesion_contrast: tuple[float, float] = (2.2, 3.4)
    calc_amplitude: tuple[float, float] = (1.4, 2.2)
    size_range: tuple[float, float] = (0.05, 0.16)
    gamma: float = 0.75
    # The field's width over a DBT field's (realistic domain gap: 1.07): breast and lesion sizes, fractions of the
    # width, are taken of the DBT-sized width so that they keep their physical size.
    field_width: float = 1.0


def mammogram(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    laterality: str,
    view: str,
    density: int,
    kinds: list[str],
    params: MammoParams | None = None,
) -> tuple[np.ndarray, list[Lesion]]:
    """One mammogram as presented (bright = dense), float32 in [0, 1], with its lesions (stored frame).

    ``density`` 0..3 is the BI-RADS density category A..D; ``kinds`` the findings ("mass", "spiculated",
    "calcification"). The left breast's chest wall is on the left edge, the right one's on the right.
    """
    p = params or MammoParams()
    width = cols / p.field_width
    breast = Breast.sample(rng, rows, cols, mlo=view.upper() == "MLO", width=width)
    f = p.lowres
    h, w = -(-rows // f), -(-cols // f)
    depth = (np.arange(p.layers) + 0.5) / p.layers - 0.5
    field3 = power_law_field(rng, (p.layers, h, w), beta=3.0, axis_scale=(3.0, 1.0, 1.0))
    r_low = breast.radius(h, w)
    threshold = [1.3, 0.7, 0.2, -0.3][density] + rng.uniform(-0.15, 0.15)
    gland = _sigmoid((field3 - threshold - 1.2 * r_low[None]) / 0.35)
    gland *= np.clip((Breast.thickness(r_low)[None] - _slice_reach(depth)) / 0.05, 0, 1)
    projection = resize_bilinear(gland.sum(axis=0, keepdims=True), rows, cols)[0]

    r = breast.radius()
    thick = Breast.thickness(r)
    attenuation = 2.0 * thick + 0.55 * projection + 1.6 * breast.pectoral() * (thick > 0)
    lesions: list[Lesion] = []
    for kind in kinds:
        lesion = sample_lesion(rng, kind, width, p.size_range if kind != "calcification" else (0.04, 0.09))
        if not _place(rng, lesion, breast, lesions):
            continue
        _render_mammo_lesion(rng, attenuation, lesion, p)
        lesions.append(lesion)
    for _ in range(int(rng.integers(0, 3))):  # scattered benign calcifications, not findings
        calc = sample_lesion(rng, "calcification", width, (0.03, 0.06))
        if _place(rng, calc, breast, lesions):
            for dx, dy, sigma in calc.dots[: max(2, len(calc.dots) // 3)]:
                stamp_gaussian(attenuation, calc.x + dx * 3, calc.y + dy * 3, sigma, rng.uniform(0.5, 1.0))

    # presentation: log-domain signal with a contrast curve; skin made visible by peripheral equalisation
    present = np.where(thick > 0, 0.18 + 0.55 * (attenuation / 4.5) ** p.gamma, 0.0).astype(np.float32)
    skin_band = (thick > 0) & (r > 1 - max(1.5, 0.005 * cols) / min(breast.a, breast.b))
    present += 0.12 * skin_band
    noise = rng.standard_normal(present.shape, dtype=np.float32)
    present += p.noise * np.sqrt(0.3 + present) * noise * (thick > 0) + 0.004 * noise * (thick <= 0)
    present = np.clip(present, 0.0, 1.0)
    if laterality.upper() == "R":
        present = np.ascontiguousarray(present[:, ::-1])
        lesions = [lesion.mirrored(cols) for lesion in lesions]
    return present, lesions


def _render_mammo_lesion(
    rng: np.random.Generator, attenuation: np.ndarray, lesion: Lesion, p: MammoParams
) -> None:
    rows, cols = attenuation.shape
    unit = np.zeros_like(attenuation)
    if lesion.kind == "calcification":
        for dx, dy, sigma in lesion.dots:
            stamp_gaussian(unit, lesion.x + dx, lesion.y + dy, sigma, 1.0)
        amplitude = rng.uniform(*p.calc_amplitude)
    else:
        hx, hy = lesion.half_extent()
        spic = float(lesion.spicules[:, 1].max()) if len(lesion.spicules) else 0.0
        size = int(2 * (max(hx, hy, spic) + 4))
        ox, oy = math.floor(lesion.x) - size // 2, math.floor(lesion.y) - size // 2
        patch = lesion_profile(
            lesion, size, 1.0, rng.uniform(0, 2 * math.pi, 2), True, (lesion.x - ox, lesion.y - oy)
        )
        # a projection integrates the mass through its depth: thicker in the middle
        y0, x0, y1, x1 = max(0, oy), max(0, ox), min(rows, oy + size), min(cols, ox + size)
        unit[y0:y1, x0:x1] = patch[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        amplitude = rng.uniform(*p.lesion_contrast)
    background_delta, ring_std = box_minus_ring(attenuation, lesion.box)
    unit_delta, _ = box_minus_ring(unit, lesion.box)
    needed = (0.8 * ring_std + 0.05 - background_delta) / max(unit_delta, 1e-6)
    lesion.amplitude = float(max(amplitude, needed))
    attenuation += lesion.amplitude * unit
