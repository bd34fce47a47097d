"""The process group as calibration sees it: who am I, how to share statistics and results, how
to fail together.

``current()`` is the context of an initialised ``torch.distributed`` process group with more
than one rank (``None`` otherwise, or when ``HFCOMPRESS_DISTRIBUTED=0``): calibration then runs
data parallel on its own. ``init_from_env()`` starts the group from the variables ``torchrun`` and
``accelerate launch`` set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``).

Every collective here is called by every rank in the same order (the plan is computed the same
everywhere). Local failures are caught and turned into a status that :meth:`DistContext.check`
exchanges at fixed points, so an error on one rank ends the job on every rank with its message;
a rank that dies is seen by its peers as a failed collective (gloo/NCCL report the lost peer),
and a rank that hangs by the process group's timeout (``HFCOMPRESS_DIST_TIMEOUT`` seconds).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch

#: "0" turns data-parallel calibration off even inside an initialised process group
ENV_SWITCH = "HFCOMPRESS_DISTRIBUTED"
#: seconds a collective may wait for the other ranks before the job fails (default 1800)
ENV_TIMEOUT = "HFCOMPRESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RuntimeError):
    """Another rank failed: the message names the rank, the step and that rank's error."""


def _dist():
    import torch.distributed as dist

    return dist


def timeout() -> timedelta:
    """The collective timeout: ``HFCOMPRESS_DIST_TIMEOUT`` seconds, default 1800."""
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be > 0 seconds")
    return timedelta(seconds=seconds)


@dataclass
class DistContext:
    """Rank, world size and where collective buffers live (``cpu`` for gloo, the rank's GPU for NCCL).
    ``sent`` counts the bytes each kind of collective moved (the payload, as seen by one rank)."""

    rank: int
    world: int
    device: torch.device
    sent: dict[str, int] = field(default_factory=dict)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes checkpoints; the others never write."""
        return self.rank == 0

    # ---- collectives -------------------------------------------------------------------------

    def _c(self, fn, *args, **kwargs):
        """One collective; a failure (a peer that died, or a timeout) becomes a DistributedError."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise DistributedError(f"rank {self.rank} of {self.world}: a collective failed: another rank died, "
                                   f"failed outside the calibration or did not answer within {ENV_TIMEOUT}="
                                   f"{timeout().total_seconds():g} s ({first})") from e

    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + t.numel() * t.element_size()

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` where the backend can use it (gloo: CPU; NCCL: this rank's GPU)."""
        return t if t.device == self.device else t.to(self.device)

    def reduce_(self, t: torch.Tensor, owners: list[int], kind: str = "reduce") -> None:
        """Sum ``t`` over the ranks into ``owners`` (in place there; others' copies are garbage after):
        one owner: ``reduce``; several: ``all_reduce``."""
        dist = _dist()
        buf = self._staged(t)
        if len(owners) == 1:
            self._c(dist.reduce, buf, dst=owners[0])
        else:
            self._c(dist.all_reduce, buf)
        self._count(kind, buf)
        if buf is not t and self.rank in owners:
            t.copy_(buf)

    def gather_columns(self, part: torch.Tensor, widths: list[int], kind: str = "gather") -> torch.Tensor:
        """Every rank's ``part [R, widths[rank]]`` side by side (``[R, sum(widths)]``) on every rank."""
        dist = _dist()
        width = max(widths)
        buf = torch.zeros(part.shape[0], width, dtype=part.dtype, device=self.device)
        buf[:, :part.shape[1]] = part
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._c(dist.all_gather, bufs, buf)
        self._count(kind, buf)
        return torch.cat([b[:, :w] for b, w in zip(bufs, widths)], dim=1).to(part.device)

    def all_sum(self, values: list[int]) -> list[int]:
        """Element-wise sum of small integer lists over the ranks."""
        dist = _dist()
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        self._c(dist.all_reduce, t)
        return [int(v) for v in t.tolist()]

    def broadcast_bytes(self, data: bytes | None, src: int, kind: str = "broadcast") -> bytes:
        """``data`` of rank ``src`` on every rank (length first, then the bytes)."""
        dist = _dist()
        n = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64, device=self.device)
        self._c(dist.broadcast, n, src=src)
        size = int(n.item())
        if size == 0:
            return b""
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self.device)
        self._c(dist.broadcast, buf, src=src)
        self._count(kind, buf)
        return data if self.rank == src else buf.cpu().numpy().tobytes()

    def exchange(self, mine: dict[str, dict], kind: str = "results") -> dict[str, dict]:
        """Every rank's ``{key: {"meta": jsonable, "tensors": {name: Tensor}}}`` on every rank.

        Sent as a JSON header (keys, metas, tensor dtypes and shapes) plus the tensors' bytes, one
        buffer per rank, in two ``all_gather`` calls (the sizes, then the buffers): no pickle.
        Received tensors are on the CPU; a rank's own items are returned as they are."""
        dist = _dist()
        header, chunks = _encode(mine)
        parts = [torch.frombuffer(bytearray(header), dtype=torch.uint8), *chunks]
        size = sum(p.numel() for p in parts)
        sizes = torch.tensor([len(header), size - len(header)], dtype=torch.int64, device=self.device)
        every = [torch.empty_like(sizes) for _ in range(self.world)]
        self._c(dist.all_gather, every, sizes)
        every = [tuple(int(v) for v in t.tolist()) for t in every]
        width = max(h + p for h, p in every)
        buf = torch.empty(width, dtype=torch.uint8, device=self.device)
        if self.device.type == "cpu":  # header and tensors copied once, straight into what is sent
            torch.cat(parts, out=buf[:size])
        else:
            buf[:size] = torch.cat(parts).to(self.device)
        buf[size:].zero_()
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        self._c(dist.all_gather, bufs, buf)
        self._count(kind, torch.empty(width * self.world, dtype=torch.uint8, device="meta"))
        out: dict[str, dict] = {}
        for src, ((h, p), got) in enumerate(zip(every, bufs)):
            if src == self.rank:
                out.update(mine)
                continue
            got = got.cpu()
            out.update(_decode(json.loads(got[:h].numpy().tobytes().decode()), got[h:h + p]))
        return out

    def same_everywhere(self, value: str, what: str) -> None:
        """Every rank must pass the same ``value`` (e.g. a description of its model, config and
        calibration data); a rank that differs from rank 0 ends the job on every rank."""
        ref = self.broadcast_bytes(value.encode() if self.rank == 0 else None, 0, "checks").decode()
        err = None if ref == value else ValueError(
            f"rank {self.rank} has another {what} than rank 0 (every rank must load the same model, config and "
            f"calibration data): {value[:200]} vs rank 0's {ref[:200]}")
        self.check(err, f"comparing the {what} of the ranks")

    def barrier(self) -> None:
        self._c(_dist().barrier)

    # ---- failing together --------------------------------------------------------------------

    def check(self, error: BaseException | None, where: str) -> None:
        """Called by every rank at the same point with its local error (or None): if any rank
        failed, every rank raises — the failed rank its own error, the others a
        :class:`DistributedError` naming the first failed rank and its message."""
        flags = [0] * self.world
        flags[self.rank] = 1 if error is not None else 0
        failed = [r for r, f in enumerate(self.all_sum(flags)) if f]
        if not failed:
            return
        src = failed[0]
        text = f"{type(error).__name__}: {error}" if error is not None else ""
        msg = self.broadcast_bytes(text.encode() if self.rank == src else None, src, "errors").decode()
        if error is None:
            error = DistributedError(f"{where}: rank {src} of {self.world} failed: {msg}")
        error._hfcompress_agreed = True  # every rank knows: a later finish() need not ask again
        raise error

    def finish(self, error: BaseException | None, where: str) -> None:
        """The last :meth:`check` of a job; if the exchange itself fails (a peer is gone), the local
        error (if any) is raised with the collective's failure attached."""
        if error is not None and getattr(error, "_hfcompress_agreed", False):
            raise error
        try:
            self.check(error, where)
        except Exception as e:  # noqa: BLE001 - the peer's failure, or this rank's own error re-raised
            if error is not None and e is not error:
                raise error from e
            raise


def agree(dist: DistContext | None, job, where: str, run_here: bool = True) -> None:
    """Run ``job()`` here (if ``run_here``: e.g. rank 0's write), then agree with the other ranks:
    an error on any rank ends every rank with it (rank 0's atomic write has removed its temporary
    folder by then: nothing half-written remains). Without a process group: just ``job()``."""
    if dist is None:
        job()
        return
    err = None
    try:
        if run_here:
            job()
    except Exception as e:  # noqa: BLE001 - handed to dist.finish, which raises on every rank
        err = e
    dist.finish(err, where)


def _encode(items: dict[str, dict]) -> tuple[bytes, list[torch.Tensor]]:
    """The JSON header of ``items`` and their tensors' bytes (flat uint8, in the header's order)."""
    header: dict[str, dict] = {}
    chunks: list[torch.Tensor] = []
    for key, item in items.items():
        tensors = []
        for name, t in item["tensors"].items():
            flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
            tensors.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), flat.numel()))
            chunks.append(flat)
        header[key] = {"meta": item.get("meta"), "tensors": tensors}
    return json.dumps(header).encode(), chunks


def _decode(header: dict[str, dict], payload: torch.Tensor) -> dict[str, dict]:
    out: dict[str, dict] = {}
    at = 0
    for key, item in header.items():
        tensors = {}
        for name, dtype, shape, nbytes in item["tensors"]:
            raw = payload[at:at + nbytes].clone()
            at += nbytes
            tensors[name] = raw.view(getattr(torch, dtype)).reshape(shape)
        out[key] = {"meta": item["meta"], "tensors": tensors}
    return out


def current() -> DistContext | None:
    """The calibration context of the initialised process group, or None (no group, one rank,
    or ``HFCOMPRESS_DISTRIBUTED=0``)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    key = (dist.get_rank(), world, str(device))
    if key not in _CONTEXTS:  # one per process group shape: its byte counters add up over the jobs of a process
        _CONTEXTS.clear()
        _CONTEXTS[key] = DistContext(rank=dist.get_rank(), world=world, device=device)
    return _CONTEXTS[key]


_CONTEXTS: dict[tuple, DistContext] = {}


def launched() -> bool:
    """True when this process was started by a launcher for more than one rank (``torchrun``,
    ``accelerate launch``: ``WORLD_SIZE`` > 1 in the environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def init_from_env(device: str | None = None) -> bool:
    """Start the process group a launcher described (``torchrun``, ``accelerate launch``), if any
    and not already started: NCCL when ``device`` is CUDA, gloo otherwise, with the timeout of
    :func:`timeout`. Returns True when this call started it (the caller then ends it with
    :func:`shutdown`)."""
    dist = _dist()
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the job "
                           "with torchrun or accelerate launch (they set them)")
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout())
    return True


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | None) -> str | None:
    """A CUDA ``device`` without an index becomes this rank's GPU (``cuda:LOCAL_RANK``) in a launched job."""
    if device is not None and str(device) == "cuda" and launched():
        return f"cuda:{local_rank()}"
    return device


def shutdown(started: bool) -> None:
    """End the process group if :func:`init_from_env` started it."""
    dist = _dist()
    if started and dist.is_initialized():
        dist.destroy_process_group()


def shard_batches(batches: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    """This rank's share of the calibration batches: whole batches, in contiguous runs of
    near-equal count (rank ``r`` gets the ``r``-th run). Every rank then sums ``X^T X`` over the very
    batches a single process uses, and the float64 sums (:class:`~hfcompress.calibration.InputStats`)
    reduce to the single process's sum: the same checkpoint. With fewer batches than ranks, the
    rows (windows) of equal-length batches are split instead (each rank one batch of its rows):
    that batching differs from a single process's, so its statistics differ by fp32 rounding."""
    if not batches:
        raise ValueError("distributed calibration: no calibration batches")
    if len(batches) >= world:
        idx = torch.arange(len(batches)).tensor_split(world)[rank].tolist()
        return [batches[i] for i in idx]
    if len({b.shape[1] for b in batches}) != 1:
        raise ValueError(f"distributed calibration: {len(batches)} calibration batches of unequal lengths for "
                         f"{world} ranks; every rank needs at least one")
    rows = torch.cat(list(batches))  # [n, s]
    parts = torch.arange(rows.shape[0]).tensor_split(world)
    if min(len(p) for p in parts) == 0:
        raise ValueError(f"distributed calibration: {rows.shape[0]} calibration samples for {world} ranks; "
                         "every rank needs at least one (raise n_samples or use fewer processes)")
    return [rows[parts[rank]]]
