"""Derivation: load a source series, build the derived series, transcode it."""
