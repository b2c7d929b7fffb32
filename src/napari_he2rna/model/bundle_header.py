"""Reading a model bundle file's header, and telling a PyTorch checkpoint from a bundle (never unpickled)."""

from __future__ import annotations

import json
import struct

from ..errors import ModelError

#: How PyTorch checkpoints start: a zip archive (torch.save since 1.6) or a raw pickle (protocol 2+).
CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")


def looks_like_checkpoint(data: bytes) -> bool:
    """A zip archive, or a pickle of protocol 2-5 (``\x80`` then the protocol byte), where no valid
    safetensors header is (a safetensors length can start with ``\x80`` too: this is asked only after)."""
    zip_or_pickle = data.startswith(CHECKPOINT_MAGIC[0]) or data.startswith(CHECKPOINT_MAGIC[1])
    return zip_or_pickle and (data[0] != 0x80 or (len(data) > 1 and 2 <= data[1] <= 5))


def not_a_bundle(data: bytes, name: str, why: str) -> ModelError:
    """The error for a file that is not a bundle: the checkpoint sentence when it is one, else ``why``."""
    if looks_like_checkpoint(data):
        return ModelError(
            f"{name} is a PyTorch checkpoint (a pickle), not a model bundle; convert it with "
            "`he2rna convert` (checkpoints are never unpickled at load time)."
        )
    return ModelError(why)


def read_header(data: bytes, name: str) -> dict:
    """The safetensors header of a bundle file's bytes, as a dict (one sentence when it is not one)."""
    if len(data) >= 9 and data[8:9] != b"{" and looks_like_checkpoint(data):
        raise not_a_bundle(data, name, "")
    if len(data) < 8:
        raise ModelError(f"{name} is not a model bundle: the file is too short.")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or 8 + n > len(data):
        why = f"{name} is not a valid model bundle: its header is truncated or corrupt."
        raise not_a_bundle(data, name, why)
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{name} is not a valid model bundle: its header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise ModelError(f"{name} is not a valid model bundle: its header is not a JSON object.")
    return header
