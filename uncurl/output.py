"""Where a run writes, and nothing else: the output is checked, claimed, staged, then put in place.

    uncurl prune --model DIR --out runs/k4 [--overwrite]

A run's output is one folder (``prune``, ``sweep``) or one file (``profile``). ``claim`` checks it
before the expensive work and holds it for the whole run:

- never an output, whatever the options: ``''``, ``/``, the home folder or one above it, the current
  folder or one above it, an input (the model folder, ``--profile``, ``--data-dir``, a task file) or
  a folder holding one, a folder inside the model folder;
- an occupied ``--out`` needs ``--overwrite``, and ``--overwrite`` replaces only an earlier uncurl
  output (``report/report.json`` or ``sweep.json`` written by uncurl, a profile file with uncurl's
  header); anything else is refused, saying what it holds;
- a lock file beside it (``.NAME.lock``, ``flock``, recording pid and host) keeps a second run off
  the same ``--out`` (exit 2, naming the first); the kernel releases it when its process dies;
- the result is staged beside it (``.NAME.PID-XXXXXXXX.partial``, a file ``.NAME.PID-XXXXXXXX.tmp``)
  and renamed into place under the lock, after checking again that ``--out`` is what was checked;
  leftovers of runs that are gone (SIGKILL, power loss) are removed by the next run on that
  ``--out``, with a warning; one whose pid is alive is left alone;
- SIGTERM and SIGHUP stop the run as SIGINT does: the staged output is removed, the lock released,
  and the exit code is 128 + the signal (143 for SIGTERM; ``errors.Terminated``);
- a write that fails for the machine's reasons (disk full, quota, read-only, permission) is exit 2
  naming the folder, with the staged output removed;
- an output whose hidden names would pass the file system's limit on a name is refused up front;
- the libraries' caches (matplotlib, torch compile: ``LIBRARY_CACHES``) go to a hidden folder beside
  it for the run, removed at the end, so that nothing is written outside ``--out``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import Terminated, UncurlError

log = logging.getLogger(__name__)

EXAMPLE = {"folder": "runs/k4", "file": "rte.profile"}
MACHINE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what timeout, CI runners, docker stop and a closed terminal send


def _ours(file: Path, out: Path) -> bool:
    """Whether ``file`` is the output, in it, or one of the run's own files beside it."""
    try:
        first = file.resolve().relative_to(out.parent).parts[0]
    except (ValueError, IndexError):
        return False
    return first == out.name or first.startswith(f".{out.name}.")


def _protected(path: Path) -> str | None:
    """Why ``path`` may never be an output, whatever the options; None when it may be one."""
    if path == Path(path.anchor):
        return "the root folder"
    for name, where in (("your home folder", Path.home), ("the current folder", Path.cwd)):
        try:
            folder = where().resolve()
        except (OSError, RuntimeError):  # no $HOME, a deleted cwd
            continue
        if path == folder:
            return name
        if path in folder.parents:
            return f"a folder above {name} ({folder})"
    return None


def _holds(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    what = "a checkpoint" if "config.json" in names else f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
    return f"{what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def uncurl_output(path: Path) -> str | None:
    """What earlier uncurl output ``path`` is, or None: a folder with uncurl's ``report/report.json``
    (prune), ``sweep.json`` (sweep), ``routes.json`` or ``monitor.json``, or a file with a profile's
    safetensors header."""
    if path.is_dir():
        for name, what in (("report/report.json", "an earlier uncurl prune output"),
                           ("sweep.json", "an earlier uncurl sweep output"),
                           ("routes.json", "an earlier uncurl routes output"),
                           ("monitor.json", "an earlier uncurl monitor output")):
            try:
                record = json.loads((path / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and "schema_version" in record and (
                    str(record.get("command", "")).startswith("uncurl")
                    or "uncurl" in (record.get("versions") if isinstance(record.get("versions"), dict) else {})):
                return what  # the Python API records its own command line: its versions name uncurl
        return None
    try:  # a safetensors file: 8 bytes of header length, the JSON header, whose metadata holds uncurl's
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size)) if size < 2**26 else {}
        meta = json.loads(header.get("__metadata__", {}).get("uncurl", "null"))
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    return "an earlier uncurl profile" if isinstance(meta, dict) and "schema" in meta else None


def check_out(out: str | Path, *, overwrite: bool, kind: str = "folder", inputs=(), flag: str = "--out") -> Path:
    """``out`` resolved, or an UncurlError saying why it cannot be this run's output.

    ``kind``: "folder" or "file"; ``inputs``: (what, path, refuse_inside) for each thing the run
    reads, which the output may neither be nor hold (nor lie inside, with ``refuse_inside``)."""
    if str(out).strip() == "":
        raise UncurlError(f"{flag} '' is empty; name a new output {kind}, e.g. {flag} {EXAMPLE[kind]}")
    path = Path(out).resolve()
    check_name_length(path, flag, kind)
    why = _protected(path)
    if why:
        raise UncurlError(f"{flag} {str(out)!r} is {why}; uncurl never writes or replaces it: name a new output "
                          f"{kind}, e.g. {flag} {EXAMPLE[kind]}")
    for what, source, refuse_inside in inputs:
        source = Path(source).resolve()
        if path == source:
            raise UncurlError(f"{flag} {path} is {what}; uncurl never writes there: choose another output {kind}")
        if refuse_inside and source in path.parents:
            raise UncurlError(f"{flag} {path} is inside {what} {source}; uncurl never writes there: choose a "
                              f"{kind} elsewhere")
        if path in source.parents:
            raise UncurlError(f"{flag} {path} holds {what} {source}; uncurl never replaces an input: choose "
                              f"another output {kind}")
    try:
        if kind == "file":
            if path.is_dir():
                raise UncurlError(f"{flag} {path} is a folder; a profile is one file, e.g. {flag} {EXAMPLE[kind]}")
            if path.exists() or path.is_symlink():
                _replaceable(path, overwrite, uncurl_output(path), "already exists", flag, kind)
        elif path.exists() and not path.is_dir():
            raise UncurlError(f"{flag} {path} exists and is a file; choose a folder path")
        elif os.path.ismount(path):  # the result is renamed into place from beside it: not onto a mount
            raise UncurlError(f"{flag} {path} is a mount point; uncurl writes beside --out and renames the result "
                              f"into place: name a folder inside it, e.g. {flag} {path / 'k4'}")
        elif path.is_dir() and any(path.iterdir()):
            _replaceable(path, overwrite, uncurl_output(path), f"already holds {_holds(path)}", flag, kind)
    except OSError as e:  # an unreadable folder or file: not something uncurl may replace
        raise UncurlError(f"{flag} {path} cannot be read ({e.strerror}); choose another output {kind}") from None
    return path


STAGED_EXTRA = len(".." + "-XXXXXXXX.partial") + 7  # .NAME.PID-XXXXXXXX.partial, a pid of up to 7 digits


def check_name_length(path: Path, flag: str, kind: str) -> None:
    """The hidden names uncurl gives its files beside ``path`` (``.NAME.PID-XXXXXXXX.partial``, the
    longest) must fit the file system's limit on a name (255 bytes on most), as ``path``'s own does."""
    existing = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(path.name))
    if size + STAGED_EXTRA > limit:
        raise UncurlError(f"{flag} {path}: its name is {size} bytes; uncurl writes beside it under the hidden name "
                          f".NAME.PID-XXXXXXXX.partial, which must fit this file system's {limit}-byte limit on a "
                          f"name: choose a name of at most {limit - STAGED_EXTRA} bytes for the output {kind}")


def _replaceable(path: Path, overwrite: bool, mine: str | None, holds: str, flag: str, kind: str) -> None:
    if mine is None:
        raise UncurlError(f"{flag} {path} {holds}, which is not an uncurl output; uncurl only replaces its own "
                          f"outputs (with --overwrite): choose another {kind}")
    if not overwrite:
        raise UncurlError(f"{flag} {path} {holds}: {mine}; choose an empty folder or a new name, or pass "
                          f"--overwrite to replace it" if kind == "folder" else
                          f"{flag} {path} already exists: {mine}; choose a new file name, or pass --overwrite "
                          f"to replace it")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def machine_error(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError the machine is to blame for (disk full, read-only, ...), or None.
    Rust writers report one as text: safetensors ``IoError(Os { code: 28, ... })``, tokenizers
    ``(os error 28)``."""
    if isinstance(exc, OSError):
        return exc if exc.errno in MACHINE_ERRORS else None
    m = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(exc))
    code = int(m.group(1) or m.group(2)) if m else None
    return OSError(code, os.strerror(code)) if code in MACHINE_ERRORS else None


@contextmanager
def _stop_signals_raise():
    """SIGTERM and SIGHUP raise ``Terminated`` in the main thread (as SIGINT raises KeyboardInterrupt),
    so every cleanup on the way out runs; a signal the process ignores (nohup) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for s in STOP_SIGNALS:  # the cleanup runs once, uninterrupted
            signal.signal(s, signal.SIG_IGN)
        if _PLACING["now"]:  # the output is being renamed into place: finish that; the run is done
            _PLACING["signal"] = signum
            return
        raise Terminated(signum)

    previous = {}
    for s in STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


_HELD: dict[Path, "Claim"] = {}  # lock file -> this process's claim on it (claims nest: see claim)
_PLACING = {"now": False, "signal": None}  # while an output is renamed into place, a stop signal waits


@contextmanager
def _signals_wait():
    """A stop signal that arrives in the block waits for its end (the handler records it): yields a
    dict whose "signal" then names it, or is None."""
    outer = dict(_PLACING)
    _PLACING.update(now=True, signal=None)
    waited = {"signal": None}
    try:
        yield waited
    finally:
        waited["signal"] = _PLACING["signal"]
        _PLACING.update(now=outer["now"], signal=outer["signal"] or _PLACING["signal"] if outer["now"] else None)


@contextmanager
def _placing():
    """Renames that a signal must not cut in half (the old output moved aside, the new one not in)."""
    with _signals_wait() as waited:
        yield
    if waited["signal"] is not None:
        log.warning("%s arrived while the output was put in place; it is complete",
                    signal.Signals(waited["signal"]).name)


# Where matplotlib and torch's compiler keep their caches and settings (under $HOME and $TMPDIR by
# default): pointed into a run's own folder, so that a run writes nothing outside --out.
LIBRARY_CACHES = {"MPLCONFIGDIR": "matplotlib", "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
                  "TRITON_CACHE_DIR": "triton"}


@contextmanager
def library_caches(folder: Path | None = None):
    """matplotlib's and torch compile's caches (``LIBRARY_CACHES``) in ``folder`` for the block (a
    temporary folder without one), removed with it after: a variable the user set is left as it
    is. Set before those libraries import (they read it once): the CLI enters this before loading."""
    folder = Path(tempfile.mkdtemp(prefix="uncurl-caches-")) if folder is None else folder
    ours = {var: str(folder / name) for var, name in LIBRARY_CACHES.items() if var not in os.environ}
    os.environ.update(ours)
    try:
        yield folder
    finally:
        for var in ours:
            os.environ.pop(var, None)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Claim:
    """This run's hold on its output ``path``: stage into it with ``staged``, check it with ``check_*``."""

    path: Path
    overwrite: bool
    kind: str
    flag: str
    lock: Path
    fd: int | None = None
    locked: bool = False  # the lock file is ours to remove
    created: list[Path] = field(default_factory=list)  # parent folders this run made, deepest first

    def check(self, inputs=()) -> None:
        """Check the output again (now, under the lock), and against inputs known only now."""
        check_out(self.path, overwrite=self.overwrite, kind=self.kind, inputs=inputs, flag=self.flag)

    def scratch(self) -> Path:
        """A hidden folder beside the output for the run's own files (``library_caches``), named as a
        staged output is (``.NAME.PID-XXXXXXXX.partial``), so what a killed run leaves is removed by
        the next (``remove_stale``)."""
        return Path(tempfile.mkdtemp(prefix=f".{self.path.name}.{os.getpid()}-", suffix=".partial",
                                     dir=self.path.parent))

    def check_space(self, need: int, what: str = "the checkpoint") -> None:
        """Refuse, before the work, an output whose file system has not room for ``need`` bytes."""
        free, need = shutil.disk_usage(self.path.parent)[2], need + need // 100 + 16 * 2**20  # and a margin
        if need > free:
            raise UncurlError(f"{self.flag} {self.path}: its file system has {free / 1e6:,.0f} MB free and "
                              f"{what} needs about {need / 1e6:,.0f} MB; free some space or choose another "
                              f"{self.flag}")

    @contextmanager
    def staged(self):
        """A hidden folder (a file, for a file output) beside the output; when the block ends it
        replaces the output, and on any error or signal it is removed."""
        prefix = f".{self.path.name}.{os.getpid()}-"
        if self.kind == "folder":
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=self.path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        try:
            tmp.chmod((0o777 if self.kind == "folder" else 0o666) & ~umask)  # mkdtemp/mkstemp make it private
            yield tmp
            self._place(tmp)
        except BaseException:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise

    def _place(self, tmp: Path) -> None:
        try:
            self.check()  # under the lock: still empty/absent, or (--overwrite) still an uncurl output
        except UncurlError as e:
            raise UncurlError(f"while this run worked, something else wrote to {self.flag}: {e}; nothing was "
                              f"replaced") from None
        with _placing():
            self._rename(tmp)

    def _rename(self, tmp: Path) -> None:
        if self.kind == "file":
            os.replace(tmp, self.path)
            return
        old = None
        if self.path.is_dir() and any(self.path.iterdir()):  # an earlier uncurl output, --overwrite
            old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            self.path.rename(old)
        try:
            tmp.rename(self.path)  # an empty folder is replaced; a filled one refuses (ENOTEMPTY)
        except OSError as e:
            if old is not None:
                old.rename(self.path)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise UncurlError(f"while this run worked, something else wrote to {self.flag} {self.path}; "
                                  f"nothing was replaced") from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove_stale(self) -> None:
        """Remove what runs on this output that are gone left beside it (we hold the lock, so no
        uncurl run is writing them): staged folders and files, and an earlier output being replaced
        (put back when the output itself is missing). A leftover whose pid is alive stays."""
        name = re.escape(self.path.name)
        pattern = re.compile(rf"\.{name}\.(?:(\d+)(?:-\w+\.(?:partial|tmp)|\.partial)|\w+\.partial|old-(\d+))",
                             re.ASCII)  # no dot after NAME.: a dot would make it another output's (NAME.x)
        for p in sorted(self.path.parent.iterdir()):
            m = pattern.fullmatch(p.name)
            if m is None:
                continue
            pid = m.group(1) or m.group(2)
            if pid is not None and _alive(int(pid)):
                log.info("kept %s: its process (pid %s) is still running", p, pid)
                continue
            by = f"an uncurl run (pid {pid})" if pid else "an uncurl run"
            if m.group(2) and not self.path.exists():
                p.rename(self.path)
                log.warning("restored %s from %s, left by %s that stopped while replacing it", self.path, p.name, by)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                log.warning("removed %s, left by %s that is no longer running", p, by)
            else:
                p.unlink()
                log.warning("removed %s, left by %s that is no longer running", p, by)

    def _acquire(self) -> None:
        parent = self.path.parent
        existing = next(p for p in (parent, *parent.parents) if p.exists())
        if not existing.is_dir():
            raise UncurlError(f"{self.flag} {self.path}: {existing} is a file, not a folder; choose an --out whose "
                              f"parent folders are folders")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UncurlError(f"{self.flag} {self.path}: cannot write in {existing} (read-only or not writable); "
                              f"choose a writable {self.flag}")
        self.created = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
            while not self.locked:
                self.fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise UncurlError(f"{self.flag} {self.path} is held by another uncurl run ({_holder(self.lock)}); "
                                      f"wait for it to finish or choose another {self.flag}") from None
                except OSError as e:  # a file system without locks: run unguarded, saying so
                    log.warning("cannot lock %s (%s): another run on the same %s would not be noticed",
                                self.lock, e.strerror, self.flag)
                try:  # its last holder may have removed it between our open and our lock
                    self.locked = os.stat(self.lock).st_ino == os.fstat(self.fd).st_ino
                except FileNotFoundError:
                    pass
                if not self.locked:
                    os.close(self.fd)
                    self.fd = None
            os.ftruncate(self.fd, 0)
            os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "out": str(self.path)}).encode())
        except OSError as e:
            self._release()
            where = Path(e.filename).parent if e.filename else parent
            raise UncurlError(f"{self.flag} {self.path}: cannot write in {where} ({e.strerror}); "
                              f"choose a writable {self.flag}") from None
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self.locked:
            try:
                self.lock.unlink()  # before closing: a run that opened it meanwhile sees another inode
            except FileNotFoundError:
                pass
            self.locked = False
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for folder in self.created:  # folders made for an output that was never placed
            try:
                folder.rmdir()
            except OSError:
                break


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']}, lock {lock}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"lock {lock}"


@contextmanager
def claim(out: str | Path, *, overwrite: bool, kind: str = "folder", inputs=(), flag: str = "--out"):
    """Check ``out`` (see ``check_out``), lock it, remove what dead runs left beside it, and hold it
    until the block ends; yields the ``Claim``. Within the block SIGTERM/SIGHUP stop the run cleanly
    (``Terminated``), and a write the machine refuses (disk full, read-only) is an UncurlError.
    A claim this process already holds on ``out`` is yielded again (``Profile.save`` inside the CLI's)."""
    path = check_out(out, overwrite=overwrite, kind=kind, inputs=inputs, flag=flag)
    lock = path.with_name(f".{path.name}.lock")
    if lock in _HELD:
        yield _HELD[lock]
        return
    held = Claim(path, overwrite, kind, flag, lock)
    try:
        with _stop_signals_raise():
            try:
                with _signals_wait() as waited:  # the lock file made and recorded as ours: one step for a signal
                    held._acquire()
                    _HELD[lock] = held
                if waited["signal"] is not None:  # it arrived meanwhile: stop now, the lock released below
                    raise Terminated(waited["signal"])
                held.remove_stale()
                held.check()
                with library_caches(held.scratch()):
                    yield held
            finally:
                with _signals_wait():  # the lock removed whole, a signal or not
                    _HELD.pop(lock, None)
                    held._release()
    except Exception as e:
        oe = machine_error(e)
        if oe is None or (oe.errno in (errno.EACCES, errno.EPERM) and oe.filename is not None
                          and not _ours(Path(oe.filename), path)):
            raise  # not the output's machine problem (an unreadable input says so itself)
        what = f" at {oe.filename}" if oe.filename else ""
        advice = "free some space" if oe.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise UncurlError(f"{flag} {path}: {MACHINE_ERRORS[oe.errno]}{what}; the unfinished output was removed "
                          f"and {flag} is as it was: {advice} or choose another {flag}") from None
