"""The 1p-frac class bank: one σ-factor system, L Δ-perturbed classes, rendered sharded over all devices.

Keys: everything derives from `jax.random.key(seed)` by `fold_in`: the map-choice sequence (shared by all classes,
as in the public code) from one stream, and a class's perturbation and patch masks from (class index, re-draw
count) alone, so the bank is bitwise the same on any number of devices.
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
from jax.sharding import Mesh, PartitionSpec

from onepfrac_jax.config import INT32_MAX, MAX_IMAGE_SIDE, SEED_MAX, ConfigError, byte_size, require
from onepfrac_jax.fractals import ifs, render
from onepfrac_jax.parallel.mesh import DATA, data_sharding, device_memory_bytes, make_data_mesh, replicated, to_host

# fold_in constants that split the seed into independent streams
_IFS_STREAM, _CLASS_STREAM, _CHOICE_STREAM = 0, 1, 2
# A system whose first pass keeps fewer of its classes than this would need too many re-draw rounds: stop early.
_MIN_PASS_RATE = 0.1


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """Everything that determines a bank (the generate / pre-train config's fractal fields)."""

    # 10: of seeds 0-39 (128 classes each, drawn as the public code draws), one of the few whose perturbations
    # nearly all pass the fill check (2% re-drawn; mean fill 0.08) while keeping the base's shape.
    seed: int = 10
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
    classes_per_call: int = 0  # classes per device call, rounded up to the device count; 0: classes_per_device's
    stored_per_class = 1  # rendered images per class (FdslSpec's FractalDB has more)

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
                self.perturbation != "multiplicative" or self.delta <= 1,
                f"delta={self.delta} must be ≤ 1 in multiplicative mode (factors U(1−Δ, 1+Δ) would flip signs; "
                f"the paper's largest Δ is 1.0)",
            ),
            (
                self.perturbation in ifs.PERTURBATIONS,
                f"perturbation={self.perturbation!r} is not one of {ifs.PERTURBATIONS}",
            ),
            (0 <= self.fill_threshold < 1, f"fill_threshold={self.fill_threshold} must lie in [0, 1)"),
            (self.max_redraws >= 0, f"max_redraws={self.max_redraws} must be ≥ 0"),
        ]
        raise_first_failure([*checks, *drawing_checks(self)])


def drawing_checks(spec) -> list[tuple[bool, str]]:
    """(ok, message) of the fields every bank spec shares: class count, canvas, points, draw mode, call size."""
    return [
        (0 <= spec.seed <= SEED_MAX, f"seed={spec.seed} must lie in [0, {SEED_MAX:,}] (JAX keys hold 32 bits of it)"),
        (spec.num_classes > 0, f"num_classes={spec.num_classes} must be > 0"),
        (spec.num_classes * spec.stored_per_class <= INT32_MAX,
         f"num_classes={spec.num_classes} makes {spec.num_classes * spec.stored_per_class:,} bank rows, past the "
         f"{INT32_MAX:,} an int32 label indexes"),
        (spec.image_size >= 16, f"image_size={spec.image_size} must be ≥ 16"),
        (spec.image_size <= MAX_IMAGE_SIDE,
         f"image_size={spec.image_size} must be ≤ {MAX_IMAGE_SIDE:,} (a canvas's pixels are indexed in int32)"),
        (spec.pad >= 1, f"pad={spec.pad} must be ≥ 1 (the largest coordinate lands on image_size − pad)"),
        (spec.image_size - 2 * spec.pad >= 8, f"pad={spec.pad} leaves no canvas in image_size={spec.image_size}"),
        (1 < spec.num_points <= render.MAX_POINTS,
         f"num_points={spec.num_points} must lie in [2, {render.MAX_POINTS:,}]"),
        (spec.draw_mode in render.DRAW_MODES, f"draw_mode={spec.draw_mode!r} is not one of {render.DRAW_MODES}"),
        (0 <= spec.classes_per_call <= INT32_MAX,
         f"classes_per_call={spec.classes_per_call} must lie in [0, {INT32_MAX:,}] (0: automatic)"),
    ]


def bank_bytes(spec) -> int:
    """The rendered bank's size, (rows, S, S) uint8: what generate gathers on the host to write it."""
    return spec.num_classes * spec.stored_per_class * spec.image_size**2


def require_fits(spec, needed: int, available: int, where: str) -> None:
    """ConfigError, saying how much memory the bank needs `where`, unless `needed` ≤ `available` bytes."""
    require(needed <= available, f"the bank of {spec.num_classes:,} classes at {spec.image_size}² needs "
                                 f"{byte_size(needed)} {where}, which has {byte_size(available)}: lower the image "
                                 f"size or num_classes")


def require_bank_fits(spec, mesh: Mesh, per_device: int) -> None:
    """require_fits for each device: its shard of the bank and one render call's canvases (`per_device` classes, an
    int32 key and a uint8 pixel each); checked before anything is compiled."""
    shard = math.ceil(spec.num_classes * spec.stored_per_class / mesh.devices.size) * spec.image_size**2
    require_fits(spec, shard + per_device * spec.image_size**2 * 5, device_memory_bytes(mesh),
                 f"on each of the {mesh.devices.size} devices")


def raise_first_failure(checks: list[tuple[bool, str]]) -> None:
    """Raises ConfigError with the message of the first failed check."""
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
            "keys": {
                "map_choices": f"fold_in(jax.random.key({self.spec.seed}), {_CHOICE_STREAM})",
                "class": f"fold_in(fold_in(fold_in(jax.random.key({self.spec.seed}), {_CLASS_STREAM}), label), "
                         f"redraws)",
                "perturbation, patch_masks": "jax.random.split(class key)",
            },
            "classes": [
                {"label": i, "maps": self.class_params[i].tolist(), "redraws": int(r), "fill": float(f)}
                for i, (r, f) in enumerate(zip(self.redraws, self.fill, strict=True))
            ],
        }


def choice_key(seed: int) -> jax.Array:
    """The key of the map-choice sequence every class of the bank shares."""
    return jax.random.fold_in(jax.random.key(seed), _CHOICE_STREAM)


def class_keys(seed: int, labels: jax.Array, attempts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(perturbation keys, patch-mask keys), each (L,), of classes `labels` at re-draw counts `attempts`."""
    root = jax.random.fold_in(jax.random.key(seed), _CLASS_STREAM)
    return jax.vmap(ifs.class_keys, in_axes=(None, 0, 0))(root, labels, attempts)


def base_system(spec: BankSpec) -> tuple[jax.Array, jax.Array]:
    """The unperturbed system (N, 6) and σ for `spec.seed`."""
    return ifs.sample_ifs(jax.random.fold_in(jax.random.key(spec.seed), _IFS_STREAM), spec.num_maps, spec.sigma)


def render_options(spec: BankSpec) -> dict:
    """The static arguments of render.render_classes for this bank."""
    return {"image_size": spec.image_size, "pad": spec.pad, "num_points": spec.num_points,
            "draw_mode": spec.draw_mode}


@functools.lru_cache(maxsize=8)
def classes_per_device(classes_per_call: int, mesh: Mesh, image_size: int) -> int:
    """Classes each device renders in one call: `classes_per_call` split over the mesh, or when it is 0, 4 on CPUs (a
    call's canvases stay in cache: 1.7× faster than 16 per device on 2 cores) and 32 on accelerators; at most as
    many as keep the call's pixels indexable in int32 (render.rasterise's flat index)."""
    wanted = math.ceil(classes_per_call / mesh.devices.size) if classes_per_call else \
        4 if mesh.devices.flat[0].platform == "cpu" else 32
    return max(1, min(wanted, INT32_MAX // image_size**2))


def shared_choice_renderer(mesh: Mesh, image_size: int, pad: int, num_points: int, draw_mode: str) -> Callable:
    """render_classes(params, choices, mask key data (L, 2) uint32) with the classes split over the mesh, every
    class drawn with the one map-choice sequence `choices` (replicated), as the public 1p-frac generator draws."""

    def fn(params, choices, mask_key_data):
        return render.render_classes(params, choices, jax.random.wrap_key_data(mask_key_data), image_size=image_size,
                                     pad=pad, num_points=num_points, draw_mode=draw_mode)

    split = PartitionSpec(DATA)
    # check_vma=False: the per-device body is plain single-device code (its scan carries start replicated).
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(split, PartitionSpec(), split),
                                 out_specs=(split, split), check_vma=False))


@jax.jit
def _kept_fill(images: jax.Array, ok: jax.Array) -> jax.Array:
    """Fill rate per class (0 where rendering failed), sharded like the classes: no collective in a render call."""
    return jnp.where(ok, render.fill_rate(images), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def class_inputs(spec: BankSpec, base: jax.Array, labels: jax.Array, attempts: jax.Array,
                  valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(perturbed systems, patch-mask key data (L, 2) uint32) of one device call; rows not `valid` get all-zero
    maps, which render an empty canvas."""
    perturb_keys, mask_keys = class_keys(spec.seed, labels, attempts)
    params = ifs.perturb_classes(perturb_keys, base, spec.delta, spec.perturbation)
    return jnp.where(valid[:, None, None], params, 0.0), jax.random.key_data(mask_keys)


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(images: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """One device's shard with `rows` replaced (a single-device program: no collective)."""
    return images.at[rows].set(values, mode="drop")  # padding rows point past the end


def _fail_message(spec: BankSpec, what: str) -> str:
    return (
        f"{what} (seed={spec.seed}, sigma={spec.sigma}, num_maps={spec.num_maps}, delta={spec.delta}). "
        f"This base system cannot make valid classes: try another --config.seed, or a different --config.sigma "
        f"(larger σ gives simpler, fuller shapes)."
    )


def _by_device(array: jax.Array) -> dict:
    """The addressable shards of an array split on its first axis: device → (first row, data)."""
    return {shard.device: (shard.index[0].start or 0, shard.data) for shard in array.addressable_shards}


def build_bank(
    spec: BankSpec,
    mesh: Mesh | None = None,
    progress: Callable[[str], None] | None = None,
) -> FractalBank:
    """Renders all L classes sharded over `mesh`; classes at or under the fill threshold are re-drawn.

    Device d renders, call after call, the rows of its own shard of the bank, so assembling the bank moves no
    pixels; every call, re-draws included, has one size, so nothing recompiles between calls or rounds.
    """
    spec.validate()
    mesh = make_data_mesh() if mesh is None else mesh
    num_devices = mesh.devices.size
    rows_per_device = math.ceil(spec.num_classes / num_devices)
    per_device = min(classes_per_device(spec.classes_per_call, mesh, spec.image_size), rows_per_device)
    require_bank_fits(spec, mesh, per_device)
    renderer = shared_choice_renderer(mesh, **render_options(spec))
    sharded = data_sharding(mesh)
    say = progress or (lambda _: None)

    base, sigma = base_system(spec)
    probs = ifs.map_probabilities(base)
    if not np.isfinite(np.asarray(probs)).all():
        raise ConfigError(_fail_message(spec, "the unperturbed maps are all singular"))
    # host copies: every process computes the same values, and host data may be put onto a mesh that spans
    # processes (an array already on one device may not)
    choices = jax.device_put(np.asarray(render.choice_sequence(choice_key(spec.seed), probs, spec.num_points - 1)),
                             replicated(mesh))  # placed once, read by every call

    redraws = np.zeros(spec.num_classes, np.int32)
    start, rendered = time.perf_counter(), 0

    def render_call(labels: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Renders one call's rows (labels −1: padding): (images, params, fill), all without waiting."""
        nonlocal rendered
        valid = labels >= 0
        safe = np.where(valid, labels, 0)
        params, mask_keys = (np.asarray(a) for a in class_inputs(spec, base, jnp.asarray(safe),
                                                                 jnp.asarray(redraws[safe]), jnp.asarray(valid)))
        images, ok = renderer(jax.device_put(params, sharded), choices, jax.device_put(mask_keys, sharded))
        rendered += int(valid.sum())
        return images, params, _kept_fill(images, ok)

    def collect(calls: list[tuple[np.ndarray, jax.Array, jax.Array]]) -> None:
        """Fetches the calls' fill rates and systems into the host tables, once all calls are dispatched."""
        for labels, params, call_fill in calls:
            valid = labels >= 0
            class_params[labels[valid]] = np.asarray(params)[valid]
            fill[labels[valid]] = to_host(call_fill)[valid]

    def progress_line(done: int, total: int) -> None:
        say(f"{done}/{total} classes rendered, {rendered / (time.perf_counter() - start):.1f} images/s")

    class_params = np.zeros((spec.num_classes, spec.num_maps, 6), np.float32)
    fill = np.zeros(spec.num_classes, np.float32)

    def device_rows(todo: np.ndarray, size: int, call: int) -> np.ndarray:
        """Labels of one call in which device d renders the `call`-th `size` labels of `todo` in its own shard."""
        shard_of = todo // rows_per_device
        labels = np.full((num_devices, size), -1)
        for d in range(num_devices):
            mine = todo[shard_of == d][call * size : (call + 1) * size]
            labels[d, : len(mine)] = mine
        return labels.ravel()

    # Bank row = label; device d holds rows d·R … d·R + R − 1. Each call renders on every device the next P rows
    # of its own shard, so the bank is assembled per device and no pixel crosses devices (or processes).
    local: dict = {}
    calls = []
    every_row = np.arange(spec.num_classes)
    num_calls = math.ceil(rows_per_device / per_device)
    for c in range(num_calls):
        labels = device_rows(every_row, per_device, c)
        images, params, call_fill = render_call(labels)
        for device, (_, data) in _by_device(images).items():
            local.setdefault(device, []).append(data)
        calls.append((labels, params, call_fill))
        if (c + 1) % max(1, num_calls // 8) == 0 or c + 1 == num_calls:
            call_fill.block_until_ready()  # count what is rendered, not what is queued
            progress_line(rendered, spec.num_classes)
    local = {device: jnp.concatenate(parts)[:rows_per_device] for device, parts in local.items()}
    collect(calls)
    passed = float(np.mean(fill > spec.fill_threshold))
    if passed < _MIN_PASS_RATE:
        raise ConfigError(_fail_message(spec, f"only {passed:.0%} of the classes fill more than "
                                              f"fill_threshold={spec.fill_threshold} of the canvas (mean fill "
                                              f"{fill.mean():.4f})"))

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
        calls = []
        busiest = np.bincount(todo // rows_per_device, minlength=num_devices).max()
        for c in range(math.ceil(busiest / per_device)):  # the main pass's call size: compiled once
            labels = device_rows(todo, per_device, c)
            new, params, call_fill = render_call(labels)
            for device, (first, data) in _by_device(new).items():
                own = labels[first : first + per_device]
                rows = np.where(own >= 0, own - first // per_device * rows_per_device, rows_per_device)
                local[device] = _put_rows(local[device], jnp.asarray(rows, device=device), data)
            calls.append((labels, params, call_fill))
        collect(calls)
    shape = (rows_per_device * num_devices, spec.image_size, spec.image_size)
    images = jax.make_array_from_single_device_arrays(
        shape, sharded, [local[device] for device in sharded.addressable_devices_indices_map(shape)])
    progress_line(spec.num_classes, spec.num_classes)
    return FractalBank(spec, images, np.asarray(base), float(sigma), np.asarray(probs), class_params, redraws, fill)
