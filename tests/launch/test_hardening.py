"""Runs that never lose progress, never hang, and answer everyday mistakes with one line: resume from the
newest complete checkpoint, Ctrl-C, quiet output, and the mistakes a new user makes on the command line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from raydiff.launch.interrupts import Terminated
from raydiff.launch.trainer import fit_interruptibly, launch_training_task

pytestmark = pytest.mark.slow


def steps_of(checkpoint: str) -> list[int]:
    return [h["step"] for h in json.loads(Path(checkpoint, "trainer_state.json").read_text())["log_history"]]


def test_resume_takes_the_newest_complete_checkpoint_whatever_rays_own_list_says(one_worker_run, capsys):
    cfg, first, _, _ = one_worker_run  # 4 steps on one Ray Train worker, checkpoints at 2 and 4
    cfg = cfg.model_copy(deep=True)
    run = Path(cfg.ray.storage_path, "newest")
    assert (run / "checkpoint-000004" / ".raydiff-complete").is_file()
    # As when Ctrl-C lands between Ray's upload and its bookkeeping: Ray's list ends at step 2, and a
    # checkpoint-000006 holds files but was never completed.
    snapshot = run / "checkpoint_manager_snapshot.json"
    text = snapshot.read_text()
    assert "checkpoint-000004" in text
    snapshot.write_text(text.replace("checkpoint-000004", "checkpoint-000002"))
    shutil.copytree(first.checkpoint.path, run / "checkpoint-000006")
    (run / "checkpoint-000006" / ".raydiff-complete").unlink()
    capsys.readouterr()

    cfg.train.max_steps, cfg.train.learning_rate = 6, 5e-4
    resumed = launch_training_task(cfg)
    out = capsys.readouterr().out
    assert "continuing from checkpoint-000004 (step 4); changed since then: train.learning_rate: 0.001 -> " \
           "0.0005, train.max_steps: 4 -> 6" in out
    assert steps_of(resumed.checkpoint.path) == [1, 2, 3, 4, 5, 6]  # not 3, 4 again from Ray's step 2
    state = json.loads(Path(resumed.checkpoint.path, "trainer_state.json").read_text())
    assert [h["lr"] for h in state["log_history"][4:]] == pytest.approx([5e-4, 5e-4])  # the new rate applies
    assert f"a re-run of newest continues from {run}/checkpoint-000006" in out

    cfg.train.max_steps = 5  # fewer steps than done: nothing to train, the newest checkpoint is returned
    again = launch_training_task(cfg)
    assert "nothing to train: checkpoint-000006 is at step 6" in capsys.readouterr().out
    assert again.checkpoint.path == resumed.checkpoint.path and steps_of(again.checkpoint.path) == list(range(1, 7))


@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_fit_stops_at_once_on_ctrl_c_or_sigterm_even_while_the_trainer_waits(sig, raised):
    class Waiting:  # a trainer stuck waiting for resources (for a minute: a failing test must not hang)
        def fit(self):
            threading.Event().wait(60)

    stopped = []
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, args=(os.getpid(), sig)).start()  # a terminal's Ctrl-C, a scheduler's stop
    start = time.monotonic()
    with pytest.raises(raised):
        fit_interruptibly(Waiting(), stop=lambda: stopped.append(True))
    assert stopped == [True] and time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own SIGTERM handling is back


def interrupt_after(checkpoint: Path, sent: list) -> None:
    """Ctrl-C to this process once `checkpoint` is complete; `sent` gets the time."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (checkpoint / ".raydiff-complete").exists():
        time.sleep(0.02)
    sent.append(time.monotonic())
    os.kill(os.getpid(), signal.SIGINT)


class Recorded:
    """A trainer whose fit() notes in `events` when it has ended (returned or raised)."""

    def __init__(self, trainer, events: list):
        self.trainer, self.events = trainer, events

    def fit(self):
        try:
            return self.trainer.fit()
        finally:
            self.events.append("loop unwound")


def test_ctrl_c_in_local_mode_stops_the_loop_before_ray_and_says_where_a_rerun_continues(ray_session, make_config,
                                                                                         monkeypatch, capsys):
    """Local mode trains in fit()'s thread: Ray shut down under a loop still reading from Ray Data makes Ray end
    the process (exit 1, no closing lines), so the loop is told to stop and unwinds first. The real loop, in this
    process on the session's Ray, whose shutdown is recorded instead (the Ctrl-C test below runs the command
    with its own Ray, on workers)."""
    from raydiff.launch import trainer

    events, sent = [], []
    monkeypatch.setattr(trainer, "fit_interruptibly", lambda t, local: fit_interruptibly(
        Recorded(t, events), stop=lambda: events.append("ray stopped"), local=local))
    cfg = make_config("local-stop", train={"max_steps": None, "num_epochs": 50, "save_steps": 3},
                      ray={"num_workers": 0})
    run = Path(cfg.ray.storage_path, "local-stop")
    threading.Thread(target=interrupt_after, args=(run / "checkpoint-000003", sent), daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch_training_task(cfg)
    assert time.monotonic() - sent[0] < 10
    assert events == ["loop unwound", "ray stopped"]
    lines = capsys.readouterr().out.strip().splitlines()
    complete = sorted(p.parent.name for p in run.glob("checkpoint-*/.raydiff-complete"))
    assert complete[0] == "checkpoint-000003" and complete[-1] < "checkpoint-000100"  # long before 800 steps
    assert lines[-1] == f"[raydiff] a re-run of local-stop continues from {run}/{complete[-1]}"
    assert "[raydiff] interrupted: stopping the run" in lines
    assert all(line.startswith("[raydiff] ") for line in lines), [x for x in lines if not x.startswith("[raydiff]")]


def test_the_cli_exits_130_on_ctrl_c_and_143_on_sigterm(monkeypatch):
    from raydiff.launch import cli

    for stop, code in [(KeyboardInterrupt(), 130), (Terminated(), 143)]:
        def train(args, stop=stop):  # the run, stopped (fit_interruptibly has printed the resume point)
            raise stop

        monkeypatch.setattr(cli, "cmd_train", train)  # build_parser binds `train` to cmd_train when main runs
        with pytest.raises(SystemExit) as exit_:
            cli.main(["train", "config.yaml"])
        assert exit_.value.code == code


def test_sigterm_before_training_starts_ends_the_command_as_ctrl_c_does(monkeypatch, capsys):
    from raydiff.launch import cli

    def train(args):  # still checking the config or starting Ray when a scheduler's stop arrives
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "cmd_train", train)
    before = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "config.yaml"])
    assert exit_.value.code == 143 and time.monotonic() - start < 5
    assert capsys.readouterr().out == "[raydiff] interrupted (SIGTERM): raydiff train stopped\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handling is back


SIGTERM_DURING_RAY_INIT = """
import os, signal, sys, threading
from raydiff.config import parse_config
from raydiff.launch.cluster import init_ray
from raydiff.launch.interrupts import Terminated, raise_on_sigterm
cfg = parse_config({"model": {"path": "m"}, "data": {"metadata_path": "d.csv"}, "ray": {"num_cpus": 1}})
raise_on_sigterm()  # as the CLI does
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()  # Ray is still starting
try:
    init_ray(cfg)
except Terminated:
    print("Terminated while Ray started")
    sys.exit(143)
"""


def test_a_sigterm_while_ray_starts_ends_as_ctrl_c_does(tmp_path):
    """ray.init installs a SIGTERM handler that exits 15 without a word; raydiff keeps its own (Terminated)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_DURING_RAY_INIT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (143, "Terminated while Ray started\n"), proc.stderr[-2000:]


def cli_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    env.pop("RAY_ADDRESS", None)
    return env


def cli_args(*args) -> list[str]:
    return [sys.executable, "-m", "raydiff.launch.cli", *args]


def cli(*args, cwd, **kwargs):
    return subprocess.Popen(cli_args(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def project(tmp_path, tiny_model) -> Path:
    """A user's directory: a model, data and the tiny example config, all by relative paths."""
    from raydiff.data.shapes import write_shapes_dataset

    (tmp_path / "models").mkdir()
    os.symlink(tiny_model("flux"), tmp_path / "models" / "tiny-flux")
    write_shapes_dataset(str(tmp_path / "data" / "shapes"), n=16)
    shutil.copy(Path(__file__).resolve().parents[2] / "examples" / "flux" / "tiny.yaml", tmp_path / "tiny.yaml")
    return tmp_path


def test_ctrl_c_ends_a_cli_run_in_seconds_and_says_where_a_rerun_continues(tiny_model, tmp_path):
    """`raydiff train` on its own local Ray with 2 workers (local mode's loop: the test above)."""
    cwd = project(tmp_path, tiny_model)
    proc = cli("train", "tiny.yaml", "--set", "train.max_steps=null", "--set", "train.num_epochs=50",
               "--set", "train.save_steps=3", "--set", "ray.num_cpus=4", "--set", "ray.num_workers=2",
               cwd=cwd)
    lines, sent = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if sent is None and "step 5/" in line:
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
    proc.wait(timeout=60)
    assert proc.returncode == 130, lines[-20:]
    assert time.monotonic() - sent < 10
    complete = sorted(p.parent.name for p in (cwd / "runs" / "tiny-flux").glob("checkpoint-*/.raydiff-complete"))
    assert complete and complete[-1] < "checkpoint-000100"  # stopped long before the planned 200 steps
    assert lines[-1] == f"[raydiff] a re-run of tiny-flux continues from {cwd}/runs/tiny-flux/{complete[-1]}"
    # A default run shows raydiff's own lines only: no Ray banners, warnings or forwarded worker logs.
    assert all(line.startswith("[raydiff] ") for line in lines), [x for x in lines if not x.startswith("[raydiff]")]


MISTAKES = [
    ("model.path=models/tiny-flxu", "model.path models/tiny-flxu: no such directory (did you mean "
                                    "models/tiny-flux?)"),
    ("model.path=black-forest-labs/FLUX.1-dev", "is neither a local directory nor, with HF_HUB_OFFLINE=1, in the "
                                                "Hugging Face cache"),
    ("model.family=sd3", "holds a FluxPipeline; set model.family: flux"),
    ("ray.num_workers=8", "ray.num_workers 8 x (ray.cpus_per_worker 1) plus data.num_cpus for decoding needs 8.5 "
                          "CPUs"),
    ("ray.address=127.0.0.1:9", "ray.address 127.0.0.1:9: no Ray there (connection refused); start its head with "
                                "`ray start --head`"),
    ("lora.init_from=loras/nope.safetensors", "loras/nope.safetensors: no such file or checkpoint directory"),
    ("lora.init_from=data/shapes/metadata.csv", "data/shapes/metadata.csv is not a safetensors file"),
]


@pytest.fixture(scope="module")
def mistakes(start_command, tiny_model, tmp_path_factory):
    """override -> (the user's directory, `raydiff train tiny.yaml --set override` run there): all started
    together, as each spends its second or so on one core."""
    started = {}
    for override, _ in MISTAKES:
        cwd = project(tmp_path_factory.mktemp("mistake"), tiny_model)
        args = cli_args("train", "tiny.yaml", "--set", override, "--set", "ray.num_cpus=4")
        started[override] = cwd, start_command(args, cwd=cwd, env=cli_env(), stderr=subprocess.STDOUT)
    return started


@pytest.mark.parametrize("override, message", MISTAKES)
def test_everyday_mistakes_end_in_seconds_with_one_line_and_leave_nothing(mistakes, override, message):
    cwd, command = mistakes[override]
    proc = command.result(timeout=60)
    out = proc.stdout
    assert proc.returncode == 2, out
    assert out.strip().splitlines() == [f"raydiff: error: {out.split('raydiff: error: ', 1)[1].strip()}"]
    assert message in out
    assert command.elapsed < 10
    assert not (cwd / "runs").exists()  # no half-made run directory (Ray's storage marker included)


def test_a_lora_target_mistake_ends_in_the_driver_with_one_line(ray_session, tiny_model, tmp_path, monkeypatch,
                                                                capsys):
    """lora.target_modules is checked on the model's skeleton while Ray starts (this imports diffusers in the
    driver, so no 10 s bound here; run in this process, on the session's Ray); a lora.init_from that is missing
    or no safetensors file is refused before (above)."""
    from raydiff.launch.cli import main

    message = "lora.target_modules: 'proj_out' matches 1 layers in the transformer blocks and also proj_out outside"
    monkeypatch.chdir(project(tmp_path, tiny_model))
    with pytest.raises(SystemExit) as exit_:
        main(["train", "tiny.yaml", "--set", "lora.target_modules=[proj_out]"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err[-3000:]
    assert out == "" and err.strip().splitlines() == [f"raydiff: error: {err.split('raydiff: error: ', 1)[1].strip()}"]
    assert message in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("storage", ["runs", "file://{cwd}/runs"])
def test_a_second_cli_run_of_a_held_name_is_refused_naming_the_holder(tiny_model, tmp_path, storage):
    cwd = project(tmp_path, tiny_model)
    (cwd / "runs" / "tiny-flux").mkdir(parents=True)
    holder = {"host": os.uname().nodename, "pid": os.getpid(), "started": time.time(), "heartbeat": time.time(),
              "token": "other"}
    (cwd / "runs" / "tiny-flux" / ".raydiff-lock.json").write_text(json.dumps(holder))
    # Refused before Ray starts: the address of a Ray that does not exist is never tried.
    proc = cli("train", "tiny.yaml", "--set", "ray.address=127.0.0.1:9", "--set",
               f"ray.storage_path={storage.format(cwd=cwd)}", cwd=cwd)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert f"is in use by another run (pid {os.getpid()} on host {os.uname().nodename}" in out


def test_export_and_sample_mistakes_are_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    """The commands run in this process (`main`, as the console script calls it): neither starts Ray."""
    from raydiff.config import dump_config, parse_config
    from raydiff.launch.cli import main
    from raydiff.training import lora as lora_lib
    from raydiff.training.module import PipelineTrainingModule

    def command(*args) -> tuple[int, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out = capsys.readouterr()
        return code, out.out + out.err

    cfg = parse_config({"model": {"path": tiny_model("flux"), "max_sequence_length": 16},
                        "data": {"metadata_path": "unused.csv"}, "lora": {"rank": 4}})
    module = PipelineTrainingModule(cfg)
    checkpoint = tmp_path / "checkpoint"
    lora_lib.save_lora(str(checkpoint), module.trainable_state_dict(), module.lora_config)
    (checkpoint / "config.yaml").write_text(dump_config(cfg))
    monkeypatch.chdir(tmp_path)

    code, out = command("export", str(checkpoint), "--format", "comfyui", "--family", "sd3", "--out", "x.safetensors")
    assert code == 2 and out.startswith("raydiff: error: comfyui LoRA names are known for families"), out
    assert len(out.strip().splitlines()) == 1
    # Without --model and --family, sample reads both from the checkpoint's config.yaml.
    code, out = command("sample", "--lora", str(checkpoint), "--prompt", "a red circle", "--out", "s.png", "--steps",
                        "1", "--height", "32", "--width", "32")
    assert code == 0, out
    assert (tmp_path / "s.png").is_file()
    code, out = command("sample", "--lora", str(tmp_path / "s.png"), "--prompt", "x", "--out", "t.png")
    assert code == 2 and "pass --model and --family" in out and len(out.strip().splitlines()) == 1
    assert yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]["family"] == "flux"


def test_the_driver_draws_rank_0s_progress_bar_in_place_with_lines_above_it(ray_session, capsys):
    from raydiff.launch.cluster import DriverConsole

    console = DriverConsole("auto", is_tty=True, poll_s=0.05)
    other = DriverConsole("off", is_tty=False, poll_s=0.05)  # a second run of this driver, at the same time
    assert other.relay.actor == console.relay.actor  # one relay actor (one process) serves the driver's runs
    other.relay.put("start", {"total": 9, "start": 0})
    other.relay.put("line", "[raydiff] the other run's line")
    console.relay.put("start", {"total": 4, "start": 0})
    for step in range(1, 5):
        console.relay.put("log", {"step": step, "loss": 0.5, "lr": 1e-3, "samples_per_second": 2.0})
    console.relay.put("line", "[raydiff] a message")
    time.sleep(1)
    # Each run's console drew its own events only: its own total, and the other's line printed once.
    assert (console.view.total_steps, other.view.total_steps) == (4, 9)
    other.close()
    console.close()
    out = capsys.readouterr().out
    assert out.count("[raydiff] the other run's line") == 1
    assert "[raydiff] step" not in out  # a bar, redrawn with carriage returns, not a line per step
    assert "4/4" in out.split("\r")[-1] and "[raydiff] a message\n" in out
