"""The network edge: DICOM upper layer acceptor, storage SCP, SCU, TLS and DIMSE statuses.

This is the only room where exceptions become DICOM statuses.
"""
