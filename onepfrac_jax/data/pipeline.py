"""Host input pipelines: a source → this process's rows (grain, numpy) → global jax.Arrays sharded on `data`.

The training stream is a pure function of (seed, step). Row r of the global batch at step s is the stream
position g = s·B + r (the example's *global example index*, which keys its on-device augmentation). With
E = steps_per_epoch·B positions per epoch, position g reads example perm_e[g mod E] of epoch e = g // E, where
perm_e is grain's index shuffle of range(N) reseeded every epoch; the last N − E examples of each epoch's
permutation are dropped, like a PyTorch DataLoader with drop_last. A process loads only the rows its devices
hold, so the global batch is the same whatever the number of processes, devices or decode workers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from onepfrac_jax.config import ConfigError, require
from onepfrac_jax.data.sources import Source, make_source, verify_source

# Global example indices travel as int32, so a stream ends before position 2**31.
INDEX_LIMIT = 2**31


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the remainder of every epoch is dropped."""
    require(global_batch > 0, f"global batch {global_batch} must be positive")
    require(
        num_examples >= global_batch,
        f"the dataset has {num_examples} examples, fewer than one global batch of {global_batch}",
    )
    return num_examples // global_batch


def process_rows(
    global_batch: int,
    *,
    sharding: jax.sharding.Sharding | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> np.ndarray:
    """Rows of every global batch that this process loads, ascending.

    With `sharding`: the rows its addressable devices hold, in the order make_array_from_process_local_data
    expects. Without: the contiguous block global_batch / process_count rows long of process `process_index`
    (both default to jax's), which lets a test play several processes in one.
    """
    if sharding is not None:
        try:
            indices = sharding.addressable_devices_indices_map((global_batch,)).values()
        except ValueError as e:
            raise ConfigError(f"global batch {global_batch} cannot be split over the mesh: {e}") from e
        rows = sorted({row for (rows_slice, *_) in indices for row in range(global_batch)[rows_slice]})
        return np.asarray(rows, dtype=np.int64)
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    require(0 <= index < count, f"process index {index} is not in [0, {count})")
    require(global_batch % count == 0, f"global batch {global_batch} is not divisible by {count} processes")
    per_process = global_batch // count
    return np.arange(index * per_process, (index + 1) * per_process, dtype=np.int64)


class _TrainExample:
    """Local example number i (step-major over this process's rows) → the decoded example at its position."""

    def __init__(self, source: Source, seed: int, global_batch: int, rows: np.ndarray):
        require(seed >= 0, f"seed={seed} must be non-negative")
        self.source = source
        self.global_batch = global_batch
        self.rows = rows
        self.num_examples = len(source)
        self.epoch_length = steps_per_epoch(self.num_examples, global_batch) * global_batch
        # grain reseeds epoch e with seed + e, so raw seeds s and s + 1 would replay the same epoch orders one
        # epoch apart; hashing the seed first makes different seeds unrelated.
        grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        self.order = grain.MapDataset.range(self.num_examples).shuffle(seed=grain_seed).repeat()

    def __call__(self, i: int) -> dict[str, Any]:
        step, j = divmod(i, len(self.rows))
        position = step * self.global_batch + int(self.rows[j])
        epoch, offset = divmod(position, self.epoch_length)
        example = self.source[self.order[epoch * self.num_examples + offset]]
        return {"image": example["image"], "label": np.int32(example["label"]), "index": np.int32(position)}


class _EvalExample:
    """Local example number i → the example at position g in source order, or a blank pad past the end."""

    def __init__(self, source: Source, global_batch: int, rows: np.ndarray):
        self.source = source
        self.global_batch = global_batch
        self.rows = rows
        self.blank = np.zeros((source.image_size, source.image_size, 3), np.uint8)

    def __call__(self, i: int) -> dict[str, Any]:
        step, j = divmod(i, len(self.rows))
        position = step * self.global_batch + int(self.rows[j])
        valid = position < len(self.source)
        example = self.source[position] if valid else {"image": self.blank, "label": 0}
        return {
            "image": example["image"],
            "label": np.int32(example["label"]),
            "index": np.int32(position),
            "mask": np.bool_(valid),
        }


def train_dataset(source: Source, *, seed: int, global_batch: int, rows: Sequence[int]) -> grain.MapDataset:
    """Element k: `rows` of the global batch at step k as numpy: image uint8, label and index int32."""
    rows = np.asarray(rows, dtype=np.int64)
    num_steps = INDEX_LIMIT // global_batch
    example = _TrainExample(source, seed, global_batch, rows)
    examples = grain.MapDataset.range(num_steps * len(rows)).map(example)
    # Batching before the iterator keeps a batch's rows together when mp_prefetch deals elements to workers.
    return examples.batch(len(rows), drop_remainder=True)


def eval_dataset(source: Source, *, global_batch: int, rows: Sequence[int]) -> grain.MapDataset:
    """Element k: `rows` of eval batch k, examples in source order, padded past the end with mask False."""
    rows = np.asarray(rows, dtype=np.int64)
    num_steps = math.ceil(len(source) / global_batch)
    examples = grain.MapDataset.range(num_steps * len(rows)).map(_EvalExample(source, global_batch, rows))
    return examples.batch(len(rows), drop_remainder=True)


def host_iterator(
    dataset: grain.MapDataset,
    start: int = 0,
    *,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Iterates `dataset` from element `start`: `num_threads` decode threads, `worker_count` processes."""
    require(num_threads >= 0 and prefetch_batches >= 0 and worker_count >= 0, "read options must be >= 0")
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    stream = dataset[start:].to_iter_dataset(read_options)
    if worker_count > 0:
        # grain's workers read absl flags, parsed by main.py's app.run but not in a notebook, test or bench
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(stream)


def to_global(
    local: dict[str, np.ndarray], sharding: jax.sharding.Sharding, global_batch: int
) -> dict[str, jax.Array]:
    """This process's rows of each array → global arrays of leading size `global_batch`, sharded."""
    return {
        key: jax.make_array_from_process_local_data(sharding, value, (global_batch, *value.shape[1:]))
        for key, value in local.items()
    }


class TrainIterator:
    """Yields (step, batch) from `start_step` on; batch: image (B, H, W, 3) uint8, label and index (B,) int32.

    The position is just the step, the same on every process and for any process count: building the iterator
    with start_step=s continues exactly where a run saved at step s was.
    """

    def __init__(
        self,
        source: Source,
        *,
        seed: int,
        global_batch: int,
        sharding: jax.sharding.Sharding,
        start_step: int = 0,
        num_threads: int = 2,
        prefetch_batches: int = 4,
        worker_count: int = 0,
    ):
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch(len(source), global_batch)
        rows = process_rows(global_batch, sharding=sharding)
        dataset = train_dataset(source, seed=seed, global_batch=global_batch, rows=rows)
        require(0 <= start_step < len(dataset), f"data step {start_step} is outside [0, {len(dataset)})")
        self._sharding = sharding
        self._step = start_step
        self._host = host_iterator(dataset, start_step, num_threads=num_threads, prefetch_batches=prefetch_batches,
                                   worker_count=worker_count)

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> tuple[int, dict[str, jax.Array]]:
        batch = to_global(next(self._host), self._sharding, self.global_batch)
        step = self._step
        self._step += 1
        return step, batch

    def close(self) -> None:
        """Stops the decode threads and worker processes."""
        self._host.close()


@dataclasses.dataclass
class HostData:
    """A stage's host-read dataset: its two splits and the loop's inputs over them (fine-tune, bootstrap)."""

    train: Source
    val: Source
    data: Any  # the `data` config section: read options
    seed: int
    global_batch: int
    sharding: jax.sharding.Sharding

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.train), self.global_batch)

    def inputs(self, start: int) -> Iterator[dict[str, jax.Array]]:
        """The training loop's host inputs from step `start`: global batches."""
        iterator = TrainIterator(self.train, seed=self.seed, global_batch=self.global_batch, sharding=self.sharding,
                                 start_step=start, num_threads=self.data.num_threads,
                                 prefetch_batches=self.data.prefetch_batches, worker_count=self.data.worker_count)
        return (item for _, item in iterator)

    def val_batches(self) -> Iterator[dict[str, jax.Array]]:
        return eval_batches(self.val, global_batch=self.global_batch, sharding=self.sharding,
                            num_threads=self.data.num_threads, worker_count=self.data.worker_count)

    def describe(self) -> str:
        return (f"{self.data.name}: {len(self.train)} train / {len(self.val)} {self.data.eval_split} examples, "
                f"{self.train.num_classes} classes, {self.steps_per_epoch} steps/epoch")


def open_host_data(data: Any, *, seed: int, global_batch: int, sharding: jax.sharding.Sharding) -> HostData:
    """Opens the `data` section's train and eval splits and checks them before any training step."""
    for name in ("num_threads", "prefetch_batches", "worker_count"):
        require(int(data[name]) == data[name] and data[name] >= 0, f"data.{name}={data[name]} must be an int >= 0")
    train = make_source(data, "train")
    val = make_source(data, data.eval_split)
    require(len(train) >= global_batch,
            f"the train split has {len(train)} examples, fewer than batch_size={global_batch}")
    for source in (train, val):
        verify_source(source, max_files=data.verify_max_files, num_threads=data.num_threads)
    return HostData(train, val, data, seed, global_batch, sharding)


def eval_batches(
    source: Source,
    *,
    global_batch: int,
    sharding: jax.sharding.Sharding,
    num_threads: int = 2,
    prefetch_batches: int = 4,
    worker_count: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """Every example once, in source order: TrainIterator's arrays plus `mask` (B,) bool, False on padding."""
    require(global_batch > 0, f"global batch {global_batch} must be positive")
    rows = process_rows(global_batch, sharding=sharding)
    dataset = eval_dataset(source, global_batch=global_batch, rows=rows)
    host = host_iterator(
        dataset, num_threads=num_threads, prefetch_batches=prefetch_batches, worker_count=worker_count
    )
    try:
        for local in host:
            yield to_global(local, sharding, global_batch)
    finally:
        host.close()
