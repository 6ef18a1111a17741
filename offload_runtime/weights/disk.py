"""The disk store: a model's decoder layers packed one file per layer, written once from the checkpoint, and read
back every sweep with direct I/O by reader threads that run ahead of the sweep into a ring of staging buffers.

The format (one directory, `--offload-dir`):

    store.json           the manifest: format version, whose layers these are (the checkpoint's identity and
                         fingerprint, as plans record them), the layout's signature, layer and file sizes
    layer-00000.bin ...  one decoder layer each: its packed buffer (`layout.nbytes` opaque bytes, laid out as every
                         host buffer and device slot is, whatever the weight format), zero-padded to a multiple of
                         ALIGN (4 KiB), so every read is aligned for O_DIRECT and every file can be mapped

A layer file is written under a temporary name, flushed and renamed, so a file under its final name is whole and
an interrupted build resumes where it stopped. A store whose checkpoint changed (another fingerprint) is rebuilt
and a layer file of the wrong size rewritten, never used; a store of another model or format in a directory the
user named is an error (it is not ours to delete). Only files a manifest names are ever deleted: layer files with
no manifest, or a `store.json` that is not a layer store's, are someone else's, and the store refuses the
directory rather than touch them. Builders of one store (torchrun ranks) take turns on a lock.

Reading: `DiskReader` reads the disk layers in the order the sweeps use them, cyclically across sweeps, into a
ring of `depth` page-aligned (page-locked on CUDA) staging buffers; each layer is split into chunks read in
parallel by `threads` workers (an NVMe drive needs several requests in flight to reach its bandwidth). A buffer is
refilled as soon as its layer has been copied into a device slot, so reads run ahead of compute, and at the end of
a sweep they go on with the next sweep's first disk layers while the draft grows the tree. Where the filesystem
refuses O_DIRECT the same reads are buffered (one warning) and the page cache is told to drop what was read.

Host layers of a store-backed model are mapped shared from the layer files (`map_layer`): processes that map one
store share one copy of those pages, page-locked per process on CUDA (weights/store.py `pin_pages`).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import threading
import time
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import ResourceError, StoreError
from ..memory import fmt_bytes
from .layout import LayerLayout, buffer_over_bytes
from .source import WeightSource
from .store import HostLayerStore, fill_layer, pin_pages

ALIGN = 4096  # O_DIRECT wants buffers, offsets and lengths aligned to the logical block size; 4 KiB covers drives
FORMAT_VERSION = 1
MANIFEST = "store.json"
CHUNK_BYTES = 32 << 20  # the largest single read; a layer is split so every reader thread has a share
DEFAULT_READ_THREADS = 4
DEFAULT_PREFETCH = 2  # staging buffers: one being read while the one before it is copied to a slot


@dataclass(frozen=True)
class StoreKey:
    """Whose layers a store holds: a checkpoint's identity and fingerprint (api/plans.py), or a random-weights key."""

    identity: str
    fingerprint: str
    label: str  # how messages name the model


def padded_bytes(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def layout_signature(layout: LayerLayout) -> str:
    """Changes whenever the bytes of a packed layer would (tensor slots, offsets, dtypes, weight format)."""
    return hashlib.sha256(repr(layout).encode()).hexdigest()[:16]


def page_aligned(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 CPU tensor of `nbytes` at a page-aligned address (anonymous memory; O_DIRECT needs the
    alignment, and cudaHostRegister pins exactly these pages)."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes]


def _byteview(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


# --- opening files for direct I/O


def _open_direct(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_DIRECT)


def open_io(path: Path, flags: int, direct: bool) -> tuple[int, bool]:
    """(fd, direct): opened with O_DIRECT when asked and the filesystem takes it, else buffered."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return _open_direct(path, flags), True
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags), False


def read_range(fd: int, view: memoryview, offset: int, direct: bool, after: Any = None) -> int:
    """Read len(view) bytes at `offset` into `view`; `after`: a CUDA event to wait for first (the copy out of this
    staging buffer). Buffered reads drop their pages from the cache: they would only push out other memory."""
    if after is not None:
        after.synchronize()
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise StoreError(f"a layer store file ended {len(view) - got} bytes early (truncated while in use); "
                             f"delete the store directory and run again to rebuild it")
        got += n
    if not direct:
        os.posix_fadvise(fd, offset, got, os.POSIX_FADV_DONTNEED)
    return got


def _chunks(nbytes: int, threads: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of one aligned file: at least one per thread, none above CHUNK_BYTES."""
    size = min(CHUNK_BYTES, padded_bytes(-(-nbytes // max(1, threads))))
    return [(a, min(size, nbytes - a)) for a in range(0, nbytes, size)]


def direct_io_works(path: Path) -> bool:
    """Whether `path`'s filesystem reads it with O_DIRECT: some refuse at open, some accept the flag and refuse the
    reads; one aligned read tells."""
    fd, direct = open_io(path, os.O_RDONLY, True)
    try:
        if direct:
            os.preadv(fd, [_byteview(page_aligned(ALIGN))], 0)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        direct = False
    finally:
        os.close(fd)
    return direct


_warned_buffered: set[str] = set()


def _warn_buffered(directory: Path) -> None:
    if str(directory) not in _warned_buffered:
        _warned_buffered.add(str(directory))
        warnings.warn(f"the filesystem of {directory} refuses direct I/O (O_DIRECT); reading the disk layers "
                      f"through the page cache instead (slower, and the cache churns)", RuntimeWarning, stacklevel=3)


# --- the store on disk


@dataclass(frozen=True)
class LayerFiles:
    """A complete store: every decoder layer's file, checked against its manifest."""

    directory: Path
    layout: LayerLayout
    n_layers: int
    key: StoreKey

    @property
    def layer_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def file_bytes(self) -> int:
        return padded_bytes(self.layout.nbytes)

    @property
    def nbytes(self) -> int:
        return self.n_layers * self.file_bytes

    def path(self, i: int) -> Path:
        return self.directory / layer_name(i)

    def map_layer(self, i: int) -> torch.Tensor:
        """Layer i's bytes (uint8, file_bytes long) mapped shared and read-only, its pages read in now."""
        with open(self.path(i), "rb") as f:
            mm = mmap.mmap(f.fileno(), self.file_bytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not writable": the runtime only ever copies from it
            return torch.frombuffer(mm, dtype=torch.uint8)


def layer_name(i: int) -> str:
    return f"layer-{i:05d}.bin"


def _format(layout: LayerLayout) -> str:
    """The weight format in words, as messages name it: "float32", "bfloat16, int4-g128"."""
    return str(layout.dtype).removeprefix("torch.") + (f", {layout.quant.label}" if layout.quant else "")


def _manifest(key: StoreKey, layout: LayerLayout, n_layers: int) -> dict[str, Any]:
    return {"kind": "layer-store", "version": FORMAT_VERSION, "identity": key.identity,
            "fingerprint": key.fingerprint, "model": key.label, "layout": layout_signature(layout),
            "layout_repr": repr(layout), "format": _format(layout), "n_layers": n_layers, "layer_bytes": layout.nbytes,
            "file_bytes": padded_bytes(layout.nbytes), "align": ALIGN}


def _commit(tmp: Path, final: Path) -> None:
    """Make `tmp` durable and give it its final name: a file under a final name is always whole."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_manifest(directory: Path, data: dict[str, Any]) -> None:
    tmp = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    _commit(tmp, directory / MANIFEST)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == "layer-store" else None


def _fix(directory: Path) -> str:
    return f"pass --offload-dir (offload_dir=) naming another directory, or delete {directory}"


def _prepare_dir(directory: Path) -> None:
    """Create the directory and prove it is writable, before anything is read or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"cannot write the layer store to {directory} ({e.strerror or e}); pass --offload-dir "
                         f"(offload_dir=) naming a writable directory on a local disk") from None


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder at a time (ranks of one torchrun start together); the others wait, then find it built."""
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _manifest_layers(have: dict[str, Any] | None) -> set[str]:
    """The layer file names a manifest of ours accounts for (none without one)."""
    n = have.get("n_layers") if have is not None else None
    return {layer_name(i) for i in range(n)} if isinstance(n, int) and 0 <= n < 100_000 else set()


def _refuse_foreign(directory: Path, have: dict[str, Any] | None) -> None:
    """Refuse a directory whose `store.json` or layer files this runtime did not write: they may be the user's, and
    a rebuild would delete or overwrite them."""
    if have is None and (directory / MANIFEST).exists():
        raise StoreError(f"{directory / MANIFEST} is not a layer store's manifest, so {directory} is not a store "
                         f"this runtime wrote; pass --offload-dir (offload_dir=) naming an empty directory")
    foreign = sorted(p.name for p in directory.glob("layer-*.bin") if p.name not in _manifest_layers(have))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise StoreError(f"{directory} holds {foreign[0]}{more} that no {MANIFEST} of this runtime accounts for; "
                         f"they are left alone: move them, or pass --offload-dir (offload_dir=) naming an empty "
                         f"directory")


def _remove_layers(directory: Path, have: dict[str, Any] | None) -> None:
    """Delete the layer files the manifest `have` names, nothing else."""
    for name in _manifest_layers(have):
        (directory / name).unlink(missing_ok=True)


def _remove_temporaries(directory: Path) -> None:
    """Half-written layer files of a killed build: under the lock no builder is writing, so each is stale."""
    for p in directory.glob(".layer-[0-9][0-9][0-9][0-9][0-9].bin.*.tmp"):
        p.unlink(missing_ok=True)


def free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def _check_space(directory: Path, need: int, total: int) -> None:
    free = free_bytes(directory)
    if need > free:
        raise ResourceError(
            f"the layer store needs {fmt_bytes(need)} more in {directory} (the whole store is {fmt_bytes(total)}) "
            f"but only {fmt_bytes(free)} is free there; free space, or pass --offload-dir (offload_dir=) on a disk "
            f"with room")


def write_file(path: Path, raw: torch.Tensor) -> None:
    """Write the aligned buffer `raw` (page-aligned, a multiple of ALIGN long) as `path`, with direct I/O where the
    filesystem takes it (GBs of layers would only push other memory out of the page cache), durably: under a
    temporary name first, so `path` is always whole. OSErrors are the caller's to word."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd, _ = open_io(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, direct=True)
        try:
            view, done = _byteview(raw), 0
            while done < len(view):
                done += os.pwritev(fd, [view[done:]], done)
        finally:
            os.close(fd)
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_layer(files: LayerFiles, source: WeightSource, i: int, raw: torch.Tensor) -> None:
    """Read layer i from `source` into the aligned buffer `raw` and write it as layer i's file."""
    fill_layer(source, i, files.layout, buffer_over_bytes(files.layout, raw))
    try:
        write_file(files.path(i), raw)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"the disk under {files.directory} filled up while writing the layer store; free "
                                f"space or pass --offload-dir (offload_dir=) on a larger disk (the layers written "
                                f"so far are kept: the next run resumes)") from None
        raise StoreError(f"cannot write {files.path(i)} ({e.strerror or e}); {_fix(files.directory)}") from None


def open_store(directory: str | os.PathLike, key: StoreKey, layout: LayerLayout, n_layers: int,
               source: WeightSource, *, explicit: bool,
               progress: Callable[[int], Callable[[int], None] | None] | None = None,
               log: Callable[[str], None] = lambda s: None) -> LayerFiles:
    """The complete store of `key`'s layers in `directory`, written (or finished, or rebuilt) from `source` first
    when needed. `explicit`: the user named the directory, so a store of another model or format there is an
    error rather than ours to replace. `progress(k)`, called once with the number of layers to write before the
    first is written, returns a per-layer callback (or None)."""
    directory = Path(directory).expanduser().absolute()
    _prepare_dir(directory)
    files = LayerFiles(directory, layout, n_layers, key)
    want = _manifest(key, layout, n_layers)
    with _locked(directory):
        have = old = _read_manifest(directory)
        same = ("version", "identity", "layout", "n_layers", "layer_bytes", "file_bytes", "align")
        if have is not None and any(have.get(k) != want[k] for k in same):
            if explicit:
                same_model = have.get("identity") == key.identity
                what = "an older store format" if have.get("version") != FORMAT_VERSION else \
                    f"the layer store of {have.get('model', '?')}" + \
                    (f" as {have.get('format', 'another format or dtype')}" if same_model else "")
                wanted = f"the one of {key.label}" + (f" as {want['format']}" if same_model else "")
                raise StoreError(f"{directory} holds {what}, not {wanted}; {_fix(directory)}")
            have = None
        if have is not None and have.get("fingerprint") != key.fingerprint:
            log(f"the layer store in {directory} was written from other files of {key.label}; rebuilding it")
            have = None
        if have is None:
            _refuse_foreign(directory, old)
            _remove_layers(directory, old)
        _remove_temporaries(directory)
        sizes = {i: files.path(i).stat().st_size if files.path(i).is_file() else None for i in range(n_layers)}
        bad = [i for i, s in sizes.items() if s is not None and s != files.file_bytes]
        if bad:
            log(f"{len(bad)} layer file(s) of the store in {directory} have the wrong size (truncated?); "
                f"rewriting them")
        missing = [i for i, s in sizes.items() if s != files.file_bytes]
        if missing:
            for i in bad:
                files.path(i).unlink()
            _check_space(directory, len(missing) * files.file_bytes, files.nbytes)
            _write_manifest(directory, {**want, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raw = page_aligned(files.file_bytes)
            tick = progress(len(missing)) if progress else None
            for i in missing:
                write_layer(files, source, i, raw)
                if tick:
                    tick(1)
    return files


def map_host_layers(host: HostLayerStore, files: LayerFiles, progress: Callable[[int], None] | None = None) -> None:
    """Fill `host` with shared read-only mappings of the store's layer files rather than private copies: processes
    mapping one store share those pages (page-locked per process when `host` pins)."""
    for i in host.layer_ids:
        raw = files.map_layer(i)
        if host.pinned and not pin_pages(raw, read_only=True):
            warnings.warn("page-locking the shared mapping of the layer store was refused; streaming host layers "
                          "from pageable memory (slower copies)", RuntimeWarning, stacklevel=2)
            host.pinned = False
        host.buffers[i] = buffer_over_bytes(files.layout, raw)
        if progress:
            progress(1)


# --- reading disk layers every sweep


@dataclass(frozen=True)
class DiskTier:
    """The layers a streamed model reads from its store every sweep, and how (streaming.py builds the reader)."""

    files: LayerFiles
    layers: tuple[int, ...]
    prefetch: int = DEFAULT_PREFETCH  # staging buffers
    threads: int = DEFAULT_READ_THREADS


@dataclass(frozen=True)
class Staged:
    """A disk layer read into a staging buffer: the bytes in layout form, and how long the caller waited."""

    layer: int
    buffer: torch.Tensor
    wait_s: float
    nbytes: int  # read from disk


def _shutdown(pool: ThreadPoolExecutor, fds: list[int]) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    for fd in fds:
        os.close(fd)


class DiskReader:
    """Reads disk layers load after load (`order`, cyclically when `repeat`) into `depth` staging buffers.

    Protocol, in load order d = 0, 1, 2, ...: `ready(d)` / `wait(d)` until its bytes are in; copy them out; then
    `release(d, after)`, which starts reading load d + depth into the same buffer (after the CUDA event `after`:
    the copy out of it). Reads of loads up to `depth` ahead are always in flight.
    """

    def __init__(self, files: LayerFiles, order: Sequence[int], *, depth: int = DEFAULT_PREFETCH,
                 threads: int = DEFAULT_READ_THREADS, pin: bool = False, repeat: bool = True):
        assert depth >= 1 and threads >= 1 and order
        self.files, self.order, self.depth, self.repeat = files, list(order), depth, repeat
        self.layers = frozenset(self.order)
        self.raw = [page_aligned(files.file_bytes) for _ in range(depth)]
        self.pinned = pin and all([pin_pages(r) for r in self.raw])
        if pin and not self.pinned:
            warnings.warn("page-locking the disk staging buffers was refused; copies from them are slower",
                          RuntimeWarning, stacklevel=2)
        self.buffers = [buffer_over_bytes(files.layout, r) for r in self.raw]
        self.views = [_byteview(r) for r in self.raw]
        self.direct = direct_io_works(files.path(self.order[0]))
        if not self.direct:
            _warn_buffered(files.directory)
        self.fds = {i: open_io(files.path(i), os.O_RDONLY, self.direct)[0] for i in sorted(self.layers)}
        self._chunks = _chunks(files.file_bytes, threads)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="layer-reader")
        self._reads: dict[int, list[Future]] = {}
        self._submitted = 0
        self.bytes_read = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._pool, list(self.fds.values()))
        for _ in range(depth):
            self._submit(None)

    def _load_layer(self, d: int) -> int | None:
        if not self.repeat and d >= len(self.order):
            return None
        return self.order[d % len(self.order)]

    def _submit(self, after: Any) -> None:
        d = self._submitted
        self._submitted += 1
        layer = self._load_layer(d)
        if layer is None:
            return
        view, fd = self.views[d % self.depth], self.fds[layer]
        self._reads[d] = [self._pool.submit(read_range, fd, view[a: a + n], a, self.direct, after)
                          for a, n in self._chunks]

    def ready(self, d: int) -> bool:
        return all(f.done() for f in self._reads[d])

    def wait(self, d: int) -> Staged:
        t0 = time.perf_counter()
        futures = self._reads.pop(d)
        try:
            n = sum(f.result() for f in futures)
        except OSError as e:
            raise StoreError(f"reading layer {self._load_layer(d)} from the layer store in {self.files.directory} "
                             f"failed ({e.strerror or e}); check the disk, or delete the store to rebuild it") \
                from None
        self.bytes_read += n
        return Staged(self._load_layer(d), self.buffers[d % self.depth], time.perf_counter() - t0, n)

    def release(self, d: int, after: Any = None) -> None:
        """Load d is out of its staging buffer (or will be once CUDA event `after` fires): read load d + depth."""
        assert d + self.depth == self._submitted and d not in self._reads, (d, self._submitted)
        self._submit(after)

    def close(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class ReadBandwidth:
    nbytes: int
    seconds: float
    threads: int
    direct: bool

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


def measure_read_bandwidth(paths: Sequence[Path], threads: int, chunk: int = CHUNK_BYTES) -> ReadBandwidth:
    """Read whole files (sizes multiples of ALIGN) once, in `chunk` pieces spread over `threads` workers with direct
    I/O where the filesystem allows it, as DiskReader reads layers: the bandwidth a disk tier can reach there."""
    assert paths and chunk % ALIGN == 0
    direct = direct_io_works(paths[0])
    fds = [open_io(p, os.O_RDONLY, direct)[0] for p in paths]
    pieces = [(fd, a, min(chunk, size - a)) for fd in fds for size in [os.fstat(fd).st_size]
              for a in range(0, size, chunk)]
    local = threading.local()  # one staging buffer per reader thread

    def read(piece: tuple[int, int, int]) -> int:
        fd, a, n = piece
        if not hasattr(local, "buffer"):
            local.buffer = _byteview(page_aligned(chunk))
        return read_range(fd, local.buffer[:n], a, direct)

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, pieces))
        seconds = time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)
    return ReadBandwidth(total, seconds, threads, direct)
