"""The package's version: a leaf that any module may import (the root imports the engine).

Read from the installed distribution's metadata, so pyproject.toml stays its one home.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("optishear-lightning")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
