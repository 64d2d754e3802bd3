"""The files of a sharded checkpoint (``torch.distributed.checkpoint``), read without trusting them.

A sharded checkpoint keeps its tensors in ``shards/``: one ``__{rank}_0.distcp`` file per rank
and DCP's ``.metadata`` (which tensor, which slice, in which file at which offset). Both are
listed in the checkpoint's manifest like every other file. DCP reads ``.metadata`` with
``pickle`` and non-tensor items with ``torch.load(weights_only=False)``: either would run code
from a hostile checkpoint. :class:`ShardReader` therefore unpickles the metadata with a fixed
allow-list of DCP's own record types, refuses any non-tensor item, and checks that every slice
lies inside a file the manifest lists; tensors themselves are read by DCP with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from sanakit.errors import CheckpointError
from sanakit.io.manifest import ListedFiles

SHARD_DIR = "shards"
SHARD_METADATA = f"{SHARD_DIR}/.metadata"
MAX_METADATA_BYTES = 256 << 20  # a few hundred bytes per tensor slice

# the only globals a DCP .metadata pickle names (torch 2.x): its record types, torch.Size,
# dtypes and layouts, the memory-format enum and the path it was saved to
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", cls.__name__)
    for cls in (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )
} | {
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")


def bad_shards(files: ListedFiles, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {files.directory} has unusable shards ({what}); "
        "use a checkpoint sanakit wrote for this config"
    )


def read_shard_metadata(files: ListedFiles) -> Metadata:
    """The checkpoint's DCP metadata, unpickled with the allow-list and checked against the
    manifest: tensors only, every slice inside a listed shard file."""
    path = files.path(SHARD_METADATA)
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise bad_shards(files, f"{SHARD_METADATA} is larger than {MAX_METADATA_BYTES} bytes")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # noqa: BLE001 - a hostile pickle raises anything
        raise bad_shards(files, f"{SHARD_METADATA}: {type(err).__name__}: {err}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise bad_shards(files, f"{SHARD_METADATA} is not DCP metadata")
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, TensorStorageMetadata):
            raise bad_shards(files, f"{key!r} is not a tensor")
    if not isinstance(metadata.storage_data, dict):
        raise bad_shards(files, "no storage table")
    for info in metadata.storage_data.values():
        _check_slice(files, info)
    return metadata


def _check_slice(files: ListedFiles, info: Any) -> None:
    if not isinstance(info, _StorageInfo) or info.transform_descriptors:
        raise bad_shards(files, "a storage entry DCP did not write")
    rel = f"{SHARD_DIR}/{info.relative_path}"
    if not isinstance(info.relative_path, str) or "/" in info.relative_path or not files.has(rel):
        raise bad_shards(files, f"a slice in {info.relative_path!r}, not a listed shard file")
    offset, length = info.offset, info.length
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (offset, length)):
        raise bad_shards(files, f"a slice of {rel} without an integer offset and length")
    if offset < 0 or length < 0 or offset + length > files.path(rel).stat().st_size:
        raise bad_shards(files, f"a slice beyond the end of {rel}")


class ShardReader(FileSystemReader):
    """DCP's file reader with :func:`read_shard_metadata` in place of its plain ``pickle.load``."""

    def __init__(self, files: ListedFiles) -> None:
        super().__init__(files.directory / SHARD_DIR)
        self.files = files

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_shard_metadata(self.files)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(files: ListedFiles) -> bool:
    """Whether the checkpoint keeps its weights in DCP shards (``train.checkpoint_format``)."""
    return files.has(SHARD_METADATA)


def missing_shard_files(shard_dir: Path) -> list[str]:
    """Shard files DCP's metadata names that this process cannot see (a node-local
    ``checkpoints/`` on a multi-node run): checked by rank 0 before it seals the checkpoint."""
    raw = (shard_dir / ".metadata").read_bytes()
    metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    needed = {info.relative_path for info in metadata.storage_data.values()}
    return sorted(name for name in needed if not (shard_dir / name).is_file())


def require_full_layout(files: ListedFiles) -> None:
    """``sample``/``export``/``eval`` read full weights: a sharded checkpoint is refused with the
    command that converts it."""
    if is_sharded_checkpoint(files):
        raise CheckpointError(
            f"checkpoint {files.directory} is sharded (train.checkpoint_format=sharded); run "
            f"`sanakit checkpoint consolidate {files.directory}` and use the checkpoint it writes"
        )


def load_into(tensors: dict[str, Any], files: ListedFiles) -> None:
    """DCP's load of ``tensors`` in place from the checkpoint's shards (a collective when a
    process group is up; otherwise this one process reads every slice it needs)."""
    with warnings.catch_warnings():
        # one process (consolidate, a 1-process resume) is what we mean, not a forgotten init
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=ShardReader(files))
