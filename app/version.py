"""The installed vlserve version (`vlserve --version`, /version, the start-up log)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("vlserve")
    except PackageNotFoundError:
        return "0.0.0+unknown"
