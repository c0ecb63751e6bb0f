"""Fault injection, one test per guarantee: nothing is lost and nothing bad is restored.

kill -9 in the middle of a checkpoint write and between the write and its checksums; truncated,
bit-flipped and metadata-less checkpoints (fall back to the newest intact one, naming the bad
ones); two runs on one workdir (the second stops; a dead run's lock is taken over); Ctrl-C
(saves like SIGTERM); a missing final eval (run on resume); a NaN stop whose last checkpoint
was damaged (written again). All reuse the tiny run of the `runs` fixture as the reference.
"""

import json
import os
import re
import shutil
import signal

import pytest

from mamba3_jax.training import integrity
from mamba3_jax.training.checkpoint import Checkpointer, CorruptCheckpointError
from mamba3_jax.training.lock import WorkdirBusyError, WorkdirLock
from mamba3_jax.training.metrics import read_jsonl
from mamba3_jax.training.trainer import NonFiniteLossError, Trainer, summarize_records, train
from tests.training.common import (
    RESUME_STEPS,
    assert_same_curves,
    cli,
    cli_popen,
    curve,
    resume_args,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.xdist_group("training_resume")


# ----------------------------------------------------------------------------- pure pieces


def _biggest_file(directory) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def _flip_bit(path, offset=None) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0x10
        f.seek(0)
        f.write(data)


def test_checksums_find_truncation_flip_and_deletion(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 40)
    (tmp_path / "sub" / "b.json").write_text('{"x": 1}')
    integrity.write_checksums(str(tmp_path))
    assert integrity.verify(str(tmp_path)) is None
    _flip_bit(tmp_path / "a.bin")
    assert "a.bin has changed" in integrity.verify(str(tmp_path))
    _flip_bit(tmp_path / "a.bin")  # flipped back: intact again
    assert integrity.verify(str(tmp_path)) is None
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(100)
    assert integrity.verify(str(tmp_path)) == "file a.bin has 100 bytes, 10240 were written"
    (tmp_path / "a.bin").write_bytes(bytes(range(256)) * 40)
    os.remove(tmp_path / "sub" / "b.json")
    assert integrity.verify(str(tmp_path)) == f"file {os.path.join('sub', 'b.json')} is missing"


def test_workdir_lock_busy_and_stale(tmp_path):
    import fcntl

    path = tmp_path / "run.lock"
    path.write_text('{"pid": 4242, "host": "other", "time": 0}')
    with open(path) as holder:  # another holder: a flock on a separate open file
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(WorkdirBusyError, match="in use by another run .pid 4242 on other"):
            WorkdirLock(str(tmp_path)).acquire()
    with WorkdirLock(str(tmp_path)):
        WorkdirLock(str(tmp_path)).acquire()  # nested in one process (CLI, then Trainer): fine
    assert path.read_text() == ""  # released cleanly
    # a lock file whose process died (no flock held) is taken over
    (tmp_path / "run.lock").write_text('{"pid": 999999, "host": "h", "time": 0}')
    with WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


def test_summary_from_records():
    records = [{"step": 0, "eval/bits_per_byte": 8.0, "eval/loss": 5.0},
               {"step": 1, "train/loss": 4.0}, {"step": 2, "train/loss": 3.0},
               {"step": 2, "eval/bits_per_byte": 6.5, "eval/loss": 4.5},
               {"step": 3, "train/loss": "nan", "train/nonfinite": 1.0}]
    train_m, eval_m, best = summarize_records(records)
    assert train_m == {"loss": "nan", "nonfinite": 1.0}
    assert eval_m == {"bits_per_byte": 6.5, "loss": 4.5}
    assert best == 6.5
    assert summarize_records([]) == ({}, {}, None)


# ----------------------------------------------------------------------------- kills


def test_kill_during_async_save_resumes_exactly(runs, tmp_path, jax_cache):
    """SIGKILL while checkpoint 6 is being written: the partial step is never restored."""
    r = cli(resume_args(tmp_path, jax_cache, "--config.debug.kill_at_checkpoint=6"))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert not (tmp_path / "checkpoints" / "6" / integrity.CHECKSUMS_FILE).exists()
    resumed = cli(resume_args(tmp_path, jax_cache))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert re.search(r"resumed from step [46]\b", resumed.stdout), resumed.stdout
    assert_same_curves(runs["full"], tmp_path)


def test_kill_before_checksums_and_final_eval(runs, tmp_path, jax_cache):
    """SIGKILL after the last checkpoint is complete but before its checksums and the final
    eval: the resume accepts the unverified checkpoint and runs only the missing eval."""
    r = cli(resume_args(tmp_path, jax_cache, "--config.train.async_checkpoint=False",
                        f"--config.debug.kill_at_checkpoint={RESUME_STEPS}"))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    assert (tmp_path / "checkpoints" / str(RESUME_STEPS)).is_dir()
    assert RESUME_STEPS not in curve(tmp_path, "eval/bits_per_byte")
    assert not (tmp_path / "summary.json").exists()
    resumed = cli(resume_args(tmp_path, jax_cache))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from step {RESUME_STEPS}" in resumed.stdout
    assert f"eval step {RESUME_STEPS}:" in resumed.stdout
    assert "not verified" in resumed.stderr
    assert_same_curves(runs["full"], tmp_path)
    summary = json.load(open(tmp_path / "summary.json"))
    want = json.load(open(runs["full"] / "summary.json"))
    assert summary["final_eval"] == want["final_eval"]
    assert summary["best_eval_bits_per_byte"] == want["best_eval_bits_per_byte"] == min(
        curve(runs["full"], "eval/bits_per_byte").values())
    again = cli(resume_args(tmp_path, jax_cache))  # now nothing is missing
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout


# ----------------------------------------------------------------------------- corruption


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("summary.json", "run.lock"))
    return dst


def test_corrupt_checkpoints_fall_back_to_newest_intact(runs, tmp_path, jax_cache):
    """Checkpoint 8 truncated, 6 with a flipped bit in a state chunk, 4 without its metadata:
    each is named with its defect and moved aside; the run resumes from 2 and repeats the
    reference curves exactly."""
    work = _copy_run(runs["full"], tmp_path / "w")
    ck = work / "checkpoints"
    chunk8 = _biggest_file(ck / "8" / "state")
    with open(chunk8, "r+b") as f:
        f.truncate(os.path.getsize(chunk8) // 2)
    _flip_bit(_biggest_file(ck / "6" / "state"))
    os.remove(ck / "4" / "state" / "_METADATA")
    r = cli(resume_args(work, jax_cache))
    assert r.returncode == 0, r.stdout + r.stderr
    err = r.stderr
    assert re.search(rf"checkpoint {ck / '8'} is corrupt: file state/\S+ has \d+ bytes", err), err
    assert re.search(rf"checkpoint {ck / '6'} is corrupt: file state/\S+ has changed", err), err
    assert f"checkpoint {ck / '4'} is corrupt: file state/_METADATA is missing" in err, err
    assert "resuming from the newest intact checkpoint, step 2" in err
    assert "Traceback" not in err
    assert sorted(d.split("-")[0] for d in os.listdir(work / "checkpoints.corrupt")) == \
        ["4", "6", "8"]
    assert_same_curves(runs["full"], work)


def test_no_intact_checkpoint_is_an_error(runs, tmp_path, jax_cache):
    work = _copy_run(runs["full"], tmp_path / "w")
    for step in os.listdir(work / "checkpoints"):
        _flip_bit(work / "checkpoints" / step / "config" / "metadata", offset=2)
    tr = Trainer(tiny_config(jax_cache), str(work))
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint") as e:
        tr.init_or_restore()
    assert all(f"step {s}: file config/metadata has changed" in str(e.value)
               for s in (2, 4, 6, 8))
    assert not (work / "checkpoints.corrupt").exists()  # nothing moved: the user decides


# ----------------------------------------------------------------------------- processes


def test_second_run_on_busy_workdir_stops(tmp_path, jax_cache):
    """A live holder of the workdir lock (here: this process) makes a second run exit 2 with
    one line naming the holder, before it reads data or compiles."""
    import fcntl

    (tmp_path / "run.lock").write_text('{"pid": 4242, "host": "other", "time": 0}')
    with open(tmp_path / "run.lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        r = cli(resume_args(tmp_path, jax_cache))
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: workdir {tmp_path} is in use by another run (pid 4242 on other, started "
        "1970-01-01 00:00:00); wait for it to finish or use another --workdir".replace(
            "1970-01-01 00:00:00", _local_epoch()))
    assert not (tmp_path / "metrics.jsonl").exists()


def _local_epoch() -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(0))


def _stop_with(sig, workdir, jax_cache, after_step: int) -> tuple[int, str]:
    """Start (or resume) a slowed-down run, send `sig` once it has logged `after_step`; return
    the step of the checkpoint it saved and its output."""
    p = cli_popen(resume_args(workdir, jax_cache, "--config.debug.step_delay=0.4",
                              "--config.train.checkpoint_every=100"))
    wait_for(lambda: any(s >= after_step for s in curve(workdir, "train/loss")), p,
             f"step {after_step}")
    p.send_signal(sig)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 128 + sig, out
    assert f"{signal.Signals(sig).name}: saved checkpoint at step" in out, out
    assert "Traceback" not in out, out
    saved = max(int(d) for d in os.listdir(workdir / "checkpoints"))
    assert max(curve(workdir, "train/loss")) == saved  # no step after the checkpoint is lost
    return saved, out


def test_sigint_and_sigterm_save_then_resume_exactly(runs, tmp_path, jax_cache):
    """Ctrl-C (SIGINT) and preemption (SIGTERM) both checkpoint after the current step and
    exit 128 + signal; a lock file left by a dead run is taken over; the run finished in three
    pieces repeats the reference curves exactly."""
    first, _ = _stop_with(signal.SIGINT, tmp_path, jax_cache, after_step=2)
    assert 2 <= first < RESUME_STEPS - 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(first)]
    second, out = _stop_with(signal.SIGTERM, tmp_path, jax_cache, after_step=first + 1)
    assert f"resumed from step {first}" in out and first < second
    # a lock file whose process is gone (as after a kill -9) does not block the resume
    (tmp_path / "run.lock").write_text('{"pid": 999999, "host": "gone", "time": 0}')
    resumed = cli(resume_args(tmp_path, jax_cache))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taking over the stale lock" in resumed.stderr and "pid 999999" in resumed.stderr
    assert_same_curves(runs["full"], tmp_path)


# ----------------------------------------------------------------------------- NaN


def test_nan_stop_rewrites_a_damaged_last_good_checkpoint(tmp_path, jax_cache, monkeypatch):
    """The NaN at step 3 names checkpoint 2 as the last good state only after verifying it:
    damaged after it was written, it is moved aside and written again."""
    save, damaged = Checkpointer.save, []

    def save_then_damage(self, step, *args, **kw):
        out = save(self, step, *args, **kw)
        if not damaged:  # only the first save: the rewrite must stay intact
            self.wait()  # complete and sealed
            _flip_bit(_biggest_file(os.path.join(self.step_dir(step), "state")))
            damaged.append(step)
        return out

    monkeypatch.setattr(Checkpointer, "save", save_then_damage)
    c = tiny_config(jax_cache)
    c.debug.inject_nan_at_step = 3  # the program of test_resume's NaN test (cached)
    c.train.eval_steps = 0
    with pytest.raises(NonFiniteLossError) as e:
        train(c, str(tmp_path))
    monkeypatch.undo()
    assert damaged == [2]
    assert e.value.checkpoint == str(tmp_path / "checkpoints" / "2")
    assert len(os.listdir(tmp_path / "checkpoints.corrupt")) == 1
    ck = Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.all_steps() == [2] and ck.verify(2) is None  # the rewrite was not damaged
    ck.close()
    assert read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]["train/nonfinite"] == 1.0


def test_out_of_device_memory_is_one_line_on_what_to_change(tmp_path, jax_cache, monkeypatch):
    """XLA's RESOURCE_EXHAUSTED in the train step (a batch or remat that does not fit) stops
    the run with DeviceMemoryError naming the per-device microbatch, the remat policy and the
    knobs to turn (the CLI prints it as one 'error:' line, exit code 2); other errors pass."""
    from mamba3_jax.training import trainer as trainer_lib

    c = tiny_config(jax_cache)
    c.train.eval_steps = 0
    tr = Trainer(c, str(tmp_path))

    class Step:  # the jitted step as the loop calls it, raising like XLA
        def __init__(self, error):
            self.error = error

        def __call__(self, state, batch):
            raise self.error

    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.12GiB.\n"
                       "BufferAssignment OOM Debugging. (many more lines)")
    tr.train_step = Step(oom)
    with pytest.raises(trainer_lib.DeviceMemoryError) as e:
        tr.run()
    msg = str(e.value)
    micro = c.data.batch_size // c.train.grad_accum
    assert "\n" not in msg and "Out of memory while trying to allocate 81.12GiB" in msg, msg
    assert f"{micro} sequences x {c.data.seq_len} tokens" in msg and "train.grad_accum" in msg
    assert f"train.remat={c.train.remat!r}" in msg and "mesh.fsdp" in msg
    tr2 = Trainer(c, str(tmp_path / "other"))
    tr2.train_step = Step(ValueError("something else"))
    with pytest.raises(ValueError, match="something else"):
        tr2.run()
