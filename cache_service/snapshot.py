"""Cache snapshots on disk or the wire: a msgpack header, then raw tensor bytes. Never pickle.

    file = MAGIC | header length (u32, little endian) | msgpack header | tensor bytes
    header = {"version": 1, "meta": {...}, "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}]}

Tensors travel by dtype name, shape and bytes (``tensor.view(torch.uint8)``), so bfloat16 works and
loading a file runs no code. ``KVSnapshot`` is what a cache snapshot holds: every block's K/V, its
reserved capacity and the token ids written into it, plus free-form metadata (model, mode, ...).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import torch

from cache_service.errors import HogwildError
from cache_service.kv_store import KVStore

MAGIC = b"HWKVSNAP"
VERSION = 1
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8)}


class SnapshotError(HogwildError):
    """A snapshot that cannot be read or does not fit the cache it is restored into."""


# ---- generic codec ---------------------------------------------------------------------------
def encode(tensors: dict[str, torch.Tensor], meta: dict) -> bytes:
    """Serialise named tensors and a msgpack-able ``meta`` dict."""
    entries, chunks, offset = [], [], 0
    for name, tensor in tensors.items():
        raw = _tensor_bytes(tensor)
        entries.append({"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape),
                        "offset": offset, "nbytes": len(raw)})
        chunks.append(raw)
        offset += len(raw)
    header = msgpack.packb({"version": VERSION, "meta": meta, "tensors": entries})
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *chunks])


def decode(blob: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of ``encode``; raises ``SnapshotError`` on anything malformed."""
    header, body = _split(memoryview(blob))
    try:
        return {entry["name"]: _tensor(body, entry) for entry in header["tensors"]}, header["meta"]
    except (KeyError, TypeError, ValueError) as err:
        raise SnapshotError(f"the snapshot header is malformed ({err!r}); the file is damaged") from None


def write_file(path: str | Path, blob: bytes) -> Path:
    """Write ``blob`` atomically (a reader never sees half a snapshot)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(blob)
        tmp.replace(path)
    except OSError as err:
        raise SnapshotError(f"cannot write the snapshot {path}: {err.strerror}; check the directory") from None
    return path


def read_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SnapshotError(f"cannot read the snapshot {path}: {err.strerror}; check the path") from None


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise SnapshotError(f"cannot snapshot tensors of dtype {name}; use one of {', '.join(DTYPES)}")
    return name


def _split(blob: memoryview) -> tuple[dict, memoryview]:
    start = len(MAGIC) + 4
    if len(blob) < start or bytes(blob[: len(MAGIC)]) != MAGIC:
        raise SnapshotError("not a hogwild snapshot (bad magic bytes); give a file written by save()")
    (size,) = struct.unpack("<I", blob[len(MAGIC) : start])
    try:
        header = msgpack.unpackb(blob[start : start + size], raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as err:
        raise SnapshotError(f"the snapshot header is corrupt ({err}); the file is damaged") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != VERSION:
        raise SnapshotError(f"unsupported snapshot version {version}; this build reads version {VERSION}")
    return header, blob[start + size :]


def _tensor(body: memoryview, entry: dict) -> torch.Tensor:
    dtype = DTYPES.get(entry["dtype"])
    if dtype is None:
        raise SnapshotError(f"tensor {entry['name']!r} has unknown dtype {entry['dtype']!r}")
    shape, begin, nbytes = tuple(entry["shape"]), entry["offset"], entry["nbytes"]
    expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes != expected or begin + nbytes > len(body):
        raise SnapshotError(f"tensor {entry['name']!r} is truncated or mis-sized; the file is damaged")
    if not nbytes:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(body[begin : begin + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


# ---- the cache snapshot ----------------------------------------------------------------------
@dataclass
class BlockState:
    """One block: K/V ``[layers, 2, kv_heads, length, head_dim]``, reserved tokens, token ids."""

    entries: torch.Tensor
    capacity: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class KVSnapshot:
    """Every block of a cache (ids kept) and metadata; ``next_block`` = the store's next fresh id."""

    blocks: dict[int, BlockState]
    next_block: int
    meta: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {f"block/{b}": s.entries for b, s in self.blocks.items()}
        blocks = {str(b): {"capacity": s.capacity, "tokens": list(s.tokens)} for b, s in self.blocks.items()}
        return encode(tensors, {"kind": "kv", "next_block": self.next_block, "blocks": blocks,
                                "meta": self.meta})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "KVSnapshot":
        tensors, meta = decode(blob)
        if meta.get("kind") != "kv":
            raise SnapshotError("the snapshot holds no KV cache; give one written by a session's save()")
        blocks = {int(b): BlockState(tensors[f"block/{b}"], info["capacity"], info["tokens"])
                  for b, info in meta["blocks"].items()}
        return cls(blocks, meta["next_block"], meta["meta"])

    def save(self, path: str | Path) -> Path:
        return write_file(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> "KVSnapshot":
        return cls.from_bytes(read_file(path))


def capture(store: KVStore, blocks: list[int] | None = None) -> dict[int, BlockState]:
    """Copies of ``blocks`` (default: all) of a store, on the CPU."""
    chosen = sorted(store.blocks) if blocks is None else blocks
    return {b: BlockState(store.read(b).to("cpu"), store.block(b).reserved) for b in chosen}


def restore(store: KVStore, snapshot: KVSnapshot) -> None:
    """Fill an EMPTY store with a snapshot's blocks under the same ids (``PoolExhaustedError``, with
    the store left empty, when its pool cannot hold them)."""
    if store.blocks:
        raise SnapshotError("restore needs an empty cache; restore into a freshly built engine")
    layers, _, kv_heads, head_dim = store.shape
    need = sum(store.pages_for(max(s.entries.shape[3], s.capacity)) for s in snapshot.blocks.values())
    store.check_free(need)
    for block in range(snapshot.next_block):
        state = snapshot.blocks.get(block)
        made = store.new_block(state.capacity if state else 0)
        if made != block:
            raise SnapshotError(f"the cache gave block id {made}, not {block}; restore into a freshly built engine")
        if state is None:
            store.free(made)
            continue
        shape = tuple(state.entries.shape)
        if shape[:3] != (layers, 2, kv_heads) or shape[4] != head_dim or state.entries.dtype != store.pool.dtype:
            raise SnapshotError(
                f"block {block} is {shape} {state.entries.dtype}, the cache holds "
                f"[{layers}, 2, {kv_heads}, n, {head_dim}] {store.pool.dtype}; restore with the same model and dtype"
            )
        if state.entries.shape[3]:  # an empty block (e.g. a step block just committed) has nothing to write
            store.append(made, state.entries.to(store.pool.device))
