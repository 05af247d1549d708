"""The host tier of adapters: which names exist (multi_lora.json, adapter roots, loaded or uploaded
through the admin model), which version each serves (its digest), and the packed adapters in host
memory (pinned on CUDA), keyed by digest, LRU within ``max_host_adapter_bytes``.

Identity (engine/adapter_identity.py): a name resolves to a digest; ``acquire`` hands out the
packed adapter of that digest with a reference held for the request, which keeps that version for
the request's whole life even if the name is reloaded or unloaded meanwhile. Two names whose
bytes are the same share one packed copy (and one set of GPU pool pages). A version no name
points to any more is *retired*: it leaves host memory when its last reference goes, and the
engine loop frees its pool pages once no running request uses it (``take_retired``).

Files changed on disk: resolution compares the size, mtime and inode of both files with those
seen when the version was read, and reads the adapter again when they differ, so a replaced
adapter is never served stale (requests admitted before keep the version they got).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from engine.adapter_identity import file_stamp, serving_salt
from engine.adapters import PackedAdapter, is_inside, read_adapter
from engine.config import ModelConfig
from engine.errors import AdapterExistsError, AdapterLoadError, AdapterNotFoundError
from engine.errors import adapter_not_found as not_found
from engine.request_checks import check_adapter_name

logger = logging.getLogger("multilora")


@dataclass
class AdapterStats:
    num_host: int = 0
    host_bytes: int = 0
    loads_total: int = 0  # disk -> host
    load_seconds_total: float = 0.0
    host_hits_total: int = 0
    host_evictions_total: int = 0


@dataclass
class NameEntry:
    """What a name serves now."""

    path: str | None  # adapter directory (uploads: a copy in the spool directory)
    root: str | None  # the adapter root it lies in (checked for symlinks), None for multi_lora.json
    source: str  # "config" (multi_lora.json), "root" (found under lora_roots), "admin", "upload", "memory"
    digest: str
    stamp: tuple | None  # engine.adapter_identity.file_stamp when it was read; None: not checked


class LoRAManager:
    """Loads adapters from disk on first use and keeps them packed in host memory.

    ``acquire`` runs in request threads (it may read from disk) and returns the packed adapter
    with a reference held for the request; ``release`` drops it (by ``PackedAdapter.key``). A
    version a live request holds is never dropped from host memory. One load per name at a time:
    concurrent requests or admin loads of one name wait for the first and share its result.
    """

    def __init__(self, model: ModelConfig, known: dict[str, str], roots: list[str], max_lora_rank: int,
                 max_host_bytes: int, page_size: int, dtype: torch.dtype, pin_memory: bool,
                 allow_symlinks_outside_roots: bool = False, base_fingerprint: bytes = b"",
                 shard: Callable[[PackedAdapter], PackedAdapter] | None = None) -> None:
        """``shard``: turns a packed adapter into what the pool holds (tensor parallelism: every
        rank's slice of it, engine/sharding.py); by default the packed adapter itself."""
        for name in known:
            check_adapter_name(name)
        self.model = model
        self.known = dict(known)  # multi_lora.json
        self.roots = list(roots)
        self.max_lora_rank = max_lora_rank
        self.max_host_bytes = max_host_bytes
        self.page_size = page_size
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.allow_symlinks_outside_roots = allow_symlinks_outside_roots
        self._shard = shard or (lambda packed: packed)
        self.salt = serving_salt(base_fingerprint, dtype)
        self._lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._names: dict[str, NameEntry] = {}  # names with a version read
        self._digest_names: dict[str, set[str]] = {}
        self._unloaded: set[str] = set()  # unloaded names: not found again under a root or in multi_lora.json
        self._host: OrderedDict[str, PackedAdapter] = OrderedDict()  # by digest; LRU: least recent first
        self._refs: dict[str, int] = {}  # by digest
        self._host_bytes = 0  # of the adapters in self._host, kept as they come and go
        self._retired: set[str] = set()  # digests no name points to, for the engine loop
        self._spool: str | None = None  # uploaded adapters, written out so that they can leave host memory
        self._spooling: set[str] = set()  # digests of uploads not written out yet
        self.stats = AdapterStats()

    # --- resolution ---------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        """Path of a known adapter, or AdapterNotFoundError (which names no other adapter and no path:
        a client learns nothing of what else is served)."""
        return self._locate(name)[0]

    def _locate(self, name: str) -> tuple[str, str | None, str]:
        """(path, the adapter root it lies in or None, source)."""
        check_adapter_name(name)
        with self._lock:
            if name in self._unloaded:
                raise not_found(name)
            entry = self._names.get(name)
            if entry is not None and entry.path is not None:
                return entry.path, entry.root, entry.source
            if entry is not None:
                raise AdapterLoadError(f"LoRA adapter '{name}' was made in memory and cannot be read again")
        if name in self.known:
            return self.known[name], None, "config"
        for root in self.roots:
            candidate = os.path.join(root, name)
            if os.path.isfile(os.path.join(candidate, "adapter_config.json")):
                return candidate, root, "root"
        logger.info("LoRA adapter '%s' is not known (adapter roots searched: %s)", name, self.roots)
        raise not_found(name)

    def _fresh_entry(self, name: str) -> NameEntry | None:
        """The entry of a name whose version is in host memory and whose files are unchanged."""
        with self._lock:
            entry = self._names.get(name)
            if entry is None or entry.digest not in self._host or name in self._unloaded:
                return None
        if entry.stamp is not None and file_stamp(entry.path) != entry.stamp:
            logger.info("LoRA adapter '%s' changed on disk: reading it again", name)
            return None
        return entry

    def acquire(self, name: str) -> PackedAdapter:
        check_adapter_name(name)
        packed = self._take_loaded(name)
        if packed is not None:
            return packed
        with self._name_lock(name):
            packed = self._take_loaded(name)  # another thread loaded it meanwhile
            if packed is not None:
                return packed
            path, root, source = self._locate(name)
            return self._read(name, path, root, source, take_ref=True)

    def _take_loaded(self, name: str) -> PackedAdapter | None:
        entry = self._fresh_entry(name)
        if entry is None:
            return None
        with self._lock:
            if self._names.get(name) is not entry or entry.digest not in self._host:
                return None
            self._host.move_to_end(entry.digest)
            self._refs[entry.digest] = self._refs.get(entry.digest, 0) + 1
            self.stats.host_hits_total += 1
            return self._host[entry.digest]

    def _read(self, name: str, path: str, root: str | None, source: str, take_ref: bool,
              upload: tuple[bytes, bytes] | None = None) -> PackedAdapter:
        """Read (or take an upload), pack, and make it the version of ``name``. Caller holds the
        name's lock."""
        stamp = file_stamp(path) if upload is None else None  # before reading: a change after is noticed
        start = time.monotonic()
        # An adapter found in a root stays inside it: a directory or file symlinked out of it would
        # let whoever writes the root read any file the server can (names symlinked to adapters of
        # the same root, as bench/serving.py makes them, are inside). multi_lora.json paths are
        # the operator's own.
        packed = read_adapter(name, path, self.model, self.max_lora_rank, self.page_size, self.dtype,
                              self.pin_memory, root=None if root is None or self.allow_symlinks_outside_roots else root,
                              salt=self.salt, upload=upload)
        packed = self._shard(packed)
        seconds = time.monotonic() - start
        if upload is not None:
            path = self._spool_upload(packed.digest, upload)
        with self._lock:
            self.stats.loads_total += 1
            self.stats.load_seconds_total += seconds
            shared = self._host.get(packed.digest)
            if shared is not None:  # the same bytes under another name, or read again unchanged
                packed = shared
                self._host.move_to_end(packed.digest)
            else:
                self._put(packed.digest, packed)
            self._bind(name, NameEntry(path, root, source, packed.digest, stamp))
            if take_ref:
                self._refs[packed.digest] = self._refs.get(packed.digest, 0) + 1
            self._shrink()
        logger.info("loaded LoRA adapter '%s' (digest %s, %d pages) in %.3f s", name, packed.digest[:12],
                    packed.num_pages, seconds)
        return packed

    def _bind(self, name: str, entry: NameEntry) -> None:
        # caller holds the lock
        old = self._names.get(name)
        self._names[name] = entry
        self._unloaded.discard(name)
        self._digest_names.setdefault(entry.digest, set()).add(name)
        self._retired.discard(entry.digest)
        if old is not None and old.digest != entry.digest:
            self._unbind_digest(name, old.digest)

    def _unbind_digest(self, name: str, digest: str) -> None:
        # caller holds the lock: ``name`` no longer serves ``digest``
        names = self._digest_names.get(digest)
        if names is not None:
            names.discard(name)
            if names:
                return
            del self._digest_names[digest]
        self._retired.add(digest)
        if not self._refs.get(digest) and digest in self._host:
            self._host_bytes -= self._host.pop(digest).num_bytes

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._name_locks.setdefault(name, threading.Lock())

    # --- references -----------------------------------------------------------------------------
    def release(self, key: str) -> None:
        """Drop one reference to a version (``PackedAdapter.key``)."""
        with self._lock:
            count = self._refs.get(key, 0)
            assert count > 0, f"adapter {key!r} released more often than acquired"
            if count == 1:
                del self._refs[key]
                if key not in self._digest_names and key in self._host:  # retired: gone with its last user
                    self._host_bytes -= self._host.pop(key).num_bytes
            else:
                self._refs[key] = count - 1
            self._shrink()

    def refs(self, key: str) -> int:
        with self._lock:
            return self._refs.get(key, 0)

    def is_named(self, key: str) -> bool:
        with self._lock:
            return key in self._digest_names

    def names_of(self, keys: list[str]) -> dict[str, str]:
        """{name: digest} of the names that serve one of ``keys``."""
        with self._lock:
            return {name: key for key in keys for name in self._digest_names.get(key, ())}

    def largest_num_pages(self) -> int:
        with self._lock:
            return max((p.num_pages for p in self._host.values()), default=0)

    def take_retired(self) -> set[str]:
        """Versions retired since the last call (the engine loop frees their pool pages)."""
        with self._lock:
            retired, self._retired = self._retired, set()
            return retired

    def register(self, name: str, packed: PackedAdapter) -> None:
        """Add an adapter made in memory (benchmarks, tests) to the host tier, as if loaded from disk."""
        check_adapter_name(name)
        packed = self._shard(packed)
        with self._lock:
            self.known[name] = f"<memory:{name}>"
            self._put(packed.key, packed)
            self._bind(name, NameEntry(None, None, "memory", packed.key, None))
            self._shrink()

    def is_in_host(self, name: str) -> bool:
        """Whether ``acquire`` would return without reading from disk."""
        return self._fresh_entry(name) is not None

    def get(self, name: str) -> PackedAdapter:
        with self._lock:
            return self._host[self._names[name].digest]

    def snapshot(self) -> AdapterStats:
        with self._lock:
            self.stats.num_host = len(self._host)
            self.stats.host_bytes = self._host_bytes
            return AdapterStats(**vars(self.stats))

    # --- administration (multilora_adapters) --------------------------------------------------
    def load(self, name: str, path: str | None = None) -> PackedAdapter:
        """Make ``name`` served and its version resident in host memory. With ``path``: a PEFT
        directory that must lie under one of ``lora_roots``; a name already served from another
        directory is AdapterExistsError. Without: a name of multi_lora.json or of a root (also one
        unloaded before). Loading what is loaded already is a no-op that returns it."""
        check_adapter_name(name)
        with self._name_lock(name):
            if path is None:
                with self._lock:
                    self._unloaded.discard(name)
                entry = self._fresh_entry(name)
                if entry is not None:
                    return self._host_copy(entry.digest)
                path, root, source = self._locate(name)
                return self._read(name, path, root, source, take_ref=False)
            root = self._root_of(path)
            if root is None:
                logger.warning("LoRA adapter '%s': load refused, %s is not under a lora_roots folder %s",
                               name, path, self.roots)
                raise AdapterLoadError(f"LoRA adapter '{name}': lora_path must lie under one of the server's "
                                       "lora_roots folders (engine.json)")
            current = self._current_path(name)
            if current is not None and os.path.realpath(current) != os.path.realpath(path):
                raise AdapterExistsError(f"LoRA adapter '{name}' is already served from another path: unload it "
                                         "first, or use action reload")
            entry = self._fresh_entry(name)
            if entry is not None:
                return self._host_copy(entry.digest)
            return self._read(name, path, root, "admin", take_ref=False)

    def upload(self, name: str, config_json: bytes, weights: bytes, replace: bool = False) -> PackedAdapter:
        """Register an adapter sent as bytes (adapter_config.json, adapter_model.safetensors),
        checked as a file is. A name already served with other bytes is AdapterExistsError unless
        ``replace`` (reload)."""
        check_adapter_name(name)
        with self._name_lock(name):
            if not replace and self._current_path(name) is not None:
                with self._lock:
                    entry = self._names.get(name)
                packed = read_adapter(name, "<upload>", self.model, self.max_lora_rank, self.page_size, self.dtype,
                                      False, salt=self.salt, upload=(config_json, weights))
                if entry is None or entry.digest != packed.digest:
                    raise AdapterExistsError(f"LoRA adapter '{name}' is already served with other weights: unload "
                                             "it first, or send them with action reload")
                return self._host_copy(entry.digest) if entry.digest in self._host else packed
            return self._read(name, "<upload>", None, "upload", take_ref=False, upload=(config_json, weights))

    def reload(self, name: str) -> tuple[str | None, PackedAdapter]:
        """Read a served name's files again; returns (the previous digest, the version now)."""
        check_adapter_name(name)
        with self._name_lock(name):
            path, root, source = self._locate(name)
            with self._lock:
                entry = self._names.get(name)
            previous = entry.digest if entry is not None else None
            return previous, self._read(name, path, root, source, take_ref=False)

    def unload(self, name: str) -> str | None:
        """Stop serving ``name``: requests admitted keep their version; new ones get NOT_FOUND.
        Returns the digest it served (None if it was never read)."""
        check_adapter_name(name)
        with self._name_lock(name):
            self._locate(name)  # NOT_FOUND for a name not served
            with self._lock:
                entry = self._names.pop(name, None)
                self._unloaded.add(name)
                if entry is None:
                    return None
                self._unbind_digest(name, entry.digest)
                return entry.digest

    def entries(self) -> list[tuple[str, NameEntry | None, PackedAdapter | None, int]]:
        """(name, its entry or None if never read, the packed version if in host memory, references)
        for every served name: multi_lora.json, read from a root, loaded, uploaded."""
        with self._lock:
            names = sorted((set(self._names) | set(self.known)) - self._unloaded)
            rows = []
            for name in names:
                entry = self._names.get(name)
                packed = self._host.get(entry.digest) if entry is not None else None
                rows.append((name, entry, packed, self._refs.get(entry.digest, 0) if entry is not None else 0))
            return rows

    def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    def _root_of(self, path: str) -> str | None:
        for root in self.roots:
            if is_inside(path, root) and os.path.realpath(path) != os.path.realpath(root):
                return root
        return None

    def _current_path(self, name: str) -> str | None:
        """The directory a served name is read from, None if it is not served."""
        try:
            return self._locate(name)[0]
        except AdapterNotFoundError:
            return None

    def _host_copy(self, digest: str) -> PackedAdapter:
        with self._lock:
            return self._host[digest]

    def _spool_upload(self, digest: str, upload: tuple[bytes, bytes]) -> str:
        """Where an uploaded adapter is written out, so that it can leave host memory and come
        back. The write runs on a thread of its own (it is off the upload's path to its first
        token); until it is done the adapter stays in host memory (``_shrink`` skips it)."""
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="multilora-uploads-")
        path = os.path.join(self._spool, digest)
        with self._lock:
            if os.path.isdir(path) or digest in self._spooling:
                return path
            self._spooling.add(digest)

        def write() -> None:
            try:
                staging = tempfile.mkdtemp(dir=self._spool)
                config_json, weights = upload
                with open(os.path.join(staging, "adapter_config.json"), "wb") as f:
                    f.write(config_json)
                with open(os.path.join(staging, "adapter_model.safetensors"), "wb") as f:
                    f.write(weights)
                os.rename(staging, path)
            except OSError:
                logger.exception("writing uploaded LoRA adapter %s to %s failed; it stays in host memory", digest, path)
                return  # still in _spooling: never evicted from host memory
            with self._lock:
                self._spooling.discard(digest)
        threading.Thread(target=write, name="multilora-upload-writer", daemon=True).start()
        return path

    def _put(self, key: str, packed: PackedAdapter) -> None:
        # caller holds the lock
        old = self._host.pop(key, None)
        self._host_bytes += packed.num_bytes - (old.num_bytes if old is not None else 0)
        self._host[key] = packed

    def _shrink(self) -> None:
        # caller holds the lock: drop unreferenced adapters, least recent first, until within budget
        for key in list(self._host):
            if self._host_bytes <= self.max_host_bytes:
                return
            if not self._refs.get(key) and key not in self._spooling:
                self._host_bytes -= self._host.pop(key).num_bytes
                self.stats.host_evictions_total += 1

