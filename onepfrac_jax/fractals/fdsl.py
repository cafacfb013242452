"""The FDSL baselines of the 1p-frac paper on the device: OFDB-1k and FractalDB-1k/21k.

Both start from FractalDB's category search: a candidate system has U{2..max_maps} maps whose six parameters are
each U(−1, 1), map probabilities ∝ |det A_j|; it is drawn as points (`point` mode, every candidate its own map
choices) and kept as a class when the fraction of non-zero pixels is ≥ `search_fill`. Candidates are tried in index
order, so class l is the l-th candidate that passes.

- OFDB: one image per class, the class's system as found (no weighting, no flip).
- FractalDB: for every class, every row of the weighting grid — the identity, and each of the six parameters
  (a..f) of every map scaled by 1 − 2s, 1 − s, 1 + s, 1 + 2s — drawn `instances` times with fresh patch masks,
  each image also flipped vertically, horizontally and both: 25 · instances · 4 instances per class (1,000 with
  the public `--instance 10`). The map probabilities stay the unweighted system's, as in the public renderer.

Rendering (patch mode, last point wins, the vertical flip) is render.py's, exactly as for 1p-frac; the instances
share one keyed map-choice sequence (the public code's `np.random.seed(100)`). Keys: every draw is a `fold_in`
stream of `jax.random.key(seed)`: candidate i from (search stream, i); the masks of a class's stored image r from
(mask stream, class, r); the shared choices from the choice stream.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from onepfrac_jax.config import ConfigError
from onepfrac_jax.fractals import render
from onepfrac_jax.fractals.bank import classes_per_device, drawing_checks, raise_first_failure, require_bank_fits
from onepfrac_jax.parallel.mesh import DATA, data_sharding, make_data_mesh, to_host

DATASETS = ("1p-frac", "ofdb", "fractaldb")
FLIPS = 4  # 0: as drawn, 1: vertical flip, 2: horizontal flip, 3: both (the public trans_type)
WEIGHT_ROWS = 25
IDENTITY_ROW = 2  # the grid's unweighted row (the public CSV's third)
MIN_MAPS = 2
# fold_in streams of the seed, apart from bank.py's 0-2
_SEARCH_STREAM, _MASK_STREAM, _CHOICE_STREAM = 3, 4, 5
# The search gives up when this many candidates per class have not found all classes.
MAX_CANDIDATES_PER_CLASS = 1000


@dataclasses.dataclass(frozen=True)
class FdslSpec:
    """Everything that determines an OFDB or FractalDB bank (the config's fractal fields)."""

    dataset: str = "fractaldb"
    seed: int = 10
    num_classes: int = 1000
    max_maps: int = 7  # a candidate has U{2..max_maps} maps (the public randint(2, 8))
    search_fill: float = 0.2  # the category search keeps a candidate whose point drawing fills ≥ this
    weight_step: float = 0.4  # FractalDB's grid: factors 1 ± s, 1 ± 2s (the public exe.sh's weights_0.4.csv)
    instances: int = 10  # FractalDB: mask draws per grid row (the public --instance)
    image_size: int = 512
    pad: int = 6
    num_points: int = 100_000
    draw_mode: str = "patch"
    classes_per_call: int = 0  # images per call, rounded up to the device count; 0: bank.classes_per_device's

    @classmethod
    def from_config(cls, config, renamed: dict[str, str] | None = None) -> FdslSpec:
        renamed = renamed or {}
        return cls(**{f.name: config[renamed.get(f.name, f.name)] for f in dataclasses.fields(cls)})

    @property
    def stored_per_class(self) -> int:
        """Rendered images per class (FractalDB's flips are applied when an image is read)."""
        return 1 if self.dataset == "ofdb" else WEIGHT_ROWS * self.instances

    @property
    def instances_per_class(self) -> int:
        return 1 if self.dataset == "ofdb" else self.stored_per_class * FLIPS

    def validate(self) -> None:
        checks = [
            (self.dataset in ("ofdb", "fractaldb"), f"dataset={self.dataset!r} is not one of ('ofdb', 'fractaldb')"),
            (self.max_maps >= MIN_MAPS, f"max_maps={self.max_maps} must be ≥ {MIN_MAPS}"),
            (0 <= self.search_fill < 1, f"search_fill={self.search_fill} must lie in [0, 1)"),
            (0 < self.weight_step < 0.5,
             f"weight_step={self.weight_step} must lie in (0, 0.5) (factors 1 − 2s must stay positive)"),
            (self.instances >= 1, f"instances={self.instances} must be ≥ 1"),
        ]
        raise_first_failure([*checks, *drawing_checks(self)])


def weight_grid(step: float) -> np.ndarray:
    """FractalDB's 25 × 6 weighting grid, in the public CSV's row order: for parameter a the factors 1 − 2s,
    1 − s, 1 (the identity row), 1 + s, 1 + 2s; for b..f the four factors ≠ 1."""
    rows = []
    for p in range(6):
        for k in (-2, -1, 0, 1, 2):
            if k == 0 and p > 0:
                continue
            row = np.ones(6)
            row[p] = 1 + k * step
            rows.append(row)
    return np.asarray(rows, np.float32)


def flip(images: jax.Array, flips: jax.Array) -> jax.Array:
    """Images (B, S, S) flipped by code (B,): bit 0 vertically, bit 1 horizontally (0..3, the public order)."""
    images = jnp.where((flips & 1 == 1)[:, None, None], images[:, ::-1], images)
    return jnp.where((flips & 2 == 2)[:, None, None], images[:, :, ::-1], images)


def candidates(seed: int, index: jax.Array, max_maps: int) -> tuple[jax.Array, jax.Array]:
    """Candidate systems (B, max_maps, 6) and probabilities (B, max_maps) of candidate indices (B,); maps past a
    candidate's count are zero with probability 0."""
    root = jax.random.fold_in(jax.random.key(seed), _SEARCH_STREAM)

    def one(i):
        count_key, param_key = jax.random.split(jax.random.fold_in(root, i))
        count = jax.random.randint(count_key, (), MIN_MAPS, max_maps + 1)
        active = jnp.arange(max_maps) < count
        params = jnp.where(active[:, None], jax.random.uniform(param_key, (max_maps, 6), minval=-1.0, maxval=1.0), 0)
        det = jnp.abs(params[:, 0] * params[:, 3] - params[:, 1] * params[:, 2])
        return params, det / jnp.sum(det)

    return jax.vmap(one)(index)


def choice_key(seed: int) -> jax.Array:
    """The key of the map-choice uniforms every rendered instance shares."""
    return jax.random.fold_in(jax.random.key(seed), _CHOICE_STREAM)


def mask_key(seed: int, label: jax.Array, row: jax.Array) -> jax.Array:
    """The patch-mask key of class `label`'s stored image `row`."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _MASK_STREAM), label), row)


@functools.lru_cache(maxsize=8)
def own_choice_renderer(mesh: Mesh, image_size: int, pad: int, num_points: int, draw_mode: str) -> Callable:
    """(params, probs, choice key data, mask key data), all split over the mesh on their first axis →
    (images, ok, fill): each row drawn with its own map choices, from its own key (render.choices_from_uniforms)."""

    def fn(params, probs, choice_data, mask_data):
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, (num_points - 1,)))(jax.random.wrap_key_data(choice_data))
        choices = jax.vmap(render.choices_from_uniforms)(uniforms, probs)
        images, ok = render.render_classes(params, choices, jax.random.wrap_key_data(mask_data),
                                           image_size=image_size, pad=pad, num_points=num_points, draw_mode=draw_mode)
        return images, ok, jnp.where(ok, jnp.mean(images > 0, axis=(-2, -1)), 0.0)

    split = PartitionSpec(DATA)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(split,) * 4, out_specs=(split,) * 3, check_vma=False))


def _call_size(spec: FdslSpec, mesh: Mesh) -> int:
    return classes_per_device(spec.classes_per_call, mesh, spec.image_size) * mesh.devices.size


@dataclasses.dataclass
class FdslBank:
    """An OFDB / FractalDB bank: the classes' systems and their rendered images."""

    spec: FdslSpec
    images: jax.Array  # (L · stored_per_class, S, S) uint8; class l's stored image r at row l · stored + r
    systems: np.ndarray  # (L, max_maps, 6)
    probs: np.ndarray  # (L, max_maps)
    candidate: np.ndarray  # (L,) the index of the search candidate each class is
    search_fill: np.ndarray  # (L,) the kept candidate's point-drawing fill
    tried: int  # candidates the search drew

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def eval_rows(self) -> np.ndarray:
        """One clean image per class: the system as found (the identity row), first mask draw, unflipped."""
        stored = self.spec.stored_per_class
        first = 0 if self.spec.dataset == "ofdb" else IDENTITY_ROW * self.spec.instances
        return np.arange(self.num_classes) * stored + first

    def to_json(self) -> dict:
        spec = self.spec
        seed = spec.seed
        layout = ("one image per class: the system as found" if spec.dataset == "ofdb" else
                  f"stored image r = row · {spec.instances} + draw of grid `weights[row]` (every map's parameter "
                  f"× the row's factor), each written with flips 0-3 (0 none, 1 vertical, 2 horizontal, 3 both)")
        return {
            "spec": dataclasses.asdict(spec),
            "map_layout": "w(x, y) = (a x + b y + e, c x + d y + f), rows (a, b, c, d, e, f); maps of probability 0 "
                          "are padding",
            "keys": {
                "candidate": f"split(fold_in(fold_in(jax.random.key({seed}), {_SEARCH_STREAM}), index)) → "
                             f"(map count, parameters); its search choices: fold_in(that key, 1)",
                "map_choices": f"fold_in(jax.random.key({seed}), {_CHOICE_STREAM}): uniforms u_t, map = first j "
                               f"with cumsum(p)_j ≥ u_t",
                "patch_masks": f"fold_in(fold_in(fold_in(jax.random.key({seed}), {_MASK_STREAM}), label), stored)",
            },
            "search": {"candidates_tried": self.tried, "kept": self.num_classes},
            "weights": weight_grid(spec.weight_step).tolist() if spec.dataset == "fractaldb" else None,
            "instances": layout,
            "classes": [{"label": i, "candidate": int(c), "maps": self.systems[i].tolist(),
                         "probabilities": self.probs[i].tolist(), "search_fill": float(f)}
                        for i, (c, f) in enumerate(zip(self.candidate, self.search_fill, strict=True))],
        }


def search_choice_keys(seed: int, index: jax.Array) -> jax.Array:
    """The keys of candidates' own map-choice uniforms in the search."""
    root = jax.random.fold_in(jax.random.key(seed), _SEARCH_STREAM)
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(root, i), 1))(index)


def search(spec: FdslSpec, mesh: Mesh, say: Callable[[str], None]) -> tuple[np.ndarray, ...]:
    """FractalDB's category search: (systems, probs, candidate index, fill) of the first L candidates whose point
    drawing at the spec's size fills ≥ search_fill."""
    size = _call_size(spec, mesh)
    renderer = own_choice_renderer(mesh, spec.image_size, spec.pad, spec.num_points, "point")
    sharded = data_sharding(mesh)
    kept: list[tuple[np.ndarray, np.ndarray, int, float]] = []
    start, tried = time.perf_counter(), 0
    while len(kept) < spec.num_classes:
        if tried >= MAX_CANDIDATES_PER_CLASS * spec.num_classes:
            raise ConfigError(f"the category search found {len(kept)} of {spec.num_classes} classes in {tried:,} "
                              f"candidates (search_fill={spec.search_fill} at {spec.image_size}² with "
                              f"{spec.num_points:,} points): lower search_fill or raise num_points")
        index = jnp.arange(tried, tried + size)
        params, probs = candidates(spec.seed, index, spec.max_maps)
        choice_data = jax.random.key_data(search_choice_keys(spec.seed, index))
        mask_data = jax.random.key_data(jax.vmap(lambda i: mask_key(spec.seed, i, 0))(index))  # unused: points
        _, _, fill = renderer(*(jax.device_put(np.asarray(a), sharded) for a in (params, probs, choice_data,
                                                                                  mask_data)))
        fill = to_host(fill)
        params, probs = np.asarray(params), np.asarray(probs)
        for j in np.flatnonzero(fill >= spec.search_fill):
            kept.append((params[j], probs[j], tried + int(j), float(fill[j])))
        tried += size
        say(f"search: {min(len(kept), spec.num_classes)}/{spec.num_classes} classes from {tried:,} candidates "
            f"({tried / (time.perf_counter() - start):.0f} candidates/s)")
    kept = kept[: spec.num_classes]
    systems, probs, index, fill = (np.asarray(v) for v in zip(*kept, strict=True))
    return systems.astype(np.float32), probs.astype(np.float32), index, fill.astype(np.float32), tried


def build_fdsl_bank(spec: FdslSpec, mesh: Mesh | None = None,
                    progress: Callable[[str], None] | None = None) -> FdslBank:
    """Searches the L classes, then renders every class's stored images (sharded over `mesh`)."""
    spec.validate()
    mesh = make_data_mesh() if mesh is None else mesh
    require_bank_fits(spec, mesh, _call_size(spec, mesh) // mesh.devices.size)
    say = progress or (lambda _: None)
    systems, probs, candidate, fill, tried = search(spec, mesh, say)
    stored = spec.stored_per_class
    weights = weight_grid(spec.weight_step)[np.arange(stored) // spec.instances] if spec.dataset == "fractaldb" \
        else np.ones((1, 6), np.float32)
    labels = np.repeat(np.arange(spec.num_classes), stored)
    rows = np.tile(np.arange(stored), spec.num_classes)
    total, size = len(labels), _call_size(spec, mesh)
    renderer = own_choice_renderer(mesh, spec.image_size, spec.pad, spec.num_points, spec.draw_mode)
    sharded = data_sharding(mesh)
    shared_choice = np.asarray(jax.random.key_data(choice_key(spec.seed)))
    parts = []
    for first in range(0, total, size):
        idx = np.minimum(np.arange(first, first + size), total - 1)  # the last call repeats its last row
        params = systems[labels[idx]] * weights[rows[idx]][:, None, :]
        masks = np.asarray(jax.random.key_data(jax.vmap(mask_key, in_axes=(None, 0, 0))(
            spec.seed, jnp.asarray(labels[idx]), jnp.asarray(rows[idx]))))
        choice = np.broadcast_to(shared_choice, (size, *shared_choice.shape))
        images, _, _ = renderer(*(jax.device_put(np.ascontiguousarray(a), sharded)
                                  for a in (params, probs[labels[idx]], choice, masks)))
        parts.append(images)
        if (first // size + 1) % max(1, total // size // 8) == 0:
            say(f"rendered {min(first + size, total)}/{total} images")
    images = jnp.concatenate(parts)[:total]
    return FdslBank(spec, images, systems, probs, candidate, fill, tried)
