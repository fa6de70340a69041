"""DICOM TLS (PS3.15 B.1, BCP 195) contexts for the SCP and for SCU destinations.

Both sides require TLS 1.2 or newer.  Certificates, keys and CA bundles are PEM files named in
:class:`~dicom_node.config.TLSConfig`.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.config import ConfigError, TLSConfig

__all__ = ["TLSFileError", "client_ssl_context", "server_ssl_context"]


class TLSFileError(ConfigError):
    """A certificate, key or CA file named in a TLS configuration is missing or unreadable."""


def _need_file(value: str, what: str, where: str) -> str:
    if not value:
        raise TLSFileError(f"{where}: TLS is enabled but {what} is not set")
    path = Path(value)
    if not path.is_file():
        raise TLSFileError(f"{where}: {what} {value!r} does not exist or is not a file")
    return str(path)


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def _load_chain(ctx: ssl.SSLContext, tls: TLSConfig, where: str) -> None:
    cert = _need_file(tls.cert_file, "cert_file", where)
    key = _need_file(tls.key_file, "key_file", where)
    try:
        ctx.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(
            f"{where}: cannot load certificate {cert!r} / key {key!r}: {exc}"
        ) from exc


def _load_ca(ctx: ssl.SSLContext, tls: TLSConfig, where: str) -> None:
    ca = _need_file(tls.ca_file, "ca_file", where)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError(f"{where}: cannot load CA bundle {ca!r}: {exc}") from exc


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Build the SSL context of the SCP (server side of DICOM TLS).

    Parameters
    ----------
    tls
        The node's TLS settings; ``cert_file`` and ``key_file`` are required, ``ca_file`` is
        required when ``require_client_cert`` is set (mutual TLS).

    Returns
    -------
    ssl.SSLContext
        A server context with TLS 1.2 as the minimum version.  With ``require_client_cert`` the
        peer must present a certificate signed by ``ca_file``.

    Raises
    ------
    TLSFileError
        A file is not set, missing or cannot be loaded (a :class:`ValueError`).
    """
    where = "[node.tls]"
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, tls, where)
    if tls.require_client_cert:
        _load_ca(ctx, tls, where)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        if tls.ca_file:
            _load_ca(ctx, tls, where)
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """Build the SSL context of an SCU association to a destination.

    Parameters
    ----------
    tls
        The destination's TLS settings.  ``ca_file`` is required (the destination's certificate
        is always verified); ``cert_file``/``key_file`` are optional and presented to the peer
        when set (needed for mutual TLS).

    Returns
    -------
    ssl.SSLContext
        A client context with TLS 1.2 as the minimum version that verifies the peer certificate,
        and its host name when ``check_hostname`` is set.

    Raises
    ------
    TLSFileError
        A file is not set, missing or cannot be loaded (a :class:`ValueError`).
    """
    where = "[[destinations]].tls"
    ctx = _base_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = bool(tls.check_hostname)
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, tls, where)
    if tls.cert_file or tls.key_file:
        _load_chain(ctx, tls, where)
    return ctx
