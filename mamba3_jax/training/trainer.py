"""The training loop: build (or restore) the sharded state, step, log, evaluate, checkpoint.

    summary = train(config, workdir)

Host/device overlap: the loop dispatches step s, then reads the metrics of step s-1 (which are
ready by then), so the host never waits for the device except at checkpoint and eval steps.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mamba3_jax.training import flops as flops_lib
from mamba3_jax.training import preflight
from mamba3_jax.training.checkpoint import (
    Checkpointer,
    CorruptCheckpointError,
    abstract_with_shardings,
)
from mamba3_jax.training.config import (
    config_json,
    model_config,
    profile_range,
    to_dict,
    validate,
)
from mamba3_jax.training.data import EvalData, train_dataset
from mamba3_jax.training.lock import WorkdirLock
from mamba3_jax.training.mesh import (
    batch_sharding,
    check_batch,
    host_batch_to_global,
    make_mesh,
    maybe_initialize_distributed,
    state_shardings,
)
from mamba3_jax.training.metrics import METRICS_FILE, MetricsWriter, read_jsonl, truncate_after
from mamba3_jax.training.optim import make_optimizer, warmup_warning
from mamba3_jax.training.step import (
    StepConfig,
    init_state,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
    model_graphdef,
    update_applied_nonfinite,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN/Inf loss, gradient norm or parameter norm."""

    def __init__(self, message: str, step: int, checkpoint: Optional[str]):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class DeviceMemoryError(MemoryError):
    """The train step does not fit in device memory (XLA's RESOURCE_EXHAUSTED), with what to
    change in the config."""


def out_of_memory(e: BaseException) -> bool:
    """Whether e is XLA running out of device memory (at compile or at run time)."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def memory_advice(config, n_devices: int, error: BaseException) -> str:
    """One line: what ran out, the per-device microbatch and remat, and what to change."""
    t, d = config.train, config.data
    micro = int(d.batch_size) // int(t.grad_accum) // n_devices  # validated to divide
    text = str(error).strip()
    first = text.splitlines()[0][:200] if text else type(error).__name__
    return (f"the train step does not fit in device memory ({first}); per device: {micro} "
            f"sequences x {int(d.seq_len)} tokens a microbatch, train.remat={t.remat!r}. Raise "
            f"train.grad_accum (smaller microbatches), set train.remat to a names policy or "
            f"'full', or shard the parameters with mesh.fsdp")


class _Preempted(Exception):
    pass


def _warn(text: str) -> None:
    if jax.process_index() == 0:
        sys.stderr.write(f"warning: {text}\n")
        sys.stderr.flush()


def summarize_records(records: list[dict]) -> tuple[dict, dict, Optional[float]]:
    """(last train metrics, last eval metrics, best eval bits/byte) of a metrics.jsonl, so that
    a resumed run reports the whole run, not only what this process saw."""
    def last(prefix):
        recs = [r for r in records if any(k.startswith(prefix) for k in r)]
        return {k[len(prefix):]: v for k, v in recs[-1].items() if k.startswith(prefix)} \
            if recs else {}
    bpb = [r["eval/bits_per_byte"] for r in records
           if isinstance(r.get("eval/bits_per_byte"), (int, float))]
    return last("train/"), last("eval/"), (min(bpb) if bpb else None)


def _use_compilation_cache(path: str) -> None:
    """Persistent XLA compilation cache (works on CPU too); re-initialised if the process had
    already compiled without one."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    if jax.config.jax_compilation_cache_dir != path:
        cc.set_cache_dir(path)
        cc.reset_cache()


def _to_float(x) -> float:
    return float(np.asarray(x))


class Trainer:
    """One training run in `workdir`. `run()` trains to `config.train.steps` (resuming if a
    checkpoint exists) and returns a summary dict."""

    def __init__(self, config, workdir: str, devices: Optional[Sequence] = None):
        validate(config)
        maybe_initialize_distributed()  # multi-process launches (env); before any device use
        self.config = config
        self.cfg_dict = to_dict(config)
        self.workdir = os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        t = config.train
        if t.compilation_cache_dir:
            _use_compilation_cache(t.compilation_cache_dir)

        # every input is read and checked before anything is compiled (ConfigError: one line)
        self.tokenizer, self._train_source, self._eval_source = preflight.load_inputs(config)
        preflight.check_backend(config)
        self.model_cfg = model_config(config, self.tokenizer.vocab_size)
        self.mesh = make_mesh(config.mesh, devices)
        check_batch(config, self.mesh)
        self.total_steps = int(t.steps)
        self.tx, self.schedule = make_optimizer(config.optim, self.total_steps)
        self.graphdef = model_graphdef(self.model_cfg)
        self._init_fn = functools.partial(init_state, self.model_cfg, self.tx, int(t.seed))
        self.abstract_state = jax.eval_shape(self._init_fn)
        self.state_sharding = state_shardings(self.abstract_state, self.mesh,
                                              int(config.mesh.fsdp_min_size))
        self.batch_sharding = batch_sharding(self.mesh)
        step_cfg = StepConfig(grad_accum=int(t.grad_accum), loss_chunk=int(t.loss_chunk),
                              remat=str(t.remat),
                              inject_nan_at_step=int(config.debug.inject_nan_at_step),
                              check_finite=bool(config.debug.check_finite),
                              manual_data_parallel=bool(config.mesh.manual_data_parallel))
        self.train_step = jit_train_step(
            make_train_step(self.graphdef, self.tx, self.schedule, step_cfg, self.mesh),
            self.state_sharding, self.batch_sharding, self.mesh)
        self.eval_step = jit_eval_step(
            make_eval_step(self.graphdef, int(t.loss_chunk), self.mesh,
                           bool(config.mesh.manual_data_parallel)),
            self.state_sharding, self.batch_sharding, self.mesh)
        self.tokens_per_step = int(config.data.batch_size) * int(config.data.seq_len)
        self.seq_len = int(config.data.seq_len)
        self.flops_per_token = flops_lib.train_flops_per_token(self.model_cfg, self.seq_len)
        self.n_devices = self.mesh.devices.size
        self.peak_flops = (float(t.peak_flops_per_device)
                           or flops_lib.peak_flops(jax.devices()[0].device_kind))
        for warning in (preflight.gpu_warning(jax.default_backend(), self.model_cfg,
                                              self.tokens_per_step, self.flops_per_token),
                        preflight.determinism_warning(bool(t.deterministic),
                                                      jax.default_backend())):
            if warning:
                _warn(warning)
        self._ckpt: Optional[Checkpointer] = None
        self._eval_data = None

    # ------------------------------------------------------------------ pieces

    @property
    def ckpt(self) -> Checkpointer:
        if self._ckpt is None:
            t = self.config.train
            self._ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                      keep=int(t.keep), async_save=bool(t.async_checkpoint))
        return self._ckpt

    def fresh_state(self) -> dict:
        """A newly initialised train state, created directly with its shardings."""
        return jax.jit(self._init_fn, out_shardings=self.state_sharding)()

    def put_batch(self, batch: dict) -> dict:
        """Host numpy batch (this host's rows) -> global arrays on the mesh."""
        return host_batch_to_global(batch, self.batch_sharding)

    def init_or_restore(self, data_iterator=None):
        """(state, start step, restored?) — the newest intact checkpoint if any, else a fresh
        state. A checkpoint that fails its checksums or cannot be read is named, moved to
        checkpoints.corrupt/ and the next older one is tried; if none is intact, nothing is
        moved and CorruptCheckpointError lists them."""
        steps = sorted(self.ckpt.all_steps(), reverse=True)
        if not steps:
            return self.fresh_state(), 0, False
        target = abstract_with_shardings(self.abstract_state, self.state_sharding)
        bad = []
        for step in steps:
            problem = self.ckpt.verify(step)
            if problem is None:
                try:
                    self.ckpt.check_compatible(step, self.cfg_dict,
                                               bool(self.config.train.allow_config_change))
                    state = self.ckpt.restore(step, target, data_iterator)
                except CorruptCheckpointError as e:
                    problem = str(e)
                else:
                    for b, why in bad:
                        moved = self.ckpt.quarantine(b)
                        _warn(f"checkpoint {self.ckpt.step_dir(b)} is corrupt: {why}; moved it "
                              f"to {moved}")
                    if bad:
                        _warn(f"resuming from the newest intact checkpoint, step {step}")
                    return state, int(np.asarray(state["step"])), True
            bad.append((step, problem))
        raise CorruptCheckpointError(
            f"no intact checkpoint in {self.ckpt.directory}: "
            + "; ".join(f"step {b}: {why}" for b, why in bad)
            + ". Move the checkpoints directory away to start from scratch.")

    def evaluate(self, state) -> dict:
        if self._eval_data is None:
            self._eval_data = EvalData(self.config, self.tokenizer, self._eval_source)
        sums = None
        for batch in self._eval_data:
            aux = self.eval_step(state, host_batch_to_global(batch, self.batch_sharding))
            sums = aux if sums is None else jax.tree.map(jnp.add, sums, aux)
        if sums is None:
            return {}
        s = {k: _to_float(v) for k, v in jax.device_get(sums).items()}
        tokens = max(s["tokens"], 1.0)
        loss = s["sum_nll"] / tokens
        return {"loss": loss,
                "bits_per_byte": s["sum_nll"] / (math.log(2.0) * max(s["bytes"], 1.0)),
                "perplexity": math.exp(min(loss, 700.0)), "accuracy": s["correct"] / tokens,
                "tokens": s["tokens"], "bytes": s["bytes"]}

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        """Train under the workdir lock (held by process 0: one run per workdir)."""
        os.makedirs(self.workdir, exist_ok=True)
        lock = WorkdirLock(self.workdir) if self.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        cfg, t = self.config, self.config.train
        t_start = time.time()
        train_ds = train_dataset(cfg, self.tokenizer, self._train_source)
        it = iter(train_ds)
        state, start, restored = self.init_or_restore(it)
        summary_path = os.path.join(self.workdir, "summary.json")
        metrics_path = os.path.join(self.workdir, METRICS_FILE)
        do_eval = int(t.eval_steps) > 0
        # a run stopped after its last checkpoint but before its final eval still owes it
        eval_missing = do_eval and start >= self.total_steps and not any(
            r.get("step") == start and "eval/loss" in r for r in read_jsonl(metrics_path))
        if start >= self.total_steps and os.path.exists(summary_path) and not eval_missing:
            it.close()
            self.ckpt.close()
            if self.is_main:
                print(f"already trained to step {start} >= train.steps={self.total_steps}; "
                      f"nothing to do ({summary_path})", flush=True)
            with open(summary_path, encoding="utf-8") as f:
                return json.load(f)
        if self.is_main:
            truncate_after(metrics_path, start)
            with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config_json(cfg))
        writer = MetricsWriter(self.workdir, enabled=self.is_main,
                               tensorboard=bool(t.tensorboard), progress=bool(t.progress),
                               total_steps=self.total_steps)
        n_params = self.model_cfg.num_params()
        writer.line(
            f"mamba3 training: {self.model_cfg.describe()}, {n_params / 1e6:.2f}M params, "
            f"{self.n_devices} device(s) "
            f"{dict(self.mesh.shape)}, {self.tokens_per_step} tokens/step, "
            f"{self.flops_per_token / 1e6:.1f} MFLOP/token; "
            + (f"resumed from step {start}" if restored else "fresh start")
            + f"; workdir {self.workdir}")
        warn = warmup_warning(cfg.optim, self.total_steps, n_params)
        if warn:
            writer.line(warn)
        profile = _Profile(profile_range(t.profile_steps), os.path.join(self.workdir, "profile"),
                           writer)

        data_states: OrderedDict[int, dict] = OrderedDict({start: it.get_state()})
        self._last_log = (time.time(), start)
        self._last_train: dict = {}
        self._last_eval: dict = {}
        self._best_eval = math.inf
        self._timed_from: Optional[tuple[float, int]] = None
        preempted = {"flag": False, "signal": None}

        def on_signal(signum, frame):  # preemption / Ctrl-C: checkpoint after this step, stop
            preempted["flag"], preempted["signal"] = True, signum
            # a second signal of the same kind stops at once (Ctrl-C twice: no checkpoint)
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT
                          else signal.SIG_DFL)

        old_handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old_handlers[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not in the main thread
                pass

        eval_every, ckpt_every = int(t.eval_every), int(t.checkpoint_every)
        pending = None
        self._preempted = False
        try:
            if do_eval and start == 0 and eval_every:
                self._log_eval(writer, 0, state)
            if eval_missing:
                self._log_eval(writer, start, state)
            for step in range(start + 1, self.total_steps + 1):
                profile.before(step)  # the trace includes data loading (host stalls)
                batch = next(it)
                data_states[step] = it.get_state()
                while len(data_states) > 4:
                    data_states.popitem(last=False)
                try:
                    state, m = self.train_step(state, host_batch_to_global(
                        batch, self.batch_sharding))
                except Exception as e:  # XLA's out-of-memory: one line on what to change
                    if out_of_memory(e):
                        raise DeviceMemoryError(memory_advice(
                            self.config, self.n_devices, e)) from e
                    raise
                if pending is not None:
                    self._handle(pending, state, data_states, writer)
                pending = (step, m)
                profile.after(step, m)
                if cfg.debug.step_delay:
                    time.sleep(float(cfg.debug.step_delay))
                last = step == self.total_steps
                want_ckpt = last or (ckpt_every and step % ckpt_every == 0) or preempted["flag"]
                want_eval = do_eval and (last or (eval_every and step % eval_every == 0))
                if want_ckpt or want_eval:
                    self._handle(pending, state, data_states, writer)
                    pending = None
                if want_ckpt:
                    self.ckpt.save(step, state, data_states[step], self.cfg_dict)
                    if step == int(cfg.debug.kill_at_checkpoint):  # fault injection (tests)
                        os.kill(os.getpid(), signal.SIGKILL)
                if want_eval:
                    self._log_eval(writer, step, state)
                if preempted["flag"] and not last:
                    if not want_ckpt:  # the signal came after the save decision (in the eval)
                        if pending is not None:
                            self._handle(pending, state, data_states, writer)
                            pending = None
                        self.ckpt.save(step, state, data_states[step], self.cfg_dict)
                    raise _Preempted(step)
            if pending is not None:
                self._handle(pending, state, data_states, writer)
        except _Preempted as e:
            self._preempted = True
            name = signal.Signals(preempted["signal"]).name
            writer.line(f"{name}: saved checkpoint at step {e.args[0]} and stopped")
        finally:
            profile.stop()
            self.ckpt.close()
            writer.close()
            it.close()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

        final_train, final_eval, best = self._last_train, self._last_eval, None
        if self.is_main:  # from metrics.jsonl: the whole run, including before a resume
            final_train, final_eval, best = summarize_records(read_jsonl(metrics_path))
        if best is None and self._best_eval != math.inf:
            best = self._best_eval
        summary = {
            "step": int(np.asarray(state["step"])),
            "params": n_params,
            "wall_time_sec": round(time.time() - t_start, 2),
            "final_train": final_train,
            "final_eval": final_eval,
            "best_eval_bits_per_byte": best,
            "workdir": self.workdir,
            "preempted": self._preempted,
            "signal": (signal.Signals(preempted["signal"]).name if self._preempted else None),
        }
        if self.is_main:
            with open(summary_path, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2, default=str)
        return summary

    def _log_eval(self, writer: MetricsWriter, step: int, state) -> None:
        ev = self.evaluate(state)
        if not ev:
            return
        self._last_eval = ev
        self._best_eval = min(self._best_eval, ev["bits_per_byte"])
        writer.write(step, ev, "eval")
        writer.line(f"eval step {step}: loss {ev['loss']:.4f} | bits/byte "
                    f"{ev['bits_per_byte']:.4f} | ppl {ev['perplexity']:.2f} | "
                    f"acc {ev['accuracy']:.3f}")

    def _handle(self, pending, state, data_states, writer: MetricsWriter) -> None:
        """Read one step's metrics (blocks until that step is done), stop on non-finite, log."""
        step, m_dev = pending
        m = {k: _to_float(v) for k, v in jax.device_get(m_dev).items()}
        if self.config.debug.check_finite and not m["finite"]:
            self._stop_nonfinite(step, m, state, data_states, writer)
        now = time.time()
        if self._timed_from is None:  # the first step includes compilation: time from here
            self._timed_from = (now, step)
            self._last_log = (now, step)
        t = self.config.train
        if step % int(t.log_every) and step != self.total_steps:
            return
        t0, s0 = self._last_log
        steps_per_sec = (step - s0) / (now - t0) if step > s0 and now > t0 else None
        tok_s = steps_per_sec * self.tokens_per_step if steps_per_sec else None
        out = {k: m[k] for k in ("loss", "bits_per_byte", "accuracy", "grad_norm", "param_norm",
                                 "lr")}
        out["perplexity"] = math.exp(min(m["loss"], 700.0))
        out["tokens_seen"] = step * self.tokens_per_step
        out["steps_per_sec"] = steps_per_sec
        out["tokens_per_sec"] = tok_s
        out["mfu"] = (flops_lib.mfu(tok_s, self.model_cfg, self.peak_flops, self.n_devices,
                                    self.seq_len) if tok_s else None)
        self._last_log = (now, step)
        self._last_train = out
        writer.write(step, out, "train")
        writer.progress(step, out)

    def _stop_nonfinite(self, step, m, state, data_states, writer) -> None:
        good = int(np.asarray(state["step"]))  # guarded steps left the last good state in place
        where = None
        applied = update_applied_nonfinite(m)
        if applied:  # this step's update is in the state: not a good one
            steps = [s for s in self.ckpt.all_steps() if s < good]
            good = max(steps) if steps else 0
            where = self.ckpt.step_dir(good) if steps else None
        elif good in data_states:
            problem = self.ckpt.verify(good) if good in self.ckpt.all_steps() else None
            if problem:  # never name a damaged checkpoint as the good state: write it again
                _warn(f"checkpoint {self.ckpt.step_dir(good)} is corrupt: {problem}; moved it "
                      f"to {self.ckpt.quarantine(good)}")
            if good not in self.ckpt.all_steps():
                ok_state = dict(state)
                ok_state["finite"] = jax.device_put(jnp.ones((), bool),
                                                    self.state_sharding["finite"])
                self.ckpt.save(good, ok_state, data_states[good], self.cfg_dict)
                self.ckpt.wait()
            where = self.ckpt.step_dir(good)
        if applied:
            tail = ("Its update made the parameters non-finite; "
                    + (f"the last good checkpoint is step {good}: {where}." if where
                       else "no checkpoint holds a good state."))
        else:
            tail = (f"Saved the last good state (step {good}) to {where}." if where
                    else f"The last good state is step {good} (no checkpoint written).")
        msg = (f"non-finite training at step {step}: loss={m['loss']}, "
               f"grad_norm={m['grad_norm']}, param_norm={m['param_norm']}. " + tail)
        writer.write(step, {"loss": m["loss"], "grad_norm": m["grad_norm"], "nonfinite": 1.0},
                     "train")
        writer.line(msg)
        raise NonFiniteLossError(msg, step, where)


class _Profile:
    """train.profile_steps: a jax.profiler trace of steps [start, stop) (every process writes
    its own file under `directory`; view with TensorBoard's profile plugin or Perfetto)."""

    def __init__(self, steps: Optional[tuple[int, int]], directory: str, writer: MetricsWriter):
        self.steps, self.directory, self.writer = steps, directory, writer
        self.active = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.steps[1] - 1:
            jax.block_until_ready(outputs)  # the trace holds the traced steps' device work
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.writer.line(f"profile of steps {self.steps[0]}..{self.steps[1] - 1} written "
                             f"to {self.directory}")


def train(config, workdir: str, devices: Optional[Sequence] = None) -> dict:
    return Trainer(config, workdir, devices).run()
