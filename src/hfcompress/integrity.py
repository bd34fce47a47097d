"""Checkpoint integrity: safetensors headers read with errors that name the file, the identity of
a save, per-tensor digests, and :func:`verify` (``hfcompress verify DIR``).

Every hfcompress save gets an identity (``save_id``, a random UUID) written into config.json
(``quantization_config.save_id``) and into the ``__metadata__`` of every safetensors shard
(``hfcompress.save_id``), next to a SHA-256 digest of every tensor's stored bytes
(``hfcompress.sha256``: a JSON object ``{tensor name: hex digest}``). A load refuses shards
whose identity differs from config.json's (a reader that raced a writer), and :func:`verify`
re-hashes the stored bytes (flipped bits). SHA-256 because it is the digest the Hub itself
records for LFS files (``sha256`` in the pointer), is in every Python (``hashlib``, OpenSSL, SHA
extensions on current x86 and ARM CPUs) and releases the GIL on large buffers, so tensors are
hashed on several threads.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

SAVE_ID_KEY = "hfcompress.save_id"
DIGESTS_KEY = "hfcompress.sha256"
HEADER_LIMIT = 100_000_000  # bytes; safetensors' own reader refuses larger headers
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(ValueError):
    """A checkpoint file that is damaged, mixed from two saves, or fails its digests (names the file)."""


_VERIFY_ON_LOAD: bool | None = None


def verify_on_load(enabled: bool | None = None) -> bool:
    """Opt-in digest verification of every shard when an hfcompress checkpoint is loaded
    (``verify_on_load(True)``, or the environment variable ``HFCOMPRESS_VERIFY_ON_LOAD=1``).
    Without an argument, returns whether it is on."""
    global _VERIFY_ON_LOAD
    if enabled is not None:
        _VERIFY_ON_LOAD = bool(enabled)
    if _VERIFY_ON_LOAD is not None:
        return _VERIFY_ON_LOAD
    return os.environ.get("HFCOMPRESS_VERIFY_ON_LOAD", "").lower() in ("1", "true", "yes", "on")


def new_save_id() -> str:
    return uuid.uuid4().hex


# -- headers --------------------------------------------------------------------------------
def read_header(path: str) -> tuple[dict, dict, int]:
    """``(tensors, metadata, data_start)`` of a safetensors file: ``tensors`` maps name ->
    ``{"dtype", "shape", "data_offsets"}``. Every problem raises :class:`CheckpointError` naming
    the file and what is wrong with it."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte "
                                      "header length (truncated or empty file)")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or n > size - 8:
                raise CheckpointError(f"{path}: the header length field says {n} bytes but the file has {size - 8} "
                                      "bytes after it; the file is truncated or its first 8 bytes are damaged")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the safetensors header is not UTF-8 text (byte {e.start} of the header is "
                              f"0x{raw[e.start]:02x}); the header is damaged") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e.msg} at character {e.pos} of "
                              f"{n}); the header is damaged") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is a {type(metadata).__name__}, expected a string map")
    data_len = size - 8 - n
    spans = []
    for name, meta in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise CheckpointError(f"{where}: header entry {meta!r} lacks dtype/shape/data_offsets")
        width = DTYPE_BYTES.get(meta["dtype"])
        if width is None:
            raise CheckpointError(f"{where}: unknown dtype {meta['dtype']!r}")
        shape, offsets = meta["shape"], meta["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: malformed shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        if not 0 <= begin <= end <= data_len or end - begin != count * width:
            raise CheckpointError(f"{where}: data_offsets {offsets} do not fit shape {shape} of {meta['dtype']} in "
                                  f"the {data_len} data bytes of the file (truncated file or damaged header)")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file (damaged header)")
    return header, metadata, 8 + n


# -- digests --------------------------------------------------------------------------------
def tensor_bytes(t) -> memoryview:
    """The bytes safetensors stores for a CPU torch tensor (contiguous, little-endian)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(__import__("torch").uint8).numpy()) if flat.numel() else memoryview(b"")


def tensor_digests(tensors: dict, threads: int | None = None) -> dict[str, str]:
    """``{name: sha256 hex}`` of in-memory tensors, as they will be stored."""
    views = {name: tensor_bytes(t) for name, t in tensors.items()}
    return _hash_all(views, threads)


def _hash_all(views: dict[str, memoryview], threads: int | None) -> dict[str, str]:
    threads = threads or min(8, os.cpu_count() or 1)
    big = {k: v for k, v in views.items() if len(v) >= 1 << 20}
    out = {k: hashlib.sha256(v).hexdigest() for k, v in views.items() if k not in big}
    if big:
        with ThreadPoolExecutor(threads) as pool:
            for k, d in zip(big, pool.map(lambda v: hashlib.sha256(v).hexdigest(), big.values())):
                out[k] = d
    return out


def identity_metadata(tensors: dict, save_id: str) -> dict[str, str]:
    """The ``__metadata__`` entries an hfcompress save adds to a shard."""
    return {SAVE_ID_KEY: save_id, DIGESTS_KEY: json.dumps(tensor_digests(tensors), sort_keys=True)}


# -- verification -----------------------------------------------------------------------------
@dataclass
class VerifyReport:
    path: str
    save_id: str | None = None
    files: int = 0
    tensors: int = 0
    bytes_hashed: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def config_save_id(directory: str) -> str | None:
    """``quantization_config.save_id`` of ``directory/config.json`` (``None`` when absent)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return q.get("save_id") if isinstance(q, dict) else None


def check_identity(path: str, metadata: dict, save_id: str | None) -> None:
    """Raise when the shard at ``path`` was written by another save than config.json's."""
    shard_id = metadata.get(SAVE_ID_KEY)
    if save_id is None and shard_id is None:
        return  # a checkpoint from before save identities (or not from hfcompress): nothing to compare
    if save_id is None or shard_id is None:  # one side edited or written by another tool: nothing proves a mix
        import warnings

        warnings.warn(f"{path}: {'the shard' if shard_id is None else 'config.json'} records no save identity "
                      f"while {'config.json' if shard_id is None else 'the shard'} does; a file was written or edited "
                      "by another tool, so hfcompress cannot tell whether shards of two saves are mixed "
                      "(`hfcompress verify` checks the digests that were recorded)", stacklevel=3)
        return
    if shard_id != save_id:
        raise CheckpointError(
            f"{path} belongs to another save (save_id {shard_id}) than config.json ({save_id}); the checkpoint was "
            "being written while it was read, or files of two saves were mixed. Load it again once the save has "
            "finished, or save the model again.")


def verify_file(path: str, save_id: str | None = None, check_save_id: bool = True,
                threads: int | None = None) -> tuple[int, int, list[str]]:
    """Re-hash every tensor of one safetensors file against its recorded digests:
    ``(tensors, bytes hashed, problems)``."""
    try:
        header, metadata, start = read_header(path)
    except CheckpointError as e:
        return 0, 0, [str(e)]
    shard_id = metadata.get(SAVE_ID_KEY)
    if check_save_id and shard_id != save_id:  # verify is strict: one side without an identity is a problem too
        return len(header), 0, [f"{path} belongs to another save (save_id {shard_id}) than config.json ({save_id}); "
                                "files of two saves are mixed, or one was written or edited by another tool"]
    recorded = metadata.get(DIGESTS_KEY)
    if recorded is None:
        return len(header), 0, [f"{path}: no digests recorded ({DIGESTS_KEY} missing from its metadata); it was not "
                                "written by an hfcompress save and cannot be verified"]
    try:
        recorded = json.loads(recorded)
    except json.JSONDecodeError:
        return len(header), 0, [f"{path}: the recorded digests ({DIGESTS_KEY}) are not valid JSON"]
    problems = [f"{path}: tensor {name!r} has no recorded digest" for name in header if name not in recorded]
    problems += [f"{path}: tensor {name!r} is recorded in the digests but missing from the file"
                 for name in recorded if name not in header]
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            view = memoryview(mm) if mm is not None else memoryview(b"")
            views = {name: view[start + m["data_offsets"][0]:start + m["data_offsets"][1]]
                     for name, m in header.items() if name in recorded}
            digests = _hash_all(views, threads)
            hashed = sum(len(v) for v in views.values())
            for v in views.values():
                v.release()
            view.release()
        finally:
            if mm is not None:
                mm.close()
    problems += [f"{path}: tensor {name!r} does not match its recorded digest (the stored bytes changed after the "
                 "save: a damaged or edited file)" for name, d in digests.items() if d != recorded[name]]
    return len(header), hashed, problems


def checkpoint_files(directory: str) -> tuple[list[str], list[str]]:
    """``(safetensors files, problems)`` of a checkpoint directory: the shards its index names
    (each must exist), else every ``*.safetensors`` file."""
    problems: list[str] = []
    indexes = sorted(fn for fn in os.listdir(directory) if fn.endswith(".safetensors.index.json"))
    files: list[str] = []
    for fn in indexes:
        ipath = os.path.join(directory, fn)
        try:
            with open(ipath, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{ipath}: not a readable shard index ({type(e).__name__}: {e})")
            continue
        for shard in sorted(set(weight_map.values())):
            p = os.path.join(directory, shard)
            if not os.path.isfile(p):
                problems.append(f"{ipath} names shard {shard}, which is missing")
            elif p not in files:
                files.append(p)
    if not indexes:
        files = sorted(os.path.join(directory, fn) for fn in os.listdir(directory) if fn.endswith(".safetensors"))
    return files, problems


def verify(directory: str, threads: int | None = None) -> VerifyReport:
    """Check a saved checkpoint (or adapter) directory: headers readable, every shard from the save
    config.json records, every tensor's bytes equal to its recorded SHA-256."""
    directory = os.fspath(directory)
    report = VerifyReport(directory)
    if not os.path.isdir(directory):
        report.problems.append(f"{directory} is not a directory")
        return report
    try:
        report.save_id = config_save_id(directory)
    except CheckpointError as e:
        report.problems.append(str(e))
    files, problems = checkpoint_files(directory)
    report.problems += problems
    if not files:
        report.problems.append(f"{directory} has no .safetensors files")
    has_config = os.path.isfile(os.path.join(directory, "config.json"))
    for path in files:
        n, hashed, problems = verify_file(path, report.save_id, check_save_id=has_config, threads=threads)
        report.files += 1
        report.tensors += n
        report.bytes_hashed += hashed
        report.problems += problems
    return report
