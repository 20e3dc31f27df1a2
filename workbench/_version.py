"""The package version, apart from the package root so any layer can read it without importing the whole API."""

__version__ = "0.1.0"
