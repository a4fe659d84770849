"""Files written whole or not at all, and read back only when they are what was written.

Every file the package writes (checkpoints, the ILP file, feature caches, run records, result
tables) goes through :func:`atomic_path` (or :func:`atomic_file`, its file object): it is written to
a temporary file in the target's folder, flushed to the disk and renamed over the target, so a
crash, a kill or a full disk never leaves a half-written file in its place, and the previous good
file stays until the new one is complete. A temporary file's name carries its writer's host and
process id, so that a later writer in the same folder removes the temporaries of a writer that was
killed (:func:`sweep_dead_writers`).

Checkpoints and caches' records are dictionaries of tensors and numbers saved with
:func:`save_checked`, which stores a SHA-256 digest of their contents beside them; :func:`load_checked`
recomputes it, so a cut, overwritten or otherwise damaged file is reported instead of being used. A
raw file too large to load whole (a feature cache's states) has its :func:`file_sha256`, computed in
chunks, in such a record.
"""

import errno
import hashlib
import os
import pickle
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager, suppress
from functools import lru_cache
from logging import getLogger
from pathlib import Path

import torch

from recbole_st2si.errors import UserInputError

CHECKSUM_KEY = "sha256"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserInputError):
    """The disk (or quota) ran out while a file was written; the previous file is intact."""


class DamagedFileError(UserInputError):
    """A checkpoint or cache that cannot be read or whose contents do not match its checksum."""

    def __init__(self, path, reason, remedy=None):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason})" + (f": {remedy}" if remedy else ""))


def human_size(num_bytes):
    """A size in decimal units (1 MB = 1,000,000 bytes), the units the documentation gives sizes in."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if num_bytes < 1000 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000


def _temporary_name_parts(path):
    """``prefix`` and ``suffix`` of a temporary beside ``path``: ``.<name>.<host>.<pid>.<random>.tmp``."""
    return {"prefix": f".{path.name}.{socket.gethostname()}.{os.getpid()}.", "suffix": ".tmp"}


def _process_is_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_dead_writers(folder):
    """Remove the temporary files and folders in ``folder`` that a process of this host left when it
    was killed in the middle of a write (a feature cache's is as large as the cache): no one else
    ever would. Temporaries of live processes, and of other hosts sharing the folder, stay."""
    own = re.compile(rf"\..+\.{re.escape(socket.gethostname())}\.(\d+)\.[^.]+\.(?:tmp|old)")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = own.fullmatch(name)
        if match is None or _process_is_alive(int(match[1])):
            continue
        path = Path(folder) / name
        with suppress(OSError):  # another writer may sweep it at the same time
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            getLogger().info(f"removed {path}, left by process {match[1]}, which is gone")


class _RecordingWriter:
    """A file wrapper that remembers the ``OSError`` of a failed write: ``torch.save`` replaces it
    by an unhelpful ``RuntimeError`` (``unexpected pos ...``)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.file.flush()


def _write_error(path, error, size):
    if error.errno in DISK_FULL_ERRNOS:
        size_text = f" ({human_size(size)})" if size is not None else ""
        return DiskFullError(
            f"disk full: could not write {path}{size_text}: {error.strerror}; the previous file, if any, is "
            "unchanged. Free some space there or choose another folder"
        )
    return UserInputError(f"cannot write {path}: {error.strerror or error}")


@contextmanager
def atomic_path(path, size=None, exclusive=False):
    """Yield the path of a new temporary file beside ``path`` (for writers that need a path, such as
    a memory map); once the block ends it is flushed to the disk and renamed over ``path``.

    ``size``: the expected number of bytes, for the disk-full message. ``exclusive``: ``path`` must
    not exist (it is linked into place, which fails if another writer got there first), so no file
    of another writer is ever replaced. Any error removes the temporary file; a full disk, an
    unwritable folder or an existing exclusive target becomes one :class:`UserInputError` line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_writers(path.parent)
        handle, temporary = tempfile.mkstemp(dir=path.parent, **_temporary_name_parts(path))
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's files are private; the target gets the usual mode
        os.close(handle)
    except OSError as error:
        raise _write_error(path, error, size) from None
    try:
        yield Path(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # also writes back what memory maps of other processes changed
        finally:
            os.close(descriptor)
        if exclusive:
            os.link(temporary, path)
            os.unlink(temporary)
        else:
            os.replace(temporary, path)
        _sync_folder(path.parent)
    except BaseException as error:
        if os.path.exists(temporary):
            os.unlink(temporary)
        if isinstance(error, FileExistsError) and exclusive:
            raise UserInputError(f"{path} exists: another run wrote it; it is left as it is") from None
        if isinstance(error, OSError):
            raise _write_error(path, error, size) from None
        raise


@contextmanager
def atomic_file(path, size=None, text=False, exclusive=False):
    """Yield a file to write ``path``'s new contents to; it replaces ``path`` only once complete
    (see :func:`atomic_path`)."""
    with atomic_path(path, size, exclusive) as temporary:
        with open(temporary, "w" if text else "wb", **({"encoding": "utf-8", "newline": ""} if text else {})) as file:
            writer = file if text else _RecordingWriter(file)
            try:
                yield writer
            except BaseException:
                if getattr(writer, "error", None) is not None:
                    raise writer.error from None
                raise


def reserve_space(path, size):
    """Give the file ``path`` its ``size`` bytes on the disk now: a memory map written later cannot
    then run out of space, which it would report by killing the process (SIGBUS), not by an error."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    finally:
        os.close(descriptor)


def file_sha256(path):
    """The SHA-256 of a file, read in chunks: a file larger than memory is never read whole."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@lru_cache(maxsize=None)
def _umask():
    """The process's umask, read without changing it (``os.umask`` would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _sync_folder(folder):
    """Make the rename itself durable (best effort: not every file system opens folders)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_folder(path):
    """Yield a temporary folder to fill; it replaces the folder ``path`` only once complete."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_writers(path.parent)
        temporary = Path(tempfile.mkdtemp(dir=path.parent, **_temporary_name_parts(path)))
        temporary.chmod(0o777 & ~_umask())
    except OSError as error:
        raise _write_error(path, error, None) from None
    try:
        yield temporary
        if path.exists():
            previous = temporary.with_suffix(".old")
            os.replace(path, previous)
            os.replace(temporary, path)
            shutil.rmtree(previous)
        else:
            os.replace(temporary, path)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_error(path, error, None) from None
        raise


def write_text(path, text):
    """Replace ``path`` by ``text`` atomically."""
    with atomic_file(path, size=len(text.encode("utf-8")), text=True) as file:
        file.write(text)


def payload_size(value):
    """The bytes of the tensors in ``value``: about the size of its saved file."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(payload_size(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(payload_size(item) for item in value)
    return 0


def save_torch(value, path, exclusive=False):
    """``torch.save`` through :func:`atomic_file`."""
    with atomic_file(path, size=payload_size(value), exclusive=exclusive) as file:
        torch.save(value, file)


def content_digest(value):
    """SHA-256 over the structure, tensors (dtype, shape, bytes) and plain values of ``value``."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value):
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {tensor.dtype} {tuple(value.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def save_checked(record: dict, path, exclusive=False):
    """Save a dictionary of tensors and numbers atomically, with the digest of its contents
    (``exclusive``: never replacing an existing file)."""
    save_torch({**record, CHECKSUM_KEY: content_digest(record)}, path, exclusive)


def load_checked(path, map_location="cpu", remedy=None) -> dict:
    """Load a file written by :func:`save_checked`, tensors and numbers only, and verify its digest.

    Raises :class:`DamagedFileError` (naming the file, why, and ``remedy``) for a file that cannot
    be read, holds anything else, or whose contents changed; a missing file is a ``FileNotFoundError``.
    """
    try:
        record = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as error:  # PyTorch's advice to load it with weights_only=False does not apply
        if "Unsupported global" in str(error):
            raise DamagedFileError(path, "it holds objects other than tensors and numbers, which are never loaded",
                                   remedy) from None
        raise DamagedFileError(path, "cannot be read, cut short or not a PyTorch file", remedy) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]
        raise DamagedFileError(path, f"cannot be read, cut short or not a PyTorch file: {detail}", remedy) from None
    if not isinstance(record, dict) or CHECKSUM_KEY not in record:
        raise DamagedFileError(path, "it has no checksum: not written by this version of recbole-st2si", remedy)
    expected = record.pop(CHECKSUM_KEY)
    if content_digest(record) != expected:
        raise DamagedFileError(path, "its contents do not match their checksum", remedy)
    return record
