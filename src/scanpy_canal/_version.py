"""The installed version of scanpy-canal, for the files it writes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scanpy-canal")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
