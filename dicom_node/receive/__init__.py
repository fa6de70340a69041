"""Receiving: header scan, validation and the plain header record handed to ``storage``."""
