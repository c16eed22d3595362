"""The bundle: the directory every layer reads or writes (see docs/bundle-format.md)."""

from sorakit.bundle.io import Bundle, BundleStaging, sha256_file
from sorakit.bundle.manifest import FORMAT_VERSION, Component, GraphEntry, Manifest, TensorSpec

__all__ = ["Bundle", "BundleStaging", "Manifest", "GraphEntry", "Component", "TensorSpec", "FORMAT_VERSION", "sha256_file"]
