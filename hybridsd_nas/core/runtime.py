"""Small runtime helpers shared by every layer."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

try:
    __version__ = version("hybridsd-nas")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence diffusers' and transformers' logging and Python warnings while loading or instantiating models."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
        try:
            yield
        finally:
            diffusers_logging.set_verbosity(old[0])
            transformers_logging.set_verbosity(old[1])
