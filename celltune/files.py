"""Atomic file output: nothing celltune writes is ever left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file lives in the same directory so that ``os.replace`` is atomic.
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions of a normal new file.
        umask = os.umask(0)
        os.umask(umask)
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask)
            _fsync_tree(tmp_path)  # the data is on disk before the name points at it
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            from celltune.errors import CelltuneError

            raise CelltuneError(os_error_message(err, target)) from err
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: object, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically; NaN/inf are written as null (valid JSON)."""
    import json
    import math

    def clean(o: object) -> object:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if hasattr(o, "item") and callable(o.item):  # numpy / torch scalars
            try:
                return clean(o.item())
            except (ValueError, RuntimeError):
                pass
        if hasattr(o, "tolist"):
            return clean(o.tolist())
        return o

    write_text_atomic(path, json.dumps(clean(obj), indent=indent) + "\n")


# ----------------------------------------------------------------------------- run dirs
LOCK_NAME = ".celltune.lock"
MANIFEST_NAME = "manifest.json"


def _fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a directory tree, before it is renamed into place."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def os_error_message(err: OSError, path: str | os.PathLike[str]) -> str:
    """One line for an OS error while writing ``path``: which path, and for ENOSPC how much."""
    import errno
    import shutil

    where = Path(path)
    if err.errno == errno.ENOSPC:
        probe = where if where.is_dir() else where.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        return (
            f"no space left on the device while writing {where} ({free / 1e6:.1f} MB free "
            "there); free some space or choose an --out on a larger disk"
        )
    return f"cannot write {where}: {err.strerror or err}; check the path and its permissions"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Ownership of a run directory: ``.celltune.lock`` holds the owner's pid and host.

    A second process that tries to write into the same directory is refused; a lock whose
    owner process is gone (same host, pid no longer running) is stale and taken over. The
    owning process may acquire it again (re-entrant), so the Python API can run twice into
    one directory from one session; only the acquisition that created the lock file
    removes it (an inner ``with RunLock(d)`` leaves the outer one's lock in place).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.held = False
        self.created = False
        self.made_dir = False

    def _owner(self) -> dict[str, object] | None:
        import json

        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _busy_message(self, owner: dict[str, object], fix: str = " or choose another --out") -> str:
        return (
            f"{self.directory} is in use by another celltune run (pid {owner.get('pid')} on "
            f"host {owner.get('host')}, lock file {self.path}): wait for it to finish{fix}; "
            "delete the lock file only if that process is gone"
        )

    def other_owner(self) -> dict[str, object] | None:
        """The owner when another live process holds the lock (else None; stale = None)."""
        import socket

        owner = self._owner()
        if owner is None:
            return None
        pid, host = owner.get("pid"), owner.get("host")
        if pid == os.getpid() and host == socket.gethostname():
            return None
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            return None
        return owner

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`InputError` naming the owner and the fix."""
        import json
        import socket

        from celltune.errors import InputError

        self.made_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # half-written by a process killed while locking
                    self.path.unlink(missing_ok=True)
                    continue
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    self.held = True
                    return self
                if self.other_owner() is None:
                    self.path.unlink(missing_ok=True)  # stale: its owner is gone
                    continue
                raise InputError(self._busy_message(owner)) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(me))
                fh.flush()
                os.fsync(fh.fileno())
            self.held = self.created = True
            return self
        raise InputError(f"cannot lock {self.directory}; remove {self.path} and retry")

    def release(self) -> None:
        """Remove the lock if this process owns it."""
        owner = self._owner()
        if self.created and owner and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
            if self.made_dir:  # a run refused before writing leaves no empty directory
                with contextlib.suppress(OSError):
                    self.directory.rmdir()
        self.held = self.created = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_dir(directory: str | os.PathLike[str]) -> RunLock:
    """Lock ``directory`` for this process until it exits, and clean orphan temp files.

    For workflows that return before their outputs are final (the lock must outlive the
    call that opened the directory): released by ``atexit``.
    """
    import atexit

    lock = RunLock(directory).acquire()
    atexit.register(lock.release)
    clean_orphan_temps(directory)
    return lock


def check_not_in_use(directory: str | os.PathLike[str]) -> None:
    """Refuse to read a run directory that another live process is writing (e.g. a
    ``predict`` while its ``train`` still runs); readers take no lock of their own."""
    from celltune.errors import InputError

    lock = RunLock(directory)
    owner = lock.other_owner()
    if owner is not None:
        raise InputError(lock._busy_message(owner, fix=""))


def clean_orphan_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<name>.*.tmp`` files/dirs left by a killed run (call under the run lock)."""
    import shutil

    removed: list[Path] = []
    root = Path(directory)
    if not root.is_dir():
        return removed
    for p in root.rglob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        import logging

        logging.getLogger(__name__).info(
            "removed %d temp file(s) left by an interrupted run", len(removed)
        )
    return removed


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(root: Path) -> dict:
    import json

    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(
    directory: str | os.PathLike[str],
    command: str | None = None,
    inputs: dict[str, object] | None = None,
    outputs: list[str | os.PathLike[str]] | None = None,
) -> Path:
    """Write ``manifest.json`` (every file: size, SHA-256) last: its presence = complete run.

    ``command`` records what wrote ``outputs`` from which ``inputs`` (see
    :func:`input_record`) under ``runs``, kept from the previous manifest, so that a later
    run of the same command can tell whether it would replace another input's outputs.
    """
    root = Path(directory)
    runs = dict(_read_manifest(root).get("runs") or {})
    if command is not None:
        rels = [Path(p).resolve().relative_to(root.resolve()).as_posix() for p in outputs or []]
        runs[command] = {"inputs": inputs or {}, "outputs": sorted(rels)}
    entries = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or p.name in (MANIFEST_NAME, LOCK_NAME) or p.name.startswith("."):
            continue
        entries[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    record: dict[str, object] = {"format": "celltune-manifest/1", "files": entries}
    if runs:
        record["runs"] = runs
    write_json_atomic(root / MANIFEST_NAME, record)
    return root / MANIFEST_NAME


def input_record(**paths: str | os.PathLike[str] | None) -> dict[str, object]:
    """What identifies an input file cheaply: resolved path, size, modification time."""
    out: dict[str, object] = {}
    for name, p in paths.items():
        if p is None:
            continue
        st = Path(p).stat()
        out[name] = {"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def claim_outputs(
    directory: str | os.PathLike[str],
    command: str,
    inputs: dict[str, object],
    *,
    overwrite: bool,
    marker: str,
    patterns: tuple[str, ...] = (),
) -> None:
    """Before ``command`` writes into ``directory``: refuse to replace the outputs of the
    same command on another input unless ``overwrite``; then remove that command's previous
    outputs, so files of two runs never mix (e.g. plots of two data sets).

    A rerun on the same input (after a crash, say) replaces its outputs. ``marker`` is the
    command's main output: present without a record, it came from an unknown input.
    ``patterns``: globs of the command's outputs, removed too (a run killed before its
    manifest left no record of them).
    """
    from celltune.errors import InputError

    root = Path(directory)
    prev = (_read_manifest(root).get("runs") or {}).get(command)
    if prev is None and not (root / marker).exists():
        return
    before = None if prev is None else prev.get("inputs")
    if before != inputs and not overwrite:
        what = "an input it cannot identify" if before is None else _inputs_text(before)
        raise InputError(
            f"{root} already holds the outputs of `celltune {command}` on {what} ({marker} "
            f"...), not on {_inputs_text(inputs)}: pass --overwrite to replace them, or "
            "choose another --out"
        )
    stale = {root / rel for rel in ([] if prev is None else prev.get("outputs", []))}
    stale.update(p for pattern in patterns for p in root.glob(pattern))
    for p in stale:
        if p.is_file():
            p.unlink()


def _inputs_text(inputs: dict[str, object]) -> str:
    paths = [v.get("path") for v in inputs.values() if isinstance(v, dict)]
    return ", ".join(map(str, paths)) or "no input file"


def verify_manifest(directory: str | os.PathLike[str], names: list[str] | None = None) -> None:
    """Raise :class:`CheckpointError` when a file differs from ``manifest.json`` (if any)."""
    import json

    from celltune.errors import CheckpointError

    root = Path(directory)
    path = root / MANIFEST_NAME
    if not path.is_file():
        return
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a celltune manifest ({err}); delete it") from err
    for rel, entry in files.items():
        if names is not None and rel not in names:
            continue
        p = root / rel
        if not p.is_file() or p.stat().st_size != entry.get("size"):
            raise CheckpointError(
                f"{p} is missing or truncated (manifest says {entry.get('size')} bytes): the "
                "directory was not written completely; re-create it"
            )
        if sha256_file(p) != entry.get("sha256"):
            raise CheckpointError(
                f"{p} is corrupted (its SHA-256 differs from {path}); restore or re-create it"
            )


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; swap it in as one unit on success.

    Readers see the old directory or the new one, never a mix: the old one is moved
    aside, the new one renamed into place, then the old one removed.
    """
    import shutil

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = Path(
                tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=".tmp", dir=target.parent)
            )
            os.replace(target, old / "d")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_free_space(path: str | os.PathLike[str], needed: int) -> None:
    """Refuse a write of about ``needed`` bytes that cannot fit, before it starts.

    Some writers (HDF5) crash the process instead of raising when the disk fills up, so
    the space is checked first; the message names the path and the space needed.
    """
    import shutil

    from celltune.errors import CelltuneError

    probe = Path(path).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise CelltuneError(
            f"not enough space to write {path}: about {needed / 1e6:.1f} MB needed, "
            f"{free / 1e6:.1f} MB free there; free some space or choose an --out on a larger disk"
        )
