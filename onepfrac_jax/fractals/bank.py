"""The 1p-frac class bank: one σ-factor system, L Δ-perturbed classes, rendered sharded over all devices.

Keys: everything derives from `jax.random.key(seed)` by `fold_in`, and a class's perturbation from
(class index, re-draw count) alone, so the bank is bitwise the same on any number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import ifs, render
from onepfrac_jax.parallel.mesh import DATA, data_sharding, make_data_mesh, replicated

# fold_in constants that split the seed into independent streams
_IFS_STREAM, _PERTURB_STREAM, _RENDER_STREAM = 0, 1, 2
_REDRAW_PER_DEVICE = 8


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """Everything that determines a bank (the generate / pre-train config's fractal fields)."""

    # 11: chosen from seeds 0-15 by rendering 64 classes each: no class fails the fill check and the classes
    # keep the base shape (median IoU 0.43 with it at 256²) — the paper's "one fractal" look.
    seed: int = 11
    num_classes: int = 1000
    num_maps: int = 2
    sigma: float = 3.5  # σ₀: σ ~ U(σ₀ − 0.1, σ₀ + 0.1); smaller = more complex shape
    delta: float = 0.1
    perturbation: str = "multiplicative"  # or "additive" (the paper's text)
    image_size: int = 512
    pad: int = 6
    num_points: int = 100_000
    draw_mode: str = "patch"
    fill_threshold: float = 0.05  # a class must cover more than this fraction of the canvas
    max_redraws: int = 100  # fresh perturbations tried per class before giving up
    classes_per_call: int = 32  # classes per device call (rounded up to the device count): small calls stay in cache

    @classmethod
    def from_config(cls, config, renamed: dict[str, str] | None = None) -> BankSpec:
        """The spec named by a config's fields: each field is the config key of the same name, or renamed[field]."""
        renamed = renamed or {}
        return cls(**{f.name: config[renamed.get(f.name, f.name)] for f in dataclasses.fields(cls)})

    def validate(self) -> None:
        """Raises ConfigError with one clear message for the first invalid field."""
        n = self.num_maps
        checks = [
            (n >= 1, f"num_maps={n} must be ≥ 1"),
            (0 < self.sigma < 3 * n, f"sigma={self.sigma} must lie in (0, 3·num_maps) = (0, {3 * n})"),
            (self.delta >= 0, f"delta={self.delta} must be ≥ 0"),
            (
                self.perturbation != "multiplicative" or self.delta < 1,
                f"delta={self.delta} must be < 1 in multiplicative mode (factors U(1−Δ, 1+Δ) would flip signs)",
            ),
            (
                self.perturbation in ifs.PERTURBATIONS,
                f"perturbation={self.perturbation!r} is not one of {ifs.PERTURBATIONS}",
            ),
            (self.num_classes > 0, f"num_classes={self.num_classes} must be > 0"),
            (self.image_size >= 16, f"image_size={self.image_size} must be ≥ 16"),
            (self.pad >= 1, f"pad={self.pad} must be ≥ 1 (the 3×3 patch reaches one pixel past a point)"),
            (self.image_size - 2 * self.pad >= 8, f"pad={self.pad} leaves no canvas in image_size={self.image_size}"),
            (self.num_points > 0, f"num_points={self.num_points} must be > 0"),
            (self.draw_mode in render.DRAW_MODES, f"draw_mode={self.draw_mode!r} is not one of {render.DRAW_MODES}"),
            (0 <= self.fill_threshold < 1, f"fill_threshold={self.fill_threshold} must lie in [0, 1)"),
            (self.max_redraws >= 0, f"max_redraws={self.max_redraws} must be ≥ 0"),
            (self.classes_per_call > 0, f"classes_per_call={self.classes_per_call} must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclasses.dataclass
class FractalBank:
    """Rendered classes on device plus everything needed to re-render any of them."""

    spec: BankSpec
    images: jax.Array  # (L_padded, S, S) uint8, sharded on `data`; rows ≥ L are empty padding
    base: np.ndarray  # (N, 6) the unperturbed system
    sigma: float  # the drawn σ
    probs: np.ndarray  # (N,) map probabilities of the base system
    class_params: np.ndarray  # (L, N, 6) each class's perturbed system
    redraws: np.ndarray  # (L,) how many perturbations were rejected before the kept one
    fill: np.ndarray  # (L,) fill rate of each kept image

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def to_json(self) -> dict:
        """The base system, σ, Δ and every class's maps: enough to re-render any class."""
        spec = dataclasses.asdict(self.spec)
        return {
            "spec": spec,
            "sigma": self.sigma,
            "base_maps": self.base.tolist(),
            "map_probabilities": self.probs.tolist(),
            "map_layout": "w(x, y) = (a x + b y + e, c x + d y + f), rows (a, b, c, d, e, f)",
            "render_key": f"fold_in(jax.random.key({self.spec.seed}), {_RENDER_STREAM})",
            "classes": [
                {"label": i, "maps": self.class_params[i].tolist(), "redraws": int(r), "fill": float(f)}
                for i, (r, f) in enumerate(zip(self.redraws, self.fill, strict=True))
            ],
        }


def render_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), _RENDER_STREAM)


def base_system(spec: BankSpec) -> tuple[jax.Array, jax.Array]:
    """The unperturbed system (N, 6) and σ for `spec.seed`."""
    return ifs.sample_ifs(jax.random.fold_in(jax.random.key(spec.seed), _IFS_STREAM), spec.num_maps, spec.sigma)


def patch_bits(spec: BankSpec) -> tuple[np.ndarray, ...] | None:
    """The bank's patch cells per chain step (None in point mode), from its render key."""
    if spec.draw_mode != "patch":
        return None
    return render.patch_bits(render.mask_key(render_key(spec.seed)), spec.num_points)


@functools.lru_cache(maxsize=8)
def _sharded_renderer(mesh: Mesh, image_size: int, pad: int, num_points: int) -> Callable:
    """render_with_bits() with the classes split over the mesh: each device draws its own classes' canvases."""
    fn = functools.partial(render.render_with_bits, image_size=image_size, pad=pad, num_points=num_points)
    spec = PartitionSpec(DATA)
    # check_vma=False: the per-device body is plain single-device code (its scan carries start replicated).
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=(spec, PartitionSpec(), PartitionSpec(), PartitionSpec()),
                      out_specs=(spec, spec),
                      check_vma=False)
    )


@functools.partial(jax.jit, static_argnums=2)
def _kept_fill(images: jax.Array, ok: jax.Array, out: NamedSharding) -> jax.Array:
    """Fill rate per class (0 where rendering failed), replicated so every process can read it."""
    return jax.lax.with_sharding_constraint(jnp.where(ok, render.fill_rate(images), 0.0), out)


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(images: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    return images.at[rows].set(values)


def _fail_message(spec: BankSpec, what: str) -> str:
    return (
        f"{what} (seed={spec.seed}, sigma={spec.sigma}, num_maps={spec.num_maps}, delta={spec.delta}). "
        f"This base system cannot make valid classes: try another --config.seed, or a different --config.sigma "
        f"(larger σ gives simpler, fuller shapes)."
    )


def build_bank(
    spec: BankSpec,
    mesh: Mesh | None = None,
    progress: Callable[[str], None] | None = None,
) -> FractalBank:
    """Renders all L classes sharded over `mesh`; classes at or under the fill threshold are re-drawn."""
    spec.validate()
    mesh = make_data_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    per_call = math.ceil(spec.classes_per_call / num_devices) * num_devices
    per_call = min(per_call, math.ceil(spec.num_classes / num_devices) * num_devices)
    # Re-draw rounds touch few classes: a second, small call size avoids rendering padding.
    redraw_call = min(per_call, _REDRAW_PER_DEVICE * num_devices)
    renderer = _sharded_renderer(mesh, spec.image_size, spec.pad, spec.num_points)
    bits = patch_bits(spec)
    key = render_key(spec.seed)
    say = progress or (lambda _: None)

    base, sigma = base_system(spec)
    probs = ifs.map_probabilities(base)
    base_image, base_ok = render.render_with_bits(base[None], probs, key, bits, image_size=spec.image_size,
                                                  pad=spec.pad, num_points=spec.num_points)
    base_fill = float(render.fill_rate(base_image)[0])
    if not bool(base_ok[0]) or not np.isfinite(np.asarray(probs)).all() or base_fill <= spec.fill_threshold:
        raise ConfigError(_fail_message(spec, f"the unperturbed fractal fills {base_fill:.4f} of the canvas, "
                                              f"at or under fill_threshold={spec.fill_threshold}"))

    perturb_key = jax.random.fold_in(jax.random.key(spec.seed), _PERTURB_STREAM)
    class_params = np.zeros((spec.num_classes, spec.num_maps, 6), np.float32)
    redraws = np.zeros(spec.num_classes, np.int32)
    fill = np.zeros(spec.num_classes, np.float32)
    start, rendered = time.perf_counter(), 0

    def render_labels(labels: np.ndarray, size: int) -> jax.Array:
        """Renders `labels` in device calls of `size` classes; returns their images, padded to whole calls."""
        nonlocal rendered
        chunks = []
        for lo in range(0, len(labels), size):
            part = labels[lo : lo + size]
            padded = np.concatenate([part, np.zeros(size - len(part), part.dtype)])
            params = ifs.perturb_classes(perturb_key, base, jnp.asarray(padded), jnp.asarray(redraws[padded]),
                                         spec.delta, spec.perturbation)
            # Padding rows get all-zero maps: a degenerate system renders an empty canvas.
            params = jnp.where(jnp.arange(size)[:, None, None] < len(part), params, 0.0)
            chunk, ok = renderer(jax.device_put(params, data_sharding(mesh)), probs, key, bits)
            part_fill = np.asarray(_kept_fill(chunk, ok, replicated(mesh)))[: len(part)]
            class_params[part], fill[part] = np.asarray(params)[: len(part)], part_fill
            chunks.append(chunk)
            rendered += len(part)
            rate = rendered / (time.perf_counter() - start)
            say(f"{lo + len(part)}/{len(labels)} classes rendered, {rate:.1f} images/s")
        return jnp.concatenate(chunks)

    num_padded = math.ceil(spec.num_classes / num_devices) * num_devices
    images = jax.device_put(render_labels(np.arange(spec.num_classes), per_call)[:num_padded], data_sharding(mesh))
    for round_ in range(1, spec.max_redraws + 2):
        todo = np.flatnonzero(fill <= spec.fill_threshold)
        if len(todo) == 0:
            break
        if round_ > spec.max_redraws:
            raise ConfigError(_fail_message(spec, f"{len(todo)} classes (first: {todo[:5].tolist()}) stayed at or "
                                                  f"under fill_threshold={spec.fill_threshold} after "
                                                  f"{spec.max_redraws} re-draws"))
        say(f"re-draw {round_}: {len(todo)} classes at or under fill {spec.fill_threshold} get fresh perturbations")
        redraws[todo] += 1
        images = _put_rows(images, jnp.asarray(todo), render_labels(todo, redraw_call)[: len(todo)])
    return FractalBank(spec, images, np.asarray(base), float(sigma), np.asarray(probs), class_params, redraws, fill)
