"""Helpers that start real DICOM peers and databases for the tests."""
