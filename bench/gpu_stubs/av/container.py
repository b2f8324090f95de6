"""Import-only stand-in (bench/gpu_stubs/av/__init__.py says why): any name here raises when used."""
from av import __getattr__  # noqa: F401  (PEP 562: the package's lookup serves this module too)
