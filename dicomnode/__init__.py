"""dicomnode: a DICOM node and PACS gateway daemon."""

__all__ = ["__version__"]

__version__ = "0.1.0"
