"""Errors a user can cause and fix. The CLI prints their message on one line and exits 2.

Anything that is not a RetrievalError is a bug and keeps its traceback (under --debug).
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base class for user-facing errors: bad input, missing index, offline weights."""

    exit_code = 2


class ModelSpecError(RetrievalError):
    """The model spec cannot be parsed or names an unknown architecture or tag."""


class OfflineWeightsError(RetrievalError):
    """Pretrained weights are neither cached nor downloadable."""


class ModelMismatchError(RetrievalError):
    """The encoder (or fusion) does not match the model an index was built with."""


class IndexNotFoundError(RetrievalError):
    """No index at the given directory."""


class IndexExistsError(RetrievalError):
    """A command that creates an index was pointed at one that already holds an index."""


class EmptyIndexError(RetrievalError):
    """The index exists but holds nothing to search."""


class IndexDamagedError(RetrievalError):
    """A vector file of the index is missing or damaged; `verify --repair` rebuilds it from SQLite."""


class IndexLockedError(RetrievalError):
    """Another process is writing to the index."""


class DatabaseUnavailableError(RetrievalError):
    """The database server cannot be reached now, or the connection to it was lost; running again may work."""


class ImageDecodeError(RetrievalError):
    """A file could not be decoded as an image; the message says why."""


class DatasetFormatError(RetrievalError):
    """A caption corpus file is malformed or in an unexpected format."""


OFFLINE_HELP = (
    "To run without a network, either point at local weights with --model ARCH:/path/to/weights.safetensors "
    "(.bin and .pt work too; open_clip names such as ViT-B-32 for ARCH), copy a Hugging Face cache that already "
    "holds the weights into ~/.cache/huggingface, or use the offline starter model with --model starter "
    "(pip install 'retrieval-engine[offline]'), which needs no download at all."
)
