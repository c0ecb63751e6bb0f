"""Sweep expansion, launch commands and the results table / plot."""

import csv
import json
import os
import subprocess
import sys

import pytest

from mamba3_jax.training import sweep
from tests.training.common import REPO


def test_expand_grid_and_names():
    axes = [sweep.parse_axis("model.d_state=16,32,64,128"),
            sweep.parse_axis("--config.model.mimo_rank=1,4")]
    points = sweep.expand(axes)
    assert len(points) == 8
    assert points[0] == {"model.d_state": "16", "model.mimo_rank": "1"}
    assert points[1] == {"model.d_state": "16", "model.mimo_rank": "4"}
    assert sweep.run_name(points[-1]) == "d_state=128+mimo_rank=4"
    # same last component: the full key disambiguates
    assert sweep.run_name({"optim.eps": "1", "model.eps": "2"}) == "optim.eps=1+model.eps=2"


@pytest.mark.parametrize("bad", ["model.d_state", "d_state=1,2", "model.d_state=1,,2",
                                 "model.d_state=1,1"])
def test_bad_axes(bad):
    with pytest.raises(ValueError):
        sweep.parse_axis(bad)


def test_plan_commands():
    runs = sweep.plan("configs/small_gpu.py", "runs/sw",
                      [sweep.parse_axis("model.d_state=16,32")], {"train.steps": "100"})
    assert [r["name"] for r in runs] == ["d_state=16", "d_state=32"]
    cmd = runs[1]["command"]
    assert cmd[1:] == ["-m", "mamba3_jax.train", "--config", "configs/small_gpu.py",
                       "--workdir", os.path.join("runs/sw", "d_state=32"),
                       "--config.train.steps=100", "--config.model.d_state=32"]
    with pytest.raises(ValueError, match="both swept and fixed"):
        sweep.plan("c.py", "w", [sweep.parse_axis("train.steps=1,2")], {"train.steps": "5"})


def _fake_run(workdir, losses, evals, steps, params=1234567):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i, "train/loss": loss, "train/tokens_per_sec": 100.0 * i})
                    + "\n")
        for step, bpb in evals:
            f.write(json.dumps({"step": step, "eval/bits_per_byte": bpb, "eval/loss": bpb / 2})
                    + "\n")
        f.write('{"step": 99, "train/lo')  # a torn line from a killed run is ignored
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"train": {"steps": steps}}, f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump({"step": len(losses), "params": params, "wall_time_sec": 12.5}, f)


def test_collect_table_and_plot(tmp_path):
    axes = [sweep.parse_axis("model.d_state=16,32,64")]
    runs = sweep.plan("configs/x.py", str(tmp_path), axes)
    _fake_run(runs[0]["workdir"], [3.0, 2.5, 2.0], [(0, 8.0), (3, 3.5)], steps=3)
    _fake_run(runs[1]["workdir"], [3.0, 2.4], [(0, 8.0), (2, 3.0), (2, 3.1)], steps=3)
    out = sweep.write_results(runs, str(tmp_path))
    rows = list(csv.DictReader(open(out["csv"])))
    assert [r["run"] for r in rows] == ["d_state=16", "d_state=32", "d_state=64"]
    assert [r["model.d_state"] for r in rows] == ["16", "32", "64"]
    assert [r["status"] for r in rows] == ["complete", "incomplete", "missing"]
    assert float(rows[0]["train_loss"]) == 2.0 and float(rows[0]["eval_bpb"]) == 3.5
    assert float(rows[1]["eval_bpb"]) == 3.1 and float(rows[1]["best_eval_bpb"]) == 3.0
    assert float(rows[0]["tokens_per_sec"]) == 200.0
    assert float(rows[0]["params_M"]) == pytest.approx(1.235, abs=1e-3)
    assert rows[2]["eval_bpb"] == ""
    md = open(out["md"]).read().splitlines()
    assert md[0].startswith("| run | model.d_state | status |")
    assert len(md) == 2 + 3 and "| d_state=16 | 16 | complete |" in md[2]
    assert os.path.getsize(out["png"]) > 1000


def test_cli_dry_run_prints_commands(tmp_path):
    r = subprocess.run([sys.executable, "experiments/sweep.py", "--config",
                        "configs/tiny_cpu.py", "--workdir", str(tmp_path), "--sweep",
                        "model.d_state=16,32", "--sweep", "model.mimo_rank=1,4", "--set",
                        "train.steps=10", "--dry_run"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 4
    assert lines[3].endswith("--config.train.steps=10 --config.model.d_state=32 "
                             "--config.model.mimo_rank=4")
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_cli_exit_code_when_a_run_fails(tmp_path):
    """A failed point makes the sweep exit non-zero (after still writing the table)."""
    r = subprocess.run([sys.executable, "experiments/sweep.py", "--config",
                        "tests/training/tiny_config.py", "--workdir", str(tmp_path), "--sweep",
                        "model.d_state=7"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 of 1 runs failed: ['d_state=7']" in r.stderr
    assert "d_state must be even" in (tmp_path / "d_state=7" / "train.log").read_text()
    assert (tmp_path / "results.md").exists()


def test_run_all_starts_no_run_that_would_outlast_the_deadline(tmp_path):
    """With a deadline, a run starts only while the time left exceeds the longest run so far."""
    import time

    def run(name, seconds):
        return {"name": name, "workdir": str(tmp_path / name),
                "command": [sys.executable, "-c", f"import time; time.sleep({seconds})"]}

    lines = []
    codes = sweep.run_all([run("a", 1.0), run("b", 0.0)], echo=lines.append,
                          deadline=time.time() + 0.5)
    assert codes == {"a": 0}  # a started (nothing timed yet); b would not fit after it
    assert "b: not started" in lines[-1]
    assert sweep.run_all([run("c", 0.0), run("d", 0.0)], echo=lines.append,
                         deadline=time.time() + 60) == {"c": 0, "d": 0}


def _sweep_of_two_started(tmp_path, child: str, **popen):
    """A sweep driver process running runs 'a' then 'b' (each `python -c child`, in tmp_path),
    returned once run 'a' has written tmp_path/started."""
    import time

    driver = (
        "import sys, json\n"
        "from mamba3_jax.training import sweep\n"
        f"runs = [dict(name=n, workdir={str(tmp_path)!r} + '/' + n, "
        f"command=[sys.executable, '-c', {child!r}]) for n in ('a', 'b')]\n"
        "print(json.dumps(sweep.run_all(runs)), flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": REPO}, **popen)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    return proc


def test_a_terminated_sweep_passes_the_signal_to_its_run_and_starts_no_other(tmp_path):
    """`timeout -s TERM` on a sweep (a device call's limit): the training in progress gets the
    signal (it checkpoints and stops), and no later run starts."""
    import signal

    child = ("import pathlib, signal, sys, time\n"
             "def stop(*_):\n"
             "    pathlib.Path('got_term').write_text('checkpointed'); sys.exit(143)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "pathlib.Path('started').write_text('1')\n"
             "time.sleep(60)\n")
    proc = _sweep_of_two_started(tmp_path, child)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert (tmp_path / "got_term").read_text() == "checkpointed", out
    assert '{"a": 143}' in out and "stopped by signal" in out, out
    assert not (tmp_path / "b").exists()  # no run started after the signal


def test_ctrl_c_reaches_the_run_once_and_starts_no_other(tmp_path):
    """Ctrl-C signals the whole foreground group: the training gets that one SIGINT (a second
    would make it stop without its checkpoint), and the sweep starts no later run."""
    import signal

    child = ("import pathlib, signal, sys, time\n"
             "seen = []\n"
             "signal.signal(signal.SIGINT, lambda *_: seen.append(1))\n"
             "pathlib.Path('started').write_text('1')\n"
             "t = time.time()\n"
             "while not seen and time.time() < t + 60: time.sleep(0.05)\n"
             "time.sleep(0.5)\n"
             "pathlib.Path('sigints').write_text(str(len(seen))); sys.exit(130)\n")
    proc = _sweep_of_two_started(tmp_path, child, start_new_session=True)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out = proc.communicate(timeout=60)[0]
    assert (tmp_path / "sigints").read_text() == "1", out
    assert '{"a": 130}' in out and not (tmp_path / "b").exists(), out


def test_lm_compare_shards_split_the_plan(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "experiments"))
    import lm_compare

    base = ["--study", "ablations", "--workdir", str(tmp_path), "--dry_run"]
    lm_compare.main(base)
    every = capsys.readouterr().out.splitlines()
    halves = []
    for i in (0, 1):
        lm_compare.main(base + ["--shard", f"{i}/2"])
        halves.append(capsys.readouterr().out.splitlines())
    assert halves[0] == every[0::2] and halves[1] == every[1::2] and len(every) >= 4
    with pytest.raises(SystemExit, match="needs 0 <= i < n"):
        lm_compare.main(base + ["--shard", "2/2"])
