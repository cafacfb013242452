"""The run directory every stage writes into: checked first, locked while in use, and never lost by mistake.

`RunDir.open(config, workdir)` runs before any expensive work (rendering, decoding, loading weights) and decides:

- a new run: the workdir is absent or empty;
- a resumed run: it holds `config.json` of the same stage whose config equals this one (except `resume` and
  `overwrite`), or differs and `resume=True`;
- a fresh start over an old run: `overwrite=True`, allowed only over a run of this project (a `config.json` naming
  one of its stages) and never over `/`, the home directory, the working directory or one of its parents.

Everything else is one ConfigError. Process 0 holds an exclusive `flock` on `DIR/.lock` from `open` to `close`, so a
second run started in the same workdir is refused at once; the lock is opened without following a symlink, and a
`.lock` that is not a regular file is refused. Nothing else is written until `begin()`: that is where `config.json`
is written (atomically, files.write_file), after a resumed state has been restored, and where an overwrite replaces
the old run by renames (`_replace`), so a refused or failed start leaves the directory as it found it
(`close(failed=True)` removes what `open` created). Every stage ends by writing `DIR/result.json` from its `Result`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import ml_collections
import numpy as np

from onepfrac_jax.config import STAGES, ConfigError, Interrupted, require, require_path, to_json
from onepfrac_jax.files import write_errors, write_file, write_folder

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
# Keys that may differ between a run's saved config and the command that resumes it.
RUN_CONTROL_KEYS = ("resume", "overwrite")


def _article(stage: str) -> str:
    """'an evaluate', 'an export', 'a pretrain'."""
    return f"{'an' if stage[0] in 'aeiou' else 'a'} {stage}"


def without_model(name: str, stage: str, what: str) -> str:
    """'NAME is an evaluate run, which WHAT': the start of the error for a run that has no model where one is needed
    (a demo run's are in its pretrain/ and finetune/, which the message names)."""
    inside = "; its pretrain/ and finetune/ are" if stage == "demo" else ""
    return f"{name} is {_article(stage)} run, which {what}{inside}"


def _comparable(data: dict) -> dict:
    return {k: v for k, v in data.items() if k not in RUN_CONTROL_KEYS}


def _read_saved(workdir: Path) -> dict:
    """The run's config.json as written; ConfigError when workdir holds no run of this project."""
    path = workdir / CONFIG_NAME
    # a FIFO would block the read until something writes to it
    require(path.is_file() or not path.exists(), f"{workdir} is not a run directory ({path} is not a regular file)")
    try:
        saved = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{workdir} is not a run directory (no readable {CONFIG_NAME}: {e.strerror})") from e
    except ValueError as e:
        raise ConfigError(f"{workdir} is not a run directory ({path} is not JSON: {e})") from e
    require(isinstance(saved, dict) and saved.get("stage") in STAGES,
            f"{workdir} is not a run directory of this project ({path} names none of its stages)")
    return saved


def read_run_config(workdir: Path) -> ml_collections.ConfigDict:
    """The saved config of the run in `workdir`; ConfigError when workdir holds no run of this project."""
    return ml_collections.ConfigDict(_read_saved(workdir))


def _saved_config(path: Path) -> dict | None:
    """The run's saved config as a dict; None when `path` holds no readable config.json of this project."""
    try:
        return _read_saved(path)
    except ConfigError:
        return None


def _contents(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.name != LOCK_NAME] if path.is_dir() else []


def _protected(path: Path) -> str | None:
    """Why deleting `path` would be a disaster, or None."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        return "the filesystem root"
    if resolved == Path.home().resolve():
        return "the home directory"
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "the working directory or one of its parents"
    return None


def _agree(ok: bool, message: str) -> None:
    """Raises on every process when process 0 refused (only it holds the lock): the same answer everywhere."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok and jax.process_index() != 0:
            message = "process 0 refused the workdir (its log says why)"
    if not ok:
        raise ConfigError(message)


def _not_a_lock(lock_path: Path) -> ConfigError:
    mode = os.lstat(lock_path).st_mode
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return ConfigError(f"{lock_path} is {kind}, not a run's lock file; remove it, or choose another workdir")


def _not_writable(lock_path: Path, error: OSError) -> ConfigError:
    return ConfigError(f"workdir {lock_path.parent} is not writable ({lock_path}: {error.strerror}); choose another "
                       f"workdir")


def _open_lock(lock_path: Path) -> int:
    """The lock file, opened without following a symlink (a `.lock` linking elsewhere would get its target
    truncated); ConfigError when it is not a regular file or the workdir cannot be written."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused just below)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if os.path.lexists(lock_path) and not stat.S_ISREG(os.lstat(lock_path).st_mode):
            raise _not_a_lock(lock_path) from None
        raise _not_writable(lock_path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _not_a_lock(lock_path)
    return fd


def _take_lock(directory: Path) -> int | None:
    """The descriptor holding an exclusive flock on `directory`/.lock, which names this process; None where the
    filesystem has no locks (a warning says so); ConfigError when another run holds it or it cannot be written."""
    lock_path = directory / LOCK_NAME
    while True:
        fd = _open_lock(lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"workdir {directory} is in use by another run ({holder}); wait for it to end or "
                                  f"choose another workdir") from None
            if e.errno == errno.ENOLCK:  # e.g. an NFS mount without a lock daemon: run, but say so
                from absl import logging

                logging.warning("cannot lock %s (no file locks on this filesystem): nothing stops a second run in "
                                "this workdir", lock_path)
                return None
            raise ConfigError(f"workdir {directory} cannot be locked: {e.strerror}") from None
        # The file may have been removed by its previous holder between our open and flock: lock the one that is
        # at the path now.
        try:
            same = os.stat(lock_path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                     .encode())
    except OSError as e:  # a full disk: the run could write nothing else either
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        raise _not_writable(lock_path, e) from None
    return fd


class RunDir:
    """One stage's run directory, from the start-up checks to the end of the run (a context manager)."""

    def __init__(self, path: Path, config: ml_collections.ConfigDict, resuming: bool, created: bool,
                 resumable: bool = True):
        self.path = path
        self.config = config
        self.resuming = resuming
        self.resumable = resumable
        self._created = created
        self._lock_fd: int | None = None
        self._begun = False

    @classmethod
    def open(cls, config: ml_collections.ConfigDict, workdir: str | os.PathLike, resumable: bool = True) -> RunDir:
        """Checks `workdir` against `config` and locks it; ConfigError (nothing written) when it cannot be used.

        `resumable=False` (generate): an existing run is never continued, only replaced with `overwrite=True`.
        """
        require(str(workdir).strip() != "", "--workdir is empty; name the run directory")
        require_path("--workdir", workdir)
        path = Path(workdir).expanduser()
        require(not path.exists() or path.is_dir(), f"workdir {path} exists and is not a directory")
        resuming = False
        if _contents(path):
            saved = _saved_config(path)
            if config.get("overwrite"):
                danger = _protected(path)
                require(danger is None, f"workdir {path} is {danger}; --config.overwrite=True would delete it; "
                                        f"choose a directory of its own")
                require(saved is not None, f"workdir {path} is not empty and is not a run of this project (no "
                                           f"{CONFIG_NAME} naming a stage); --config.overwrite=True deletes only "
                                           f"runs: choose another workdir")
                # _replace renames within the parent: say so now, not after the expensive work
                require(not os.path.ismount(path.resolve()),
                        f"workdir {path} is a mount point, which --config.overwrite=True cannot replace (it renames "
                        f"the old run aside); empty it yourself, or use a directory inside it")
                require(os.access(path.resolve().parent, os.W_OK),
                        f"workdir {path} lies in a directory this user cannot write, and --config.overwrite=True "
                        f"renames the old run aside there; empty it yourself, or choose another workdir")
            elif saved is None:
                raise ConfigError(f"workdir {path} is not empty and holds no run of this project; choose another "
                                  f"workdir")
            else:
                resuming = cls._check_resume(path, saved, config, resumable)
        existed = path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"workdir {path} cannot be created: {e.strerror}") from e
        run = cls(path, config, resuming, created=not existed, resumable=resumable)
        ok, message = True, ""
        if jax.process_index() == 0:
            try:
                run._lock()
            except ConfigError as e:
                ok, message = False, str(e)
        try:
            _agree(ok, message)
        except ConfigError:
            run.close(failed=True)
            raise
        return run

    @staticmethod
    def _check_resume(path: Path, saved: dict, config: ml_collections.ConfigDict, resumable: bool) -> bool:
        stage = config.get("stage")
        if saved["stage"] != stage:
            raise ConfigError(f"workdir {path} holds {_article(saved['stage'])} run, not {_article(stage)} run; "
                              f"choose another workdir, or --config.overwrite=True to replace it")
        if not resumable:
            raise ConfigError(f"workdir {path} already holds {_article(stage)} run; pass --config.overwrite=True to "
                              f"replace it")
        old, new = _comparable(saved), _comparable(json.loads(to_json(config)))
        if old != new and not config.get("resume"):
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            # a config without `resume` (the demo) is continued only with the config it started with
            how = "pass --config.resume=True to continue it with this config, or " if "resume" in config else "pass "
            raise ConfigError(f"workdir {path} holds a run with a different config (differs in: {', '.join(keys)}); "
                              f"{how}--config.overwrite=True to start afresh")
        return True

    def _lock(self) -> None:
        self._lock_fd = _take_lock(self.path)

    def begin(self) -> None:
        """Commits to the run: process 0 writes config.json or, for an overwrite, replaces the old run (`_replace`);
        every process waits for it. ConfigError, nothing changed, when that fails (a full disk)."""
        if self._begun:
            return
        ok, message = True, ""
        if jax.process_index() == 0:
            try:
                if self.config.get("overwrite") and not self.resuming and _contents(self.path):
                    self._replace()
                else:
                    with write_errors("nothing in the workdir was changed", ConfigError):
                        write_file(self.path / CONFIG_NAME, to_json(self.config))
            except ConfigError as e:
                ok, message = False, str(e)
        _agree(ok, message)  # a collective: nobody writes into the directory before process 0 has set it up
        self._begun = True

    def _replace(self) -> None:
        """The overwrite: a new run directory holding the lock and config.json is built beside the old run and
        renamed into its place, the old one renamed aside first and removed after (files.write_folder), so the
        workdir never holds a half-deleted run; ConfigError, the old run untouched, when that fails. The old lock
        is held until the new one is in place: no second run slips in between."""
        old_fd = self._lock_fd

        def build(new: Path) -> dict:
            self._lock_fd = _take_lock(new)
            write_file(new / CONFIG_NAME, to_json(self.config))
            return {}

        try:
            with write_errors("the old run is untouched", ConfigError):
                write_folder(self.path.resolve(), build)  # resolved: a symlinked workdir keeps its link
        except ConfigError:
            if self._lock_fd not in (None, old_fd):
                os.close(self._lock_fd)
            self._lock_fd = old_fd
            raise
        if old_fd is not None:
            os.close(old_fd)  # its file went aside with the old run

    def close(self, failed: bool = False) -> None:
        """Releases the lock; a start that failed before `begin()` leaves no trace of itself."""
        if self._lock_fd is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # still ours: see _lock's inode check
            os.close(self._lock_fd)
            self._lock_fd = None
        if failed and not self._begun and self._created and jax.process_index() == 0:
            with contextlib.suppress(OSError):  # something else appeared in it meanwhile: leave it
                self.path.rmdir()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(failed=kind is not None)
        if kind is KeyboardInterrupt:  # Ctrl-C: one line that says what is left (the training loop says its own)
            raise Interrupted(self._interrupted()) from None

    def _interrupted(self) -> str:
        """What a Ctrl-C left of this run, and how to go on."""
        if not self._begun:
            return f"interrupted (Ctrl-C) before this command wrote anything in {self.path}; run it again"
        if self.resumable:
            return f"interrupted (Ctrl-C); run the same command again to resume the run in {self.path}"
        return (f"interrupted (Ctrl-C): the {self.config.stage} run in {self.path} is incomplete (no result.json); "
                f"run the same command with --config.overwrite=True to start it again")


@dataclasses.dataclass
class Result:
    """What a stage's run returns, and (without `state`) what DIR/result.json holds."""

    stage: str
    step: int  # the step the run reached
    total_steps: int
    stopped: bool  # left early on SIGTERM or Ctrl-C (a checkpoint was saved)
    history: list[dict]  # every evaluation of the run, resumed parts included: {'step': s, name: value, ...}
    files: dict[str, str]  # what was exported: name -> path
    state: Any = None  # what the stage made: a training stage's final TrainState, generate's FractalBank

    @property
    def summary(self) -> dict[str, float]:
        """The seeds' two numbers for every evaluated metric: `<name>_max` and `<name>_final`."""
        summary = {}
        for name in [k for k in (self.history[0] if self.history else {}) if k != "step"]:
            values = [row[name] for row in self.history]
            summary[f"{name}_max"], summary[f"{name}_final"] = max(values), values[-1]
        return summary

    def to_json(self) -> dict:
        return {"stage": self.stage, "step": self.step, "total_steps": self.total_steps, "stopped": self.stopped,
                **self.summary, "history": self.history, "files": self.files}

    def write(self, path: Path, quiet: bool = False) -> None:
        """DIR/result.json and (unless `quiet`) the console summary, on process 0."""
        if jax.process_index() != 0:
            return
        with write_errors("everything else the run wrote is intact"):
            write_file(path / "result.json", json.dumps(self.to_json(), indent=1))
        if quiet:
            return
        for name, value in self.summary.items():
            if name.endswith("_max"):
                base = name[: -len("_max")]
                print(f"{base}: max {value:.2f}, final {self.summary[base + '_final']:.2f}")
        for name, file in self.files.items():
            print(f"{name}: {file}")
