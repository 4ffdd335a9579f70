"""Reading checkpoint files: containers, lazy tensors, prefixes, quantization markers.

This module knows about *files*, not about models. Each model's key conversion and
construction lives in ``wan/loaders/<model>.py`` and reads tensors through
:func:`open_checkpoint`, which returns a lazy :class:`TensorSource` so that a 16 GB file
never needs twice its size in RAM: tensors are read one at a time, when asked for.

Container detection follows ../shared/formats/README.md ("Auto-detection from keys"):
GGUF magic, zip/pickle (torch ``.pth``, always ``weights_only=True``), else safetensors;
a folder with ``*.safetensors.index.json`` is a sharded checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch

# safetensors dtype names (also used for .pth tensors, so messages read the same).
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def checkpoint_error(path: str, found: str, expected: str, hint: str = "") -> CheckpointError:
    msg = f"{os.path.basename(str(path).rstrip('/')) or path}: found {found}; expected {expected}."
    if hint:
        msg += f" {hint}"
    msg += f" (file: {path})"
    return CheckpointError(msg)


class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only, lazy ``{key: tensor}`` view of one checkpoint.

    ``shape(key)`` and ``dtype(key)`` never read tensor data. ``source[key]`` reads one
    tensor (on the CPU). ``metadata`` holds the safetensors ``__metadata__`` block, if any.
    """

    def __init__(
        self,
        path: str,
        shapes: Dict[str, torch.Size],
        dtypes: Dict[str, torch.dtype],
        read: Callable[[str], torch.Tensor],
        metadata: Optional[Dict[str, str]] = None,
        container: str = "safetensors",
    ):
        self.path = path
        self._shapes = shapes
        self._dtypes = dtypes
        self._read = read
        self.metadata = metadata or {}
        self.container = container

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        return self._read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> torch.Size:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def renamed(self, rename: Callable[[str], Optional[str]]) -> "TensorSource":
        """A view whose keys are ``rename(old)``; keys renamed to None are dropped."""
        mapping: Dict[str, str] = {}
        for old in self._shapes:
            new = rename(old)
            if new is None:
                continue
            if new in mapping:
                raise checkpoint_error(
                    self.path, f"two tensors that both map to '{new}' ('{mapping[new]}' and '{old}')",
                    "one tensor per name")
            mapping[new] = old
        return TensorSource(
            self.path,
            {n: self._shapes[o] for n, o in mapping.items()},
            {n: self._dtypes[o] for n, o in mapping.items()},
            lambda k: self._read(mapping[k]),
            self.metadata,
            self.container,
        )

    def without_prefix(self, prefixes: Sequence[str]) -> "TensorSource":
        """Strip the first of ``prefixes`` that every model key carries (e.g. ``model.diffusion_model.``).

        Keys that do not carry it (stray markers like ``scaled_fp8``) are kept as they are.
        """
        for prefix in prefixes:
            carrying = sum(1 for k in self._shapes if k.startswith(prefix))
            if carrying and carrying >= 0.5 * len(self._shapes):
                return self.renamed(lambda k, p=prefix: k[len(p):] if k.startswith(p) else k)
        return self

    def dtype_histogram(self) -> Dict[str, int]:
        hist: Dict[str, int] = {}
        for d in self._dtypes.values():
            name = DTYPE_NAMES.get(d, str(d))
            hist[name] = hist.get(name, 0) + 1
        return hist

    def has_fp8(self) -> bool:
        return any(d in FP8_DTYPES for d in self._dtypes.values())


# --------------------------------------------------------------------------- containers

def _sniff(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return "safetensors"


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    size = os.path.getsize(path)
    if size < 8:
        raise checkpoint_error(path, f"a file of {size} bytes", "a safetensors, .pth or .pt checkpoint",
                               "The file is empty or truncated; download it again.")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n <= 1 or 8 + n > size:
            raise checkpoint_error(path, "no readable safetensors header",
                                   "a safetensors, .pth or .pt checkpoint",
                                   "The file is truncated or not a model file.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise checkpoint_error(path, f"a corrupt safetensors header ({e})",
                                   "a valid safetensors file") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end > size:
        raise checkpoint_error(
            path, f"{size:,} bytes", f"{8 + n + data_end:,} bytes as its header describes",
            "The file is truncated (an interrupted download?); download it again.")
    return header, n


def _open_safetensors(path: str) -> TensorSource:
    from safetensors import safe_open

    header, _ = _read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    shapes, dtypes = {}, {}
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise checkpoint_error(path, f"tensor '{key}' of dtype {info['dtype']}",
                                   f"one of {sorted(SAFETENSORS_DTYPES)}")
        shapes[key] = torch.Size(info["shape"])
        dtypes[key] = SAFETENSORS_DTYPES[info["dtype"]]
    handle = {}

    def read(key: str) -> torch.Tensor:
        if "f" not in handle:
            handle["f"] = safe_open(path, framework="pt", device="cpu")
        return handle["f"].get_tensor(key)

    return TensorSource(path, shapes, dtypes, read, metadata, "safetensors")


def _unwrap_pickled_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    # Some trainers save {"state_dict": {...}} or {"model": {...}} / {"module": {...}}.
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = [obj[k] for k in ("state_dict", "model", "module", "params") if k in obj]
            if inner:
                obj = inner[0]
                continue
        break
    raise checkpoint_error(path, f"a pickled {type(obj).__name__}", "a state dict of tensors")


def _open_pickle(path: str) -> TensorSource:
    try:
        # weights_only=True: never run pickled code. mmap keeps the data on disk until read.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals ...
        raise checkpoint_error(
            path, f"a file torch cannot read safely ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "a torch state dict (.pth/.pt) of plain tensors",
            "The file may be truncated, or contain pickled code, which is never executed.") from None
    sd = _unwrap_pickled_state_dict(obj, path)
    return TensorSource(path, {k: v.shape for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()},
                        sd.__getitem__, {}, "pickle")


def _open_sharded(folder: str, index_file: str) -> TensorSource:
    index_path = os.path.join(folder, index_file)
    try:
        with open(index_path) as f:
            weight_map: Dict[str, str] = json.load(f)["weight_map"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise checkpoint_error(index_path, f"an unreadable shard index ({e})",
                               '{"weight_map": {key: shard file}}') from None
    shards: Dict[str, TensorSource] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise checkpoint_error(folder, f"no shard '{shard}'", "every shard named by " + index_file,
                                   "The download is incomplete.")
        shards[shard] = open_checkpoint(shard_path)
    shapes, dtypes = {}, {}
    for key, shard in weight_map.items():
        src = shards[shard]
        if key not in src:
            raise checkpoint_error(os.path.join(folder, shard), f"no tensor '{key}'",
                                   f"the tensors {index_file} assigns to it", "The shard is damaged.")
        shapes[key], dtypes[key] = src.shape(key), src.dtype(key)
    return TensorSource(folder, shapes, dtypes, lambda k: shards[weight_map[k]][k], {}, "sharded")


def _open_folder(folder: str, subfolders: Sequence[str]) -> TensorSource:
    # A diffusers pipeline root: descend into the component's subfolder.
    for sub in subfolders:
        if os.path.isdir(os.path.join(folder, sub)):
            return _open_folder(os.path.join(folder, sub), ())
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if indexes:
        return _open_sharded(folder, indexes[0])
    weights = [n for n in names if n.endswith((".safetensors", ".pth", ".pt", ".bin"))]
    if len(weights) == 1:
        return open_checkpoint(os.path.join(folder, weights[0]))
    found = f"{len(weights)} weight files" if weights else "no weight files"
    raise checkpoint_error(folder, found,
                           "one weight file, or shards with a *.safetensors.index.json"
                           + (f", or a subfolder {' / '.join(subfolders)}" if subfolders else ""))


def open_checkpoint(path: str, subfolders: Sequence[str] = ()) -> TensorSource:
    """Open a checkpoint file or folder lazily. ``subfolders``: component folders to look
    for inside a diffusers pipeline root (e.g. ``("transformer",)``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or folder.")
    if os.path.isdir(path):
        return _open_folder(path, subfolders)
    kind = _sniff(path)
    if kind == "gguf":
        raise checkpoint_error(path, "a GGUF file", "safetensors, .pth/.pt or a diffusers folder",
                               "GGUF quantized files are not supported yet; use an fp8 or 16-bit safetensors file.")
    if kind == "pickle":
        return _open_pickle(path)
    return _open_safetensors(path)


def read_json_beside(path: str, name: str) -> Optional[dict]:
    """``config.json`` (or another JSON) in a checkpoint folder, or beside a file."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, name)
    if os.path.isfile(candidate):
        with open(candidate) as f:
            return json.load(f)
    return None


def block_indices(keys: Iterable[str], prefix: str) -> List[int]:
    """Sorted distinct N of keys ``{prefix}N.…`` (e.g. ``blocks.`` → [0, 1, …])."""
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def check_contiguous_blocks(path: str, keys: Iterable[str], prefix: str) -> int:
    """Number of blocks; raises when a block index is missing in between."""
    idx = block_indices(keys, prefix)
    if not idx:
        return 0
    missing = sorted(set(range(idx[-1] + 1)) - set(idx))
    if missing:
        raise checkpoint_error(path, f"no tensors for {prefix}{missing[0]} (blocks present: 0..{idx[-1]} "
                               f"with {len(missing)} missing)", "every block from 0 to the last",
                               "The file is incomplete or damaged.")
    return idx[-1] + 1
