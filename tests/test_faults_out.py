"""Never lose a user's data: what --out may be, two runs on one --out, signals, a full or read-only disk.

Each case ends in exit 2 (143 for SIGTERM) with one line naming the value, before the expensive work
where that is knowable, with nothing written (no output, no hidden partial, no lock left beside
it) and every input byte-identical. Tests run as root, which ignores permission bits: a read-only
or unwritable folder is simulated (os.access, EROFS from the lock's creation), as a full disk is
(shutil.disk_usage, ENOSPC from the writer).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uncurl import pipeline, save
from uncurl.cli import app

runner = CliRunner()
FAST = ["--samples", "12", "--max-length", "64", "--no-plots"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def text(res) -> str:
    return " ".join(res.output.split())


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's hash: equal before and after = untouched."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def leftovers(out: Path) -> list[str]:
    """What uncurl leaves beside ``out`` while it works: ``.NAME.lock``, ``.NAME.*.partial``, ..."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def nothing_written(out: Path) -> bool:
    return not out.exists() and not leftovers(out)


def refused(res, *needles) -> None:
    assert res.exit_code == 2, res.output
    for needle in needles:
        assert needle in text(res), res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the model is loaded: the refusal must come before the expensive work."""
    def load(*a, **k):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr(pipeline, "load_model", load)


@pytest.fixture
def model_in(tmp_path, tiny_dirs):
    """A copy of the tiny Mixtral folder at tmp_path/a/b/m, with a user's file beside it."""
    src = tmp_path / "a" / "b" / "m"
    shutil.copytree(tiny_dirs("mixtral"), src)
    (tmp_path / "a" / "b" / "notes.txt").write_text("mine")
    return src


# 1. what --out may be


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("up", [1, 2])
def test_out_holding_the_input_model_is_refused(model_in, tmp_path, data_dir, up, overwrite, no_work):
    """--out a folder above the model folder (any depth): today --overwrite replaced all of it."""
    before = snapshot(tmp_path / "a")
    out = model_in.parents[up - 1]
    res = run("prune", "--model", model_in, "--out", out, "--data-dir", data_dir, *overwrite, *FAST)
    refused(res, f"--out {out} holds the input model folder {model_in}")
    assert snapshot(tmp_path / "a") == before and not leftovers(out)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_equal_to_the_model_folder_never_suggests_overwrite(model_in, tmp_path, data_dir, overwrite, no_work):
    before = snapshot(tmp_path / "a")
    res = run("prune", "--model", model_in, "--out", model_in, "--data-dir", data_dir, *overwrite, *FAST)
    refused(res, f"--out {model_in} is the input model folder")
    assert "pass --overwrite" not in res.output
    assert snapshot(tmp_path / "a") == before and not leftovers(model_in)


@pytest.mark.parametrize("out, why", [
    ("", "--out '' is empty"),
    (".", "is the current folder"),
    ("{here}", "is the current folder"),
    ("..", "is a folder above the current folder"),
    ("{work}", "is a folder above the current folder"),
    ("{home}", "is your home folder"),
    ("/", "is the root folder"),
])
def test_protected_folders_are_refused_even_with_overwrite(out, why, tmp_path, data_dir, monkeypatch, no_work):
    """'' resolved to the current folder and was wiped with --overwrite."""
    here, home = tmp_path / "work" / "here", tmp_path / "home"
    for folder in (here, home):
        folder.mkdir(parents=True)
        (folder / "precious.txt").write_text("mine")
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    out = out.format(here=here, work=tmp_path / "work", home=home)
    before = snapshot(tmp_path)
    res = run("prune", "--out", out, "--overwrite", "--data-dir", data_dir, *FAST)
    refused(res, why)
    assert snapshot(tmp_path) == before
    assert not [p for p in Path("/").iterdir() if p.name.startswith("..")]  # what a run on "/" would stage


def test_a_mount_point_is_refused(tmp_path, data_dir, monkeypatch, no_work):
    """A mounted volume (docker -v ...:/out): the result, staged beside it, could not be renamed onto it."""
    out = tmp_path / "volume"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
    refused(res, f"--out {out} is a mount point", f"--out {out / 'k4'}")
    assert list(out.iterdir()) == [] and not leftovers(out)


def _uncurl_report(command="uncurl prune --out out"):
    return json.dumps({"schema_version": 1, "command": command})


@pytest.mark.parametrize("files, holds", [
    ({"notes.txt": "mine"}, "1 entry (notes.txt)"),
    ({"config.json": "{}", "model.safetensors": "weights"}, "a checkpoint"),
    ({"report/report.json": "not json"}, "1 entry (report/)"),
    ({"report/report.json": _uncurl_report("mergekit-yaml x")}, "1 entry (report/)"),
    ({"report/report.json": json.dumps({"command": "uncurl prune"})}, "1 entry (report/)"),  # no schema_version
    ({"sweep.json": "{}", "data.csv": "1,2"}, "2 entries (data.csv, sweep.json)"),
])
def test_overwrite_replaces_only_an_earlier_uncurl_output(files, holds, tmp_path, data_dir, no_work):
    out = tmp_path / "out"
    for name, content in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(content)
    before = snapshot(tmp_path)
    res = run("prune", "--out", out, "--overwrite", "--data-dir", data_dir, *FAST)
    refused(res, f"--out {out} already holds {holds}", "not an uncurl output", "only replaces its own outputs")
    assert snapshot(tmp_path) == before


def test_an_earlier_sweep_output_is_replaced_with_overwrite(tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"schema_version": 1, "command": "uncurl sweep --out out"}))
    res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
    refused(res, "an earlier uncurl sweep output", "pass --overwrite")
    res = run("prune", "--out", out, "--overwrite", "--data-dir", data_dir, *FAST)
    assert res.exit_code == 0, res.output
    assert not (out / "sweep.json").exists() and (out / "report" / "report.json").exists()
    assert not leftovers(out)


# 2. two runs on one --out


def _hold(out: Path):
    """Another uncurl process holding ``out`` (uncurl's own claim), until killed."""
    code = ("import sys, time; from uncurl.output import claim\n"
            "with claim(sys.argv[1], overwrite=False):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_out_exits_2_naming_the_first(tmp_path, data_dir, no_work):
    """Two prunes on one --out both exited 0 and the second silently replaced the first."""
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
        refused(res, f"--out {out} is held by another uncurl run (pid {holder.pid}")
        # the holder's lock and its run's own folder (its library caches), left alone
        assert not out.exists() and [n for n in leftovers(out) if not n.startswith(f".out.{holder.pid}-")] == [
            ".out.lock"]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_filled_during_the_run_is_not_replaced(overwrite, tmp_path, data_dir, monkeypatch):
    """At the final rename --out must still be what was checked (absent; or an uncurl output)."""
    out = tmp_path / "out"
    if overwrite:
        (out / "report").mkdir(parents=True)
        (out / "report" / "report.json").write_text(_uncurl_report())
    real = pipeline.write_checkpoint

    def meanwhile(*a, **k):  # someone else (no uncurl lock) writes into --out while the run works
        real(*a, **k)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(pipeline, "write_checkpoint", meanwhile)  # the whole-model pipeline's writer
    res = run("prune", "--out", out, "--data-dir", data_dir, "--pipeline", "whole",
              *(["--overwrite"] if overwrite else []), *FAST)
    refused(res, "while this run worked, something else wrote to --out", str(out))
    assert snapshot(out) == {"theirs.txt": hashlib.sha256(b"theirs").hexdigest()} and not leftovers(out)


# 3. signals and what a killed run leaves

DRIVER = """
import sys, time
from pathlib import Path
import uncurl.pipeline as p

flag, phase = Path(sys.argv[1]), sys.argv[2]
real = p.write_checkpoint

def slow_save(*a, **k):
    real(*a, **k)
    flag.touch()
    time.sleep(60)

def slow_profile(*a, **k):
    flag.touch()
    time.sleep(60)

def slow_layer(*a, **k):  # the second MoE layer, once the first is written into the partial
    count.append(1)
    if len(count) == 2:
        flag.touch()
        time.sleep(60)
    return real_layer(*a, **k)

count, extra = [], ["--pipeline", "whole"]  # save, profile: the whole-model pipeline's stages
if phase == "save":
    p.write_checkpoint = slow_save
elif phase == "layers":  # the layer-by-layer prune, its batch threads waiting at the next layer
    import uncurl.layerwise as lw
    real_layer, lw.rewrite_layer, extra = lw.rewrite_layer, slow_layer, ["--pipeline", "sequential"]
else:
    p.profile_model = slow_profile
from uncurl.cli import main
sys.argv = ["uncurl", *sys.argv[3:], *extra]
main()
"""


def _start(tmp_path, phase, out, data_dir):
    """A real `uncurl prune` process, returned once it is saving (or profiling) and stays there."""
    flag = tmp_path / "flag"
    # SIGINT at its default in the child, so Python raises KeyboardInterrupt: a test run started in the
    # background of a shell without job control (`make test &`, nohup) inherits it ignored, and an
    # ignored SIGINT rightly stays ignored (output.py)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, flag, phase, "prune", "--out", out, "--data-dir",
                             data_dir, *FAST], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("phase", ["save", "profile", "layers"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_removes_the_partial_and_the_lock_and_exits_128_plus_it(phase, signum, tmp_path, data_dir):
    out = tmp_path / "out"
    proc = _start(tmp_path, phase, out, data_dir)
    if phase in ("save", "layers"):
        assert [n for n in leftovers(out) if n.endswith(".partial")], leftovers(out)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name}" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert nothing_written(out), leftovers(out)


def test_after_sigkill_the_next_run_removes_only_the_dead_runs_leftovers(tmp_path, data_dir):
    out = tmp_path / "out"
    proc = _start(tmp_path, "save", out, data_dir)
    proc.kill()
    proc.wait()
    stale = [n for n in leftovers(out) if n.endswith(".partial")]
    assert stale and ".out.lock" in leftovers(out)  # SIGKILL: nothing could clean up
    (tmp_path / ".out.k3j4h5g6.partial").mkdir()  # one from an uncurl before pids were in the name
    alive = subprocess.Popen(["sleep", "60"])
    try:  # not this run's to remove: one whose owner is alive, and other outputs' (names that start alike)
        kept = [f".out.{alive.pid}-abcdefgh.partial", ".out.x.123-abcdefgh.partial", ".out2.123-abcdefgh.partial",
                ".out.lockfile", "out.tmp"]
        for name in kept:
            (tmp_path / name).mkdir()
        res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
        assert res.exit_code == 0, res.output
        said = "".join(res.output.split())  # the warning as logged, however rich wrapped it
        for name in stale + [".out.k3j4h5g6.partial"]:
            assert f"removed{tmp_path / name}" in said, res.output
            assert not (tmp_path / name).exists()
        assert leftovers(out) == sorted(n for n in kept if n.startswith(".out."))
        assert all((tmp_path / name).is_dir() for name in kept)
        assert (out / "report" / "report.json").exists()
    finally:
        alive.kill()
        alive.wait()


# 4. the machine's faults, found up front where they can be


@pytest.mark.parametrize("size", ["0", "abc", "-5GB", "0KB", "5GiB", ""])
def test_a_bad_shard_size_exits_2_before_the_work(size, tmp_path, data_dir, no_work):
    out = tmp_path / "out"
    res = run("prune", "--out", out, "--shard-size", size, "--data-dir", data_dir, *FAST)
    refused(res, f"--shard-size {size!r} is not a shard size", "5GB", "500MB", "bytes")
    assert nothing_written(out)


def test_a_shard_size_in_bytes_is_read_as_transformers_reads_it(tmp_path, data_dir):
    out = tmp_path / "out"
    res = run("prune", "--out", out, "--shard-size", 300_000, "--data-dir", data_dir, *FAST)
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1


def test_an_unwritable_out_folder_exits_2_naming_it(tmp_path, data_dir, monkeypatch, no_work):
    """Root ignores a 0o555 folder, so the folder's verdict is simulated (os.access says no)."""
    parent = tmp_path / "ro"
    parent.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == parent else real(p, mode, **k))
    res = run("prune", "--out", parent / "out", "--data-dir", data_dir, *FAST)
    refused(res, f"cannot write in {parent}", "--out")
    assert list(parent.iterdir()) == []


def test_an_out_below_a_file_exits_2_saying_it_is_a_file(tmp_path, data_dir, no_work):
    (tmp_path / "notes.txt").write_text("mine")
    res = run("prune", "--out", tmp_path / "notes.txt" / "out", "--data-dir", data_dir, *FAST)
    refused(res, f"{tmp_path / 'notes.txt'} is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_read_only_file_system_exits_2_naming_the_folder(tmp_path, data_dir, monkeypatch, no_work):
    """As root, EROFS from creating the lock (the probe) stands in for a read-only mount."""
    real = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    out = tmp_path / "new" / "deeper" / "out"
    res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
    refused(res, f"--out {out}: cannot write in", "Read-only file system")
    assert list(tmp_path.iterdir()) == []  # the folders it made for the lock are gone again


def _small_disk(monkeypatch, free: int):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def _no_profiling(monkeypatch):
    def profile(*a, **k):
        raise AssertionError("profiled before checking the disk")

    monkeypatch.setattr(pipeline, "profile_model", profile)


@pytest.mark.parametrize("command", ["prune", "sweep"])
def test_a_disk_too_small_is_refused_before_profiling(command, tmp_path, data_dir, monkeypatch):
    _small_disk(monkeypatch, 10_000)
    _no_profiling(monkeypatch)
    out = tmp_path / "out"
    extra = ["--keep-checkpoints", "--keep", "6,4", "--method", "frequency"] if command == "sweep" else []
    args = [a for a in FAST if a != "--no-plots"] if command == "sweep" else FAST
    res = run(command, "--out", out, "--data-dir", data_dir, *extra, *args)
    refused(res, f"--out {out}: its file system has 0 MB free", "free some space")
    if command == "sweep":
        assert "the 2 checkpoints" in text(res)
    assert nothing_written(out)


def test_a_full_disk_during_the_write_exits_2_and_removes_the_partial(tmp_path, data_dir, monkeypatch):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.file.name)

    monkeypatch.setattr(save._ShardWriter, "write", full)
    out = tmp_path / "out"
    res = run("prune", "--out", out, "--data-dir", data_dir, *FAST)
    refused(res, f"--out {out}: no space left on the device at ", "the unfinished output was removed")
    assert nothing_written(out)


def test_a_full_disk_during_a_sweeps_checkpoints_exits_2(tmp_path, data_dir, monkeypatch):
    def full(self, name, tensor):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), self.file.name)

    monkeypatch.setattr(save._ShardWriter, "write", full)
    out = tmp_path / "out"
    res = run("sweep", "--out", out, "--keep-checkpoints", "--keep", "4", "--method", "frequency",
              "--eval-limit", 4, "--data-dir", data_dir, "--samples", 12, "--max-length", 64)
    refused(res, f"--out {out}: disk quota exceeded at ")
    assert nothing_written(out)


# 5. profile --out


def _profile(out, *extra, data_dir):
    return run("profile", "--out", out, "--data-dir", data_dir, "--samples", 12, "--max-length", 64, *extra)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_profile_out_a_folder_is_refused(overwrite, tmp_path, data_dir, no_work, monkeypatch):
    monkeypatch.setattr("uncurl.load.load_model", pipeline.load_model)  # the CLI imports it from there
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    res = _profile(folder, *overwrite, data_dir=data_dir)
    refused(res, f"--out {folder} is a folder; a profile is one file")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_profile_never_replaces_a_file_that_is_not_a_profile(overwrite, tmp_path, data_dir, monkeypatch, no_work):
    monkeypatch.setattr("uncurl.load.load_model", pipeline.load_model)
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    before = snapshot(tmp_path)
    res = _profile(precious, *overwrite, data_dir=data_dir)
    refused(res, f"--out {precious} already exists, which is not an uncurl output", "only replaces its own")
    assert snapshot(tmp_path) == before


def test_profile_replaces_an_earlier_profile_only_with_overwrite(tmp_path, data_dir):
    prof = tmp_path / "rte.profile"
    assert _profile(prof, data_dir=data_dir).exit_code == 0
    first = prof.read_bytes()
    res = _profile(prof, "--seed", 1, data_dir=data_dir)
    refused(res, f"--out {prof} already exists: an earlier uncurl profile", "--overwrite")
    assert prof.read_bytes() == first
    res = _profile(prof, "--seed", 1, "--overwrite", data_dir=data_dir)
    assert res.exit_code == 0, res.output
    assert prof.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["rte.profile"]


def test_profile_write_failure_leaves_no_temporary_file(tmp_path, data_dir, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    prof = tmp_path / "rte.profile"
    res = _profile(prof, data_dir=data_dir)
    refused(res, f"--out {prof}: no space left on the device")
    assert list(tmp_path.iterdir()) == []
