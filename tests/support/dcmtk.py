"""Real DICOM peers from dcmtk for the tests: ``storescp`` as a context manager, and
``storescu``/``echoscu`` runners.

Example
-------
>>> with StoreSCP(tmp_path / "in") as scp:            # doctest: +SKIP
...     rc, out = storescu("127.0.0.1", scp.port, [path], called_ae_title=scp.aet)
...     assert scp.files()
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "StoreSCP",
    "dcmtk_command",
    "dcmtk_env",
    "dcmtk_tool",
    "die_with_parent",
    "echoscu",
    "free_port",
    "port_is_listening",
    "refusing_port",
    "storescu",
    "wait_until_listening",
]


def die_with_parent() -> None:
    """``preexec_fn`` for helper servers: SIGKILL the child when the test process dies.

    Uses Linux ``PR_SET_PDEATHSIG``, so a server outlives neither a killed pytest nor a crash.
    The signal fires when the *thread* that started the child exits: start servers from the
    main thread or a thread that lives as long as they do.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def dcmtk_tool(name: str) -> str | None:
    """Absolute path of dcmtk's ``name`` on PATH, skipping scripts of the same name.

    pynetdicom installs Python ``storescu``/``storescp``/``echoscu`` console scripts into the
    virtual environment, so with ``.venv/bin`` first on PATH (an activated venv) a bare name runs
    pynetdicom's app with dcmtk's arguments.  dcmtk's tools are binaries; scripts start ``#!``.
    """
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = Path(folder or ".") / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with contextlib.suppress(OSError), candidate.open("rb") as fh:
                if fh.read(2) != b"#!":
                    return str(candidate)
    return None


def dcmtk_command(name: str) -> str:
    """What to run for dcmtk's ``name``: its binary's path, or the bare name if none is found."""
    return dcmtk_tool(name) or name


def dcmtk_env() -> dict[str, str]:
    """Environment for dcmtk tools: ``TCP_NODELAY=1`` disables Nagle's algorithm in dcmtk's DUL,
    which otherwise costs about 50 ms per C-STORE on loopback (20 instead of 400+ instances/s).
    """
    env = dict(os.environ)
    env.setdefault("TCP_NODELAY", "1")
    return env


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Only for external programs that cannot bind port 0 and report it (dcmtk's storescp,
    Orthanc): their ``start()`` retries on a clash.  srnode and pynetdicom servers in tests bind
    port 0; a destination that must refuse connections uses :func:`refusing_port`.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port held bound but not listening: every connection to it is refused.

    Unlike a port that "was free a moment ago", nothing else can take it while the block runs.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def port_is_listening(port: int) -> bool:
    """Whether some process listens on TCP ``port`` (checked without connecting to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_until_listening(
    port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until TCP ``port`` is listening.

    Raises
    ------
    RuntimeError
        ``process`` exited first, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_is_listening(port):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class StoreSCP:
    """dcmtk ``storescp`` on a free loopback port, writing received instances to a folder.

    Parameters
    ----------
    directory
        Where received files go (created if needed).
    aet
        AE title of the SCP.
    accept_all
        ``True`` passes ``+xa`` (accept every transfer syntax dcmtk knows, including JPEG 2000 and
        RLE); ``False`` accepts only the uncompressed little endian syntaxes (dcmtk's default).
    extra_args
        More ``storescp`` arguments, e.g. ``("+xi",)`` for implicit VR little endian only.
    tls
        ``(key_file, cert_file, ca_file)`` to serve DICOM TLS; the peer must present a
        certificate signed by ``ca_file``.

    Attributes
    ----------
    port
        The TCP port it listens on.
    """

    def __init__(
        self,
        directory: Path,
        aet: str = "STORESCP",
        *,
        accept_all: bool = True,
        extra_args: Sequence[str] = (),
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        if dcmtk_tool("storescp") is None:
            raise RuntimeError("dcmtk storescp is not installed")
        self.directory = Path(directory)
        self.aet = aet
        self.accept_all = accept_all
        self.extra_args = tuple(extra_args)
        self.tls = tls
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory.parent / f"{self.directory.name}.storescp.log"

    def command(self) -> list[str]:
        """The ``storescp`` command line."""
        args = [dcmtk_command("storescp"), "-aet", self.aet, "-od",
                str(self.directory), "-pdu", "131072"]
        if self.accept_all:
            args.append("+xa")
        if self.tls is not None:
            key, cert, ca = self.tls
            args += ["+tls", str(key), str(cert), "+cf", str(ca), "-rc"]
        args += list(self.extra_args)
        args.append(str(self.port))
        return args

    def start(self) -> StoreSCP:
        """Start ``storescp`` and wait until it listens (retries once on a port clash)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(3):
            self.port = free_port()
            log = self.log_path.open("ab")
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dcmtk_env(),
                preexec_fn=die_with_parent,
            )
            log.close()
            try:
                wait_until_listening(self.port, 10.0, self.process)
                return self
            except RuntimeError as exc:
                last_error = exc
                self.stop()
        raise RuntimeError(f"storescp did not start: {last_error}; log: {self.log()}")

    def stop(self) -> None:
        """Terminate ``storescp`` (kill it if it does not stop within 5 s)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log(self) -> str:
        """What ``storescp`` printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def files(self) -> list[Path]:
        """Received files, sorted by name (storescp names them by modality and SOP Instance UID)."""
        return sorted(p for p in self.directory.rglob("*") if p.is_file())

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _run(args: list[str], timeout: float) -> tuple[int, str]:
    env = dcmtk_env()
    proc = subprocess.run(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        env=env,
        check=False,
    )
    return proc.returncode, proc.stdout.decode(errors="replace")


def storescu(
    host: str,
    port: int,
    paths: Sequence[Path],
    *,
    called_ae_title: str = "ANY-SCP",
    calling_ae_title: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> tuple[int, str]:
    """Run dcmtk ``storescu`` to send ``paths`` (one association), returning (returncode, output).

    ``-R`` proposes only the contexts the files need; transfer syntax proposal flags or ``+tls``
    options go in ``extra_args``.
    """
    args = [
        dcmtk_command("storescu"),
        "-aet",
        calling_ae_title,
        "-aec",
        called_ae_title,
        "-R",
        "-to",
        str(int(max(1, timeout))),
        *extra_args,
        host,
        str(port),
        *[str(p) for p in paths],
    ]
    return _run(args, timeout + 10)


def echoscu(
    host: str,
    port: int,
    *,
    called_ae_title: str = "ANY-SCP",
    calling_ae_title: str = "ECHOSCU",
    extra_args: Sequence[str] = (),
    timeout: float = 10.0,
) -> tuple[int, str]:
    """Run dcmtk ``echoscu`` (C-ECHO), returning (returncode, output); 0 means success."""
    args = [
        dcmtk_command("echoscu"),
        "-aet",
        calling_ae_title,
        "-aec",
        called_ae_title,
        "-to",
        str(int(max(1, timeout))),
        *extra_args,
        host,
        str(port),
    ]
    return _run(args, timeout + 10)
