"""Read ``.pkl`` weight files without running code: only containers, strings, numbers and numpy arrays.

``pickle.load`` calls whatever function a file names, so a downloaded ``.pkl`` can run anything. The unpickler
here resolves a short allow-list of globals, the ones numpy needs to rebuild arrays, and refuses every other
one before it is called. Allowed: dict, list, tuple, str, bytes, int, float, bool, None (pickle opcodes, no
globals), ``collections.OrderedDict``, and numpy arrays and scalars of non-object dtypes through
``numpy[._]core.multiarray._reconstruct`` / ``scalar``, ``numpy[._]core.numeric._frombuffer`` (protocol 5),
``numpy.ndarray``, ``numpy.dtype`` and ``_codecs.encode`` with latin-1 only (how protocol 2 writes bytes).
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy._core import multiarray as _multiarray
from numpy._core import numeric as _numeric

from detforge.errors import CheckpointError

__all__ = ["ALLOWED_GLOBALS", "load_restricted_pickle"]


_NUMPY_FROMBUFFER: Callable[..., Any] = _numeric._frombuffer  # type: ignore[attr-defined]


class _Refused(Exception):
    """A disallowed value inside an allowed call (object dtype, ndarray subclass); becomes a CheckpointError."""


def _checked_dtype(dtype: Any) -> np.dtype[Any]:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _Refused(f"an array of dtype {dtype!r} (object arrays can hold arbitrary objects)")
    return dtype


def _dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype[Any]:
    return _checked_dtype(np.dtype(obj, align, copy))


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
    if subtype is not np.ndarray:
        raise _Refused(f"an ndarray subclass {subtype!r}")
    return _multiarray._reconstruct(np.ndarray, shape, _checked_dtype(np.dtype(dtype)))


def _scalar(dtype: Any, *args: Any) -> Any:
    return _multiarray.scalar(_checked_dtype(dtype), *args)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> Any:
    return _NUMPY_FROMBUFFER(buffer, _checked_dtype(dtype), shape, order)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if codecs.lookup(encoding).name != "iso8859-1":
        raise _Refused(f"_codecs.encode with encoding {encoding!r} (only latin-1 is used by pickles)")
    return text.encode("latin-1")


_NUMPY: dict[str, Callable[..., Any]] = {"_reconstruct": _reconstruct, "scalar": _scalar}
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
    **{
        (module, name): fn
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name, fn in _NUMPY.items()
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Detectron's Caffe2 files are Python 2 pickles
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise CheckpointError(
                f"{self.source}: refused to load: the pickle asks for the global '{module}.{name}', and only "
                "dicts, lists, tuples, strings, numbers and numpy arrays are allowed. Nothing was executed. A "
                "Detectron/Detectron2 weight file never needs it: this file is not one, or it was tampered with."
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(
            f"{self.source}: refused to load: it references external storage ({str(pid)[:40]}), as torch.save's "
            "legacy format does. Rename it to .pth to load it as a PyTorch file."
        )


def load_restricted_pickle(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` allowing only plain containers, strings, numbers and numpy arrays (see module doc).

    Raises:
        CheckpointError: the file names any other global (refused before it is called), holds an object array,
            or is not a readable pickle.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, str(path)).load()
    except _Refused as exc:
        raise CheckpointError(f"{path}: refused to load: it holds {exc}. Nothing was executed.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, OSError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable pickle ({type(exc).__name__}: {exc}). It may be truncated: download it again."
        ) from None
