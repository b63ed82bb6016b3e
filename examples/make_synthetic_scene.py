"""Render a small textured room from several viewpoints, with exact cameras and depth.

The scene is ray cast with numpy only: an axis-aligned room (floor, ceiling, four walls), a
tiled cube, a striped pillar and a patchwork sphere, all procedurally textured so that local
features are distinctive, lit by one directional light with hard shadows. Shading does not
depend on the viewpoint, so a scene point has the same colour in every view.

Per-pixel work uses only +, -, *, /, sqrt, floor and comparisons in float64 (no BLAS, no
vectorised transcendental functions), so the output is reproducible bit for bit.

Example
-------
python examples/make_synthetic_scene.py --out examples/synthetic_room --num_views 8
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOM_MIN = (-4.0, 0.0, -4.0)
ROOM_MAX = (4.0, 3.0, 4.0)
HFOV_DEG = 65.0
ARC_RADIUS = 3.0
ARC_DEG = 50.0  # views spread over [-ARC_DEG, +ARC_DEG] around the vertical axis
LOOK_AT = (0.0, 0.6, -0.3)
LIGHT = (0.45, 1.0, 0.3)  # direction towards the light, world y is up
AMBIENT = 0.42
EPS = 1e-6

Vec = tuple[np.ndarray, np.ndarray, np.ndarray]  # x, y, z components, each [M]


def _normalized(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = math.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    return (v[0] / n, v[1] / n, v[2] / n)


def _cross(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


# --------------------------------------------------------------------------- textures


class Textures:
    """Seeded lookup tables behind all procedural textures."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.lattice = rng.random((8, 64, 64))  # value-noise lattices
        self.palette = 0.12 + 0.83 * rng.random((256, 3))  # saturated-ish random colours
        self.salt = rng.integers(0, 2**31, size=16, dtype=np.int64)

    def noise(self, s: np.ndarray, t: np.ndarray, layer: int) -> np.ndarray:
        """Smooth value noise in [0, 1] at lattice coordinates ``(s, t)``, each [M] -> [M]."""
        lat = self.lattice[layer]
        fs_, ft_ = np.floor(s), np.floor(t)
        fs, ft = s - fs_, t - ft_
        i0 = fs_.astype(np.int64) % 64
        j0 = ft_.astype(np.int64) % 64
        i1, j1 = (i0 + 1) % 64, (j0 + 1) % 64
        ws = fs * fs * (3.0 - 2.0 * fs)
        wt = ft * ft * (3.0 - 2.0 * ft)
        a, b, c, d = lat[j0, i0], lat[j0, i1], lat[j1, i0], lat[j1, i1]
        return a + (b - a) * ws + (c - a) * wt + (a - b - c + d) * ws * wt

    def cell_colour(self, i: np.ndarray, j: np.ndarray, k: np.ndarray, salt: int) -> np.ndarray:
        """Random palette colour for integer cell ``(i, j, k)``, each [M] -> [M, 3]."""
        h = (i.astype(np.int64) + 4096).astype(np.uint64) * np.uint64(73856093)
        h ^= (j.astype(np.int64) + 4096).astype(np.uint64) * np.uint64(19349663)
        h ^= (k.astype(np.int64) + 4096).astype(np.uint64) * np.uint64(83492791)
        h ^= np.uint64(int(self.salt[salt]))
        h ^= h >> np.uint64(13)
        h *= np.uint64(0x5BD1E995)
        h ^= h >> np.uint64(15)
        return self.palette[(h & np.uint64(255)).astype(np.int64)]


def _grout(s: np.ndarray, t: np.ndarray, width: float) -> np.ndarray:
    """1 inside a tile, 0 on the thin lines between unit tiles; [M] -> [M]."""
    fs, ft = s - np.floor(s), t - np.floor(t)
    return ((fs > width) & (fs < 1 - width) & (ft > width) & (ft < 1 - width)).astype(np.float64)


def _mosaic(tex: Textures, s: np.ndarray, t: np.ndarray, cell: float, salt: int) -> np.ndarray:
    """Random-coloured tiles of size ``cell`` with dark grout; [M] -> [M, 3]."""
    s, t = s / cell, t / cell
    col = tex.cell_colour(np.floor(s), np.floor(t), np.zeros_like(s), salt)
    g = _grout(s, t, 0.06)[:, None]
    return col * (0.25 + 0.75 * g)


def tex_floor(tex: Textures, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    s, t = x / 0.5, z / 0.5
    parity = ((np.floor(s) + np.floor(t)) % 2)[:, None]
    base = np.where(parity > 0, np.array([[0.85, 0.78, 0.62]]), np.array([[0.33, 0.22, 0.16]]))
    tint = tex.cell_colour(np.floor(s), np.floor(t), np.zeros_like(s), 0)
    grain = tex.noise(x * 6.0, z * 1.2, 0)[:, None]
    return (0.7 * base + 0.3 * tint) * (0.75 + 0.4 * grain)


def tex_coloured_noise(tex: Textures, s: np.ndarray, t: np.ndarray, layer: int) -> np.ndarray:
    chans = []
    for c in range(3):
        n = 0.65 * tex.noise(s * 1.6 + 17 * c, t * 1.6, layer + c) + 0.35 * tex.noise(
            s * 5.0, t * 5.0 + 9 * c, layer + c
        )
        chans.append(n)
    rgb = np.stack(chans, axis=1)
    return np.clip(0.1 + 1.1 * (rgb - 0.5) + 0.4, 0.0, 1.0)


def tex_far_wall(tex: Textures, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rgb = tex_coloured_noise(tex, x, y, 1)
    # three "posters" made of small random tiles
    for k, (x0, y0, w, h) in enumerate([(-3.2, 0.9, 1.4, 1.2), (-0.7, 1.1, 1.3, 1.0), (1.7, 0.7, 1.5, 1.5)]):
        inside = (x > x0) & (x < x0 + w) & (y > y0) & (y < y0 + h)
        if np.any(inside):
            rgb[inside] = _mosaic(tex, x[inside] - x0, y[inside] - y0, 0.16, 3 + k)
    return rgb


def tex_left_wall(tex: Textures, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    warp = 0.35 * tex.noise(y * 1.5, z * 0.3, 4)
    s = z / 0.22 + warp / 0.22
    col = tex.cell_colour(np.floor(s), np.zeros_like(s), np.zeros_like(s), 1)
    shade = 0.8 + 0.3 * tex.noise(z * 8.0, y * 8.0, 5)[:, None]
    return np.clip(col * shade, 0.0, 1.0)


def tex_right_wall(tex: Textures, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _mosaic(tex, z, y, 0.3, 2)


def tex_back_wall(tex: Textures, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return tex_coloured_noise(tex, x + 40.0, y, 5)


def tex_ceiling(tex: Textures, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    g = _grout(x, z, 0.02)[:, None]
    return np.broadcast_to(np.array([[0.92, 0.92, 0.88]]), (x.shape[0], 3)) * (0.55 + 0.45 * g)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Box:
    """Box rotated by ``yaw`` (radians) about the vertical axis."""

    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float
    style: str  # "mosaic" or "stripes"

    @property
    def cos_sin(self) -> tuple[float, float]:
        return round(math.cos(self.yaw), 12), round(math.sin(self.yaw), 12)

    def to_local(self, p: Vec, is_dir: bool) -> Vec:
        c, s = self.cos_sin
        x, y, z = p
        if not is_dir:
            x, y, z = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        return (c * x - s * z, y, s * x + c * z)

    def to_world_dir(self, d: Vec) -> Vec:
        c, s = self.cos_sin
        return (c * d[0] + s * d[2], d[1], -s * d[0] + c * d[2])

    def intersect(self, o: Vec, d: Vec) -> tuple[np.ndarray, np.ndarray]:
        """Nearest positive hit. Returns t [M] (inf if none) and the slab axis*2+side [M]."""
        ol, dl = self.to_local(o, False), self.to_local(d, True)
        t_near = np.full(np.broadcast(*ol, *dl).shape, -np.inf)
        t_far = np.full_like(t_near, np.inf)
        face = np.zeros(t_near.shape, dtype=np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                t1 = (-self.half[a] - ol[a]) / dl[a]
                t2 = (self.half[a] - ol[a]) / dl[a]
                lo, hi = np.minimum(t1, t2), np.maximum(t1, t2)
                side = np.where(t1 < t2, 0, 1)  # 0: entered through the -half face
                better = lo > t_near
                face = np.where(better, 2 * a + side, face)
                t_near = np.maximum(t_near, lo)
                t_far = np.minimum(t_far, hi)
        hit = (t_near <= t_far) & (t_near > EPS)
        return np.where(hit, t_near, np.inf), face

    def shade_info(self, tex: Textures, p: Vec, face: np.ndarray, salt: int) -> tuple[Vec, np.ndarray]:
        pl = self.to_local(p, False)
        axis, side = face // 2, face % 2
        sign = np.where(side == 0, -1.0, 1.0)
        zero = np.zeros_like(sign)
        nl = (
            np.where(axis == 0, sign, zero),
            np.where(axis == 1, sign, zero),
            np.where(axis == 2, sign, zero),
        )
        # 2D surface coordinates on each face, continuous across vertical edges
        s = np.where(axis == 0, pl[2] * sign, np.where(axis == 2, -pl[0] * sign, pl[0]))
        t = np.where(axis == 1, pl[2], pl[1])
        if self.style == "mosaic":
            col = _mosaic(tex, s + 10.0 * face, t, 0.15, salt)
        else:
            idx = np.floor((s + t) / 0.12)
            col = tex.cell_colour(idx, face.astype(np.float64), zero, salt)
            col = col * (0.8 + 0.3 * tex.noise(s * 9.0, t * 9.0, 6)[:, None])
        return self.to_world_dir(nl), np.clip(col, 0.0, 1.0)


@dataclass(frozen=True)
class Sphere:
    centre: tuple[float, float, float]
    radius: float

    def intersect(self, o: Vec, d: Vec) -> tuple[np.ndarray, np.ndarray]:
        ox, oy, oz = o[0] - self.centre[0], o[1] - self.centre[1], o[2] - self.centre[2]
        a = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        b = ox * d[0] + oy * d[1] + oz * d[2]
        c = ox * ox + oy * oy + oz * oz - self.radius * self.radius
        disc = b * b - a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        t0 = (-b - root) / a
        t1 = (-b + root) / a
        t = np.where(t0 > EPS, t0, t1)
        hit = (disc >= 0) & (t > EPS)
        t = np.where(hit, t, np.inf)
        return t, np.zeros(t.shape, dtype=np.int64)

    def shade_info(self, tex: Textures, p: Vec, face: np.ndarray, salt: int) -> tuple[Vec, np.ndarray]:
        n = tuple((p[a] - self.centre[a]) / self.radius for a in range(3))
        q = [n[a] * 3.2 for a in range(3)]
        col = tex.cell_colour(np.floor(q[0]), np.floor(q[1]), np.floor(q[2]), salt)
        edge = np.minimum.reduce([np.abs(q[a] - np.floor(q[a]) - 0.5) for a in range(3)])
        col = col * np.where(edge > 0.44, 0.35, 1.0)[:, None]
        return n, col


OBJECTS = (
    Box(centre=(-0.75, 0.45, 0.05), half=(0.45, 0.45, 0.45), yaw=0.45, style="mosaic"),
    Box(centre=(1.45, 0.85, -1.35), half=(0.28, 0.85, 0.28), yaw=-0.3, style="stripes"),
    Sphere(centre=(0.55, 0.55, 0.35), radius=0.55),
)

# room faces: (axis, coordinate, inward normal sign, texture)
ROOM_FACES = (
    (0, ROOM_MIN[0], 1.0, "left"),
    (0, ROOM_MAX[0], -1.0, "right"),
    (1, ROOM_MIN[1], 1.0, "floor"),
    (1, ROOM_MAX[1], -1.0, "ceiling"),
    (2, ROOM_MIN[2], 1.0, "far"),
    (2, ROOM_MAX[2], -1.0, "back"),
)


def _room_exit(o: tuple[float, float, float], d: Vec) -> tuple[np.ndarray, np.ndarray]:
    """Where rays from inside the room leave it: t [M] and the ROOM_FACES index [M]."""
    best_t = np.full(d[0].shape, np.inf)
    best_f = np.zeros(d[0].shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for a in range(3):
            t_lo = (ROOM_MIN[a] - o[a]) / d[a]
            t_hi = (ROOM_MAX[a] - o[a]) / d[a]
            t = np.where(d[a] > 0, t_hi, t_lo)
            f = np.where(d[a] > 0, 2 * a + 1, 2 * a)
            closer = t < best_t
            best_t = np.where(closer, t, best_t)
            best_f = np.where(closer, f, best_f)
    return best_t, best_f


def trace(o: tuple[float, float, float], d: Vec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit per ray. Returns t [M], surface id [M] (0..5 room, 6.. objects), face [M]."""
    t, face = _room_exit(o, d)
    sid = face.copy()
    for k, obj in enumerate(OBJECTS):
        tk, fk = obj.intersect(o, d)
        closer = tk < t
        t = np.where(closer, tk, t)
        sid = np.where(closer, 6 + k, sid)
        face = np.where(closer, fk, face)
    return t, sid, face


def _in_shadow(p: Vec, n: Vec) -> np.ndarray:
    light = _normalized(LIGHT)
    o = tuple(p[a] + 1e-4 * n[a] for a in range(3))
    d = tuple(np.full_like(p[0], light[a]) for a in range(3))
    blocked = np.zeros(p[0].shape, dtype=bool)
    for obj in OBJECTS:
        tk, _ = obj.intersect(o, d)
        blocked |= np.isfinite(tk)
    return blocked


def shade(tex: Textures, o: tuple[float, float, float], d: Vec) -> np.ndarray:
    """Colour [M, 3] in [0, 1] of the first surface along each ray."""
    t, sid, face = trace(o, d)
    p = tuple(o[a] + t * d[a] for a in range(3))
    rgb = np.zeros((t.shape[0], 3))
    nrm = [np.zeros_like(t) for _ in range(3)]
    room_tex = {
        "left": lambda q: tex_left_wall(tex, q[2], q[1]),
        "right": lambda q: tex_right_wall(tex, q[2], q[1]),
        "floor": lambda q: tex_floor(tex, q[0], q[2]),
        "ceiling": lambda q: tex_ceiling(tex, q[0], q[2]),
        "far": lambda q: tex_far_wall(tex, q[0], q[1]),
        "back": lambda q: tex_back_wall(tex, q[0], q[1]),
    }
    for s_id, (axis, _, sign, name) in enumerate(ROOM_FACES):
        m = sid == s_id
        if np.any(m):
            rgb[m] = room_tex[name](tuple(c[m] for c in p))
            nrm[axis][m] = sign
    for k, obj in enumerate(OBJECTS):
        m = sid == 6 + k
        if np.any(m):
            n, col = obj.shade_info(tex, tuple(c[m] for c in p), face[m], 8 + k)
            rgb[m] = col
            for a in range(3):
                nrm[a][m] = n[a]
    light = _normalized(LIGHT)
    lambert = np.maximum(nrm[0] * light[0] + nrm[1] * light[1] + nrm[2] * light[2], 0.0)
    facing = lambert > 0
    lit = np.zeros_like(facing)
    lit[facing] = ~_in_shadow(tuple(c[facing] for c in p), tuple(c[facing] for c in nrm))
    return rgb * (AMBIENT + (1.0 - AMBIENT) * lambert * lit)[:, None]


# --------------------------------------------------------------------------- cameras


def make_cameras(num_views: int, width: int, height: int) -> list[dict]:
    """Pinhole cameras on an arc around the room centre, OpenCV convention.

    Returns
    -------
    list[dict]
        Per view ``K`` [3, 3], ``R`` [3, 3], ``t`` [3] (world-to-camera) and centre ``C`` [3].
    """
    focal = round(0.5 * width / math.tan(math.radians(HFOV_DEG) / 2), 6)
    K = np.array([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
    cams = []
    for i in range(num_views):
        frac = 0.5 if num_views == 1 else i / (num_views - 1)
        theta = math.radians(-ARC_DEG + 2 * ARC_DEG * frac)
        centre = (
            round(ARC_RADIUS * math.sin(theta), 9),
            round(1.45 + 0.12 * (i % 3 - 1), 9),
            round(ARC_RADIUS * math.cos(theta), 9),
        )
        fwd = _normalized(tuple(LOOK_AT[a] - centre[a] for a in range(3)))
        right = _normalized(_cross(fwd, (0.0, 1.0, 0.0)))
        down = _cross(fwd, right)
        R = np.array([right, down, fwd])
        t = -np.array([sum(R[r, a] * centre[a] for a in range(3)) for r in range(3)])
        cams.append({"K": K, "R": R, "t": t, "C": centre})
    return cams


def _rays(cam: dict, u: np.ndarray, v: np.ndarray) -> Vec:
    """World ray directions with camera-z component 1, so the hit distance t is z-depth."""
    K, R = cam["K"], cam["R"]
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    return tuple(R[0, a] * x + R[1, a] * y + R[2, a] for a in range(3))


def render_view(tex: Textures, cam: dict, width: int, height: int, ss: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one view.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        RGB ``[H, W, 3]`` uint8 (``ss`` x ``ss`` supersampled) and z-depth ``[H, W]`` float64
        at pixel centres.
    """
    # pixel (c, r) covers [c - 0.5, c + 0.5]; subsamples sit at the centres of an ss x ss grid
    sub = (np.arange(ss) + 0.5) / ss - 0.5
    u = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)
    v = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)
    uu, vv = np.meshgrid(u, v)
    rgb = shade(tex, cam["C"], _rays(cam, uu.reshape(-1), vv.reshape(-1)))
    rgb = rgb.reshape(height, ss, width, ss, 3)
    acc = np.zeros((height, width, 3))
    for a in range(ss):
        for b in range(ss):
            acc = acc + rgb[:, a, :, b]
    img = np.clip(np.floor(acc / (ss * ss) * 255.0 + 0.5), 0, 255).astype(np.uint8)

    uc, vc = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    depth, _, _ = trace(cam["C"], _rays(cam, uc.reshape(-1), vc.reshape(-1)))
    return img, depth.reshape(height, width)


def generate(out: Path, num_views: int, width: int, height: int, seed: int, supersample: int = 2) -> None:
    """Render all views into ``out`` (images/, depth/, cameras.json)."""
    tex = Textures(seed)
    cams = make_cameras(num_views, width, height)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    views = []
    for i, cam in enumerate(cams):
        img, depth = render_view(tex, cam, width, height, supersample)
        name = f"view_{i:02d}"
        Image.fromarray(img).save(out / "images" / f"{name}.png", optimize=True)
        np.save(out / "depth" / f"{name}.npy", depth.astype(np.float16))
        extrinsic = np.concatenate([cam["R"], cam["t"][:, None]], axis=1)
        views.append(
            {
                "image": f"images/{name}.png",
                "depth": f"depth/{name}.npy",
                "K": (np.round(cam["K"], 9) + 0.0).tolist(),  # + 0.0 turns -0.0 into 0.0
                "extrinsic": (np.round(extrinsic, 9) + 0.0).tolist(),
            }
        )
    meta = {
        "generator": "examples/make_synthetic_scene.py",
        "seed": seed,
        "width": width,
        "height": height,
        "supersample": supersample,
        "convention": (
            "OpenCV: camera x right, y down, z forward. extrinsic = [R | t] maps world to camera, "
            "X_cam = R @ X_world + t. Pixel (u, v) = (column, row); the centre of the top-left "
            "pixel is (0, 0). World y is up, units are metres."
        ),
        "depth": "z-depth (camera z, metres) at each pixel centre, float16 .npy of shape [height, width]",
        "views": views,
    }
    text = json.dumps(meta, indent=1)
    # one matrix row per line instead of one number per line
    text = re.sub(r"\[\s+([-0-9.e+, \n]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    (out / "cameras.json").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/synthetic_room"))
    parser.add_argument("--num_views", type=int, default=8)
    parser.add_argument("--width", type=int, default=518)
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--supersample", type=int, default=2, help="anti-aliasing: rays per pixel side")
    args = parser.parse_args()
    if args.num_views < 1 or args.width < 2 or args.height < 2 or args.supersample < 1:
        parser.error("need num_views >= 1, width and height >= 2, supersample >= 1")
    generate(args.out, args.num_views, args.width, args.height, args.seed, args.supersample)
    print(f"wrote {args.num_views} views to {args.out}")


if __name__ == "__main__":
    main()
