"""Orbax checkpoints of the train state, the data-iterator state and the config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config, checksums.json}`:
    state   ocp StandardSave of the train-state dict (params, opt_state, step, rng, ...)
    data    grain's iterator handler (one JSON file per host: process_<i>-of-<n>.json)
    config  the full training config as JSON; a resume diffs it against the new config
    checksums.json  size and CRC-32 of every file above, written once the step is complete

Saves are asynchronous (orbax copies device arrays to host before `save` returns, then writes in
a thread); a step directory only appears once complete, so a run killed at any moment resumes
from the newest complete checkpoint. Its checksums are written when the save has finished (at
the next save, `wait` or `close`) and checked before a restore; a checkpoint that fails the
check or cannot be read is moved to `<workdir>/checkpoints.corrupt/` and the trainer falls back
to the next older one (`Trainer.init_or_restore`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from mamba3_jax.training import integrity
from mamba3_jax.training.config import RESUME_SAFE_PREFIXES, diff_configs, format_diff

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written with a config that differs in keys that matter."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint fails its checksums or cannot be read (the message names it and why)."""


class _IteratorSnapshot:
    """A data-iterator state frozen at save time (the live iterator keeps moving while an
    async save runs). grain's handler writes `get_state()` bytes of non-DatasetIterator items."""

    def __init__(self, state: dict):
        self._state = json.dumps(state, indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.is_main = jax.process_index() == 0
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def saved_config(self, step: int) -> Optional[dict]:
        path = os.path.join(self.step_dir(step), "config")
        if not os.path.exists(path):
            return None
        try:
            out = self.manager.restore(step,
                                       args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        except Exception as e:
            raise CorruptCheckpointError(f"cannot read the config of {self.step_dir(step)}: "
                                         f"{type(e).__name__}: {e}") from e
        return dict(out["config"])

    def check_compatible(self, step: int, config: dict, allow_change: bool = False) -> list:
        """Diff the checkpoint's config against `config`; raise if keys that matter differ."""
        saved = self.saved_config(step)
        if saved is None:
            log.warning("checkpoint %s has no stored config; cannot check compatibility",
                        self.step_dir(step))
            return []
        diff = diff_configs(saved, config, ignore=RESUME_SAFE_PREFIXES)
        if diff and not allow_change:
            raise IncompatibleCheckpointError(
                f"cannot resume from {self.step_dir(step)}: it was trained with a different "
                f"config. Differences:\n{format_diff(diff)}\nUse a fresh --workdir, or set "
                "--config.train.allow_config_change=True to resume anyway (model shapes must "
                "still match).")
        if diff:
            log.warning("resuming despite config differences:\n%s", format_diff(diff))
        return diff

    def save(self, step: int, state: dict, data_state: Optional[dict], config: dict) -> bool:
        self.wait()  # orbax waits for the previous save anyway; then its checksums are written
        items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            self._unsealed.append(step)
        return saved

    def _seal(self) -> None:
        """Write the checksums of finished saves (still on disk: max_to_keep may have gone)."""
        for step in self._unsealed:
            if self.is_main and os.path.isdir(self.step_dir(step)):
                integrity.write_checksums(self.step_dir(step))
        self._unsealed = []

    def verify(self, step: int) -> Optional[str]:
        """None if the checkpoint of `step` matches its checksums, else what is wrong. One saved
        by this process is sealed first; one without checksums (a run killed between finishing
        the save and writing them) is accepted with a warning and checked by the restore."""
        if step in self._unsealed:
            self.wait()
        d = self.step_dir(step)
        if not os.path.isdir(d):
            return "the directory is missing"
        if not integrity.has_checksums(d):
            log.warning("checkpoint %s has no %s: not verified", d, integrity.CHECKSUMS_FILE)
        return integrity.verify(d)

    def quarantine(self, step: int) -> str:
        """Move a bad checkpoint out of the manager's way (to checkpoints.corrupt/) so that the
        step can be saved again; returns where it went."""
        dest = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
        if self.is_main:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self.step_dir(step), dest)
        self.manager.reload()
        return dest

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raise IncompatibleCheckpointError listing leaves whose path, shape or dtype differ."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as e:  # metadata unreadable: let the restore itself report
            log.warning("could not read the metadata of %s: %s", self.step_dir(step), e)
            return
        if saved is None:
            return
        have = _shapes(saved)
        want = _shapes(abstract_state)
        problems = [f"  {k}: missing in the checkpoint" for k in sorted(set(want) - set(have))]
        problems += [f"  {k}: in the checkpoint only" for k in sorted(set(have) - set(want))]
        params_first = sorted(set(have) & set(want), key=lambda k: (not k.startswith("params"), k))
        problems += [f"  {k}: checkpoint {have[k][0]} {have[k][1]}, current {want[k][0]} "
                     f"{want[k][1]}" for k in params_first if have[k] != want[k]]
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise IncompatibleCheckpointError(
                f"cannot restore {self.step_dir(step)}: the train state differs (shapes or "
                "structure differ):\n" + "\n".join(problems[:20]) + more)

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> dict:
        """Restore the state into `abstract_state` (ShapeDtypeStructs with shardings) and, if
        given, set `data_iterator` to the saved position."""
        self.check_shapes(step, abstract_state)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = os.path.exists(os.path.join(self.step_dir(step), "data"))
        if data_iterator is not None and has_data:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # shapes matched the metadata above: the files are bad
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise CorruptCheckpointError(f"cannot read {self.step_dir(step)}: "
                                         f"{type(e).__name__}: {first}") from e
        if data_iterator is not None and not has_data:
            log.warning("checkpoint %s has no data-iterator state; data restarts from the "
                        "beginning", self.step_dir(step))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._seal()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple]:
    """{'params.layers.0.mixer.D': ((4,), 'float32'), ...} for any tree of array-likes."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(getattr(leaf, "shape", ()) or ())
        dtype = str(getattr(leaf, "dtype", ""))
        out[".".join(_key(k) for k in path)] = (shape, dtype)
    return out


def abstract_with_shardings(abstract_state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
