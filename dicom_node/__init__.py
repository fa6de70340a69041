"""srnode's DICOM node application: SCP, SCU, derivation, worker and CLI."""

__version__ = "0.1.0"
