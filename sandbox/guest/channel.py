"""The SSH channel to a guest: paramiko transports, one session set up or running on each at
a time where the guest lets it open more (commands, SFTP, tar streams); the sockets it runs
over are :mod:`sandbox.guest.sockets`'."""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shlex
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import paramiko

from ..errors import ChannelError, CommandTimeout, guest_text
from .commands import (
    PING_AFTER,
    CommandResult,
    Deadline,
    TranscriptEntry,
    collect,
    command_string,
    tail_text,
    wrap,
)
from .transfer import (
    GET_MAX_SIZE,
    PUSH_ERRORS_KEEP,
    check_regular,
    copy_bounded,
    read_tail,
    too_large,
)

__all__ = ["Channel", "CommandResult", "TranscriptEntry", "command_string", "connect", "wrap"]

#: A server that has not answered a keepalive within this long is gone (over the
#: virtio-serial port a dead server never shows as end-of-file). Asked every PING_AFTER
#: seconds while a command is silent. 10 s was too short for a TCG guest busy with eight
#: sessions on a host whose two cores other machines kept busy.
PING_TIMEOUT = 25.0
#: How long an SFTP transfer may wait for the guest without any progress.
SFTP_IDLE_TIMEOUT = 60.0
#: The first line of every command: wait for the client's go (one newline on stdin), and
#: end quietly at end-of-file without it. dropbear before 2024.86 (Debian 12's) may close
#: a session it has just opened when any of its children exits at that moment (a SIGCHLD
#: before the exec request: "Channel closed." here), yet still start the command on it,
#: and then abort the whole connection when that command writes output. A command that
#: waits for a go it never gets writes nothing; the session is simply opened again.
GO = "IFS= read -r sandbox_go || exit 0"
#: At most this many SSH connections to one guest. The go above does not close that race
#: where processes are cheap (a newer QEMU: 8 threads of short commands lost the connection
#: in 2 of 3 runs under QEMU 10), so each session gets a connection of its own: the first,
#: then more to the guest's port 22, opened as commands overlap and kept for the next ones.
#: A connection then never sets up a session while one of its own children exits. Past
#: this many (or when the port does not answer) sessions share them, as before.
CONNECTIONS_MAX = 16


def _request(chan: paramiko.Channel, kind: str, value: str) -> None:
    """``chan.exec_command(value)`` (``kind`` "exec") or ``chan.invoke_subsystem(value)``
    ("subsystem"), except that the request never follows this client's CLOSE of the
    session on the wire. paramiko answers a server's CLOSE from its own thread; a request
    sent between its check that the session is open and that answer reaches dropbear after
    it forgot the session, and dropbear ends the whole connection ("Unknown channel").
    Here the check and the send happen under the transport's send lock, which the answer
    needs too."""
    transport = chan.get_transport()
    assert transport is not None
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(chan.remote_chanid)
    message.add_string(kind)
    message.add_boolean(True)
    message.add_string(value)
    chan._event_pending()  # type: ignore[attr-defined]
    while True:  # as Transport._send_user_message: not while keys are being exchanged
        transport.clear_to_send.wait(0.1)
        if not transport.is_active():
            raise paramiko.SSHException("the SSH connection closed")
        with transport.clear_to_send_lock:
            if transport.clear_to_send.is_set():
                if chan.closed:
                    raise paramiko.SSHException("Channel closed.")
                transport._send_message(message)  # type: ignore[attr-defined]
                break
    chan._wait_for_event()  # type: ignore[attr-defined]


def _first(preferred: tuple[str, ...], available: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*(p for p in preferred if p in available), *available]))


def _prefer_cheap_algorithms(options: paramiko.SecurityOptions) -> None:
    """Order algorithms by what is cheap for a guest under TCG: curve25519 key exchange
    (not post-quantum hybrids) and AES-GCM, whose MAC needs no emulated SHA-256 rounds."""
    options.kex = _first(("curve25519-sha256@libssh.org",), options.kex)
    options.ciphers = _first(("aes128-gcm@openssh.com", "aes256-gcm@openssh.com"),
                             options.ciphers)


class Channel:
    """SSH to one guest with the cache's key, pinning the host key the image was built with."""

    def __init__(self, opener: Callable[[float], Any], key: paramiko.PKey,
                 host_key: str | None = None, user: str = "root",
                 more: Callable[[float], Any] | None = None) -> None:
        self.opener = opener
        #: Where further connections are opened (the guest's port 22), or None: sessions
        #: then share the one connection.
        self.more = more
        self.key = key
        self.host_key = host_key
        self.user = user
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lease: _Lease | None = None
        self._lock = threading.Lock()
        # The connection pool: how many sessions use the first connection, the further
        # connections (all; and those not in use), and how many are being opened.
        self._pool_lock = threading.Lock()
        self._first_users = 0
        self._extra: list[paramiko.Transport] = []
        self._idle: list[paramiko.Transport] = []
        self._opening = 0
        self._ping_lock = threading.Lock()
        self._pinged = 0.0
        #: Sessions the server closed before their command or subsystem started, which were
        #: opened again (see GO): a figure for the benchmark and for debugging.
        self.sessions_reopened = 0
        self._count_lock = threading.Lock()

    # -- connection -------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """One attempt: open the byte stream, SSH handshake, host key check, key auth."""
        self._transport = self._handshake(self.opener, timeout)

    def _handshake(self, opener: Callable[[float], Any], timeout: float) -> paramiko.Transport:
        transport = paramiko.Transport(opener(timeout))
        _prefer_cheap_algorithms(transport.get_security_options())
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        try:
            transport.start_client(timeout=timeout)
            self._check_host_key(transport.get_remote_server_key())
            transport.auth_publickey(self.user, self.key)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(15)
        return transport

    def _check_host_key(self, key: paramiko.PKey) -> None:
        if self.host_key is None:
            return
        expected = self.host_key.split()
        if [key.get_name(), key.get_base64()] != expected[:2]:
            raise ChannelError(f"guest host key {key.get_name()} {key.get_base64()[:16]}... does "
                               "not match the image's; the image cache may be corrupt "
                               "(sandbox image rm NAME, then rebuild)")

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            raise ChannelError("the SSH connection to the guest is closed")
        return self._transport

    @property
    def connections(self) -> int:
        """How many SSH connections to the guest are open (a figure for tests and debugging)."""
        with self._pool_lock:
            extra = sum(1 for t in self._extra if t.is_active())
        return extra + (1 if self._transport is not None and self._transport.is_active() else 0)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._sftp_lease is not None:
            self._give(self._sftp_lease)
            self._sftp_lease = None
        with self._pool_lock:
            extra, self._extra, self._idle = self._extra, [], []
        for transport in extra:
            transport.close()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- the connection pool ----------------------------------------------------------------

    @contextlib.contextmanager
    def _lease(self, timeout: float) -> Iterator[_Lease]:
        """A connection on which no other session is set up or runs while this one does (see
        CONNECTIONS_MAX), given back afterwards."""
        lease = self._take(timeout)
        try:
            yield lease
        finally:
            self._give(lease)

    def _take(self, timeout: float) -> _Lease:
        with self._pool_lock:
            first = self.transport
            if not self._first_users:
                self._first_users += 1
                return _Lease(first)
            while self._idle:
                idle = self._idle.pop()
                if idle.is_active():
                    return _Lease(idle)
                self._extra.remove(idle)
            more = self.more
            if more is None or len(self._extra) + self._opening + 1 >= CONNECTIONS_MAX:
                self._first_users += 1
                return _Lease(first)
            self._opening += 1
        transport: paramiko.Transport | None = None
        try:
            transport = self._handshake(more, max(1.0, min(20.0, timeout)))
        except (OSError, paramiko.SSHException, EOFError, ChannelError):
            self.more = None  # the port does not serve: share the first connection from now
        except BaseException:
            with self._pool_lock:
                self._opening -= 1
            raise
        with self._pool_lock:
            self._opening -= 1
            if transport is None:
                self._first_users += 1
                return _Lease(first)
            self._extra.append(transport)
        return _Lease(transport)

    def _give(self, lease: _Lease) -> None:
        with self._pool_lock:
            if lease.transport is self._transport:
                self._first_users -= 1
                return
            if lease.reusable and lease.transport.is_active() and \
                    lease.transport in self._extra:
                self._idle.append(lease.transport)
                return
            if lease.transport in self._extra:
                self._extra.remove(lease.transport)
        # Its session may still have a child that exits later: not used again.
        lease.transport.close()

    def _exec(self, transport: paramiko.Transport, command: str,
              timeout: float = 30.0) -> paramiko.Channel:
        """A session on ``transport`` running ``command`` (started: it got its go; see GO)."""
        chan = self._open(transport, lambda chan: _request(chan, "exec", f"{GO}\n{command}"),
                          timeout)
        chan.sendall(b"\n")
        return chan

    def _subsystem(self, transport: paramiko.Transport, name: str) -> paramiko.Channel:
        """A session running the SSH server's ``name`` subsystem (which waits for input)."""
        return self._open(transport, lambda chan: _request(chan, "subsystem", name), 30.0)

    def _open(self, transport: paramiko.Transport, start: Callable[[paramiko.Channel], None],
              timeout: float) -> paramiko.Channel:
        """A session, opened and ``start``-ed; opened again when the server closed it at once
        (see GO), which paramiko reports as "Unable to open channel." or "Channel closed.",
        for up to ``timeout`` seconds (at most 30)."""
        limit = max(0.1, min(30.0, timeout))
        deadline = time.monotonic() + limit
        for attempt in itertools.count():
            if attempt:  # children exiting meanwhile close sessions: let them be reaped
                if time.monotonic() > deadline:
                    break
                time.sleep(min(0.2, 0.005 * 2 ** attempt))
            if not transport.is_active():
                raise ChannelError("the SSH connection to the guest is closed")
            try:
                chan = transport.open_session(timeout=max(0.1, deadline - time.monotonic()))
            except paramiko.ChannelException as exc:  # refused, with a reason
                raise ChannelError(f"the guest's SSH server refused a session: {exc}") from exc
            except paramiko.SSHException as exc:
                if str(exc).startswith("Timeout") or not transport.is_active():
                    raise ChannelError(f"could not open an SSH session to the guest within "
                                       f"{limit:g} s: {exc}") from exc
                with self._count_lock:
                    self.sessions_reopened += 1
                continue
            try:
                start(chan)
                return chan
            except paramiko.SSHException:
                chan.close()
                if not transport.is_active():
                    raise
            with self._count_lock:
                self.sessions_reopened += 1
        raise ChannelError(f"the guest's SSH server closed or refused every session opened "
                           f"within {limit:g} s before it could start ({attempt} tries)")

    def answers(self, timeout: float = PING_TIMEOUT,
                transport: paramiko.Transport | None = None) -> bool:
        """Whether the SSH server still answers a request (a keepalive that it must reply
        to, if only with a refusal) within ``timeout`` seconds, on ``transport`` (default:
        the first connection). One at a time: paramiko tracks one global request per
        transport (a second asker says yes at once)."""
        transport = transport or self.transport
        if not self._ping_lock.acquire(blocking=False):
            return True
        try:
            asker = threading.Thread(target=transport.global_request,
                                     args=("keepalive@openssh.com",), kwargs={"wait": True},
                                     daemon=True, name="sandbox-ping")
            asker.start()
            asker.join(timeout)  # an unanswered request ends when the transport is closed
            return not asker.is_alive() and transport.is_active()
        finally:
            self._ping_lock.release()

    # -- commands ---------------------------------------------------------------------------

    def run(self, cmd: str | Sequence[str], *, timeout: float | None,
            env: Mapping[str, str] | None = None,
            input: bytes | str | Iterable[bytes] | None = None,
            stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
            watch: Callable[[], None] | None = None) -> CommandResult:
        """Run one command; ``stdout``/``stderr`` streams, when given, get output as it comes.
        ``watch`` is called about every second while it runs and may raise to end the wait
        (the machine checks that QEMU lives and that the guest has not panicked); a server
        that stops answering while the command is silent is a ChannelError. ``input`` may be
        an iterable of chunks, sent as it yields them (a reply to what the command says
        first); it must end once the command has ended."""
        command = command_string(cmd)
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        start_within = timeout if timeout is not None else 30.0
        with self._lease(start_within) as lease:
            transport = lease.transport
            try:
                chan = self._exec(transport, wrap(command, env), start_within)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ChannelError(f"SSH failed while starting {command!r}: {exc}") from exc
            try:
                feeder = self._feed(chan, input)
                out, err, pid = collect(chan, deadline, stdout, stderr,
                                         lambda: self._check(watch, command, transport))
                if feeder is not None and isinstance(input, (bytes, str)):
                    feeder.join(timeout=5)
            except Deadline as late:
                if self._kill_session(late.pid):
                    chan.status_event.wait(5)  # its server side ends once the tree is reaped
                raise CommandTimeout(command, timeout or 0,
                                     late.stdout.decode(errors="replace"),
                                     late.stderr.decode(errors="replace")) from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise ChannelError(f"SSH failed while running {command!r}: {exc}") from exc
            finally:
                chan.close()
                lease.reusable = chan.exit_status_ready()
        # paramiko leaves exit_status at -1 unless the server sent one (a real one is
        # unsigned). Without one, a session the server ended cleanly (EOF first) means the
        # command's shell died of a signal (sent as exit-signal, which paramiko drops); a
        # session that just closed means the connection itself went away.
        status = chan.exit_status
        if status == -1 and not (chan.eof_received and transport.is_active()):
            raise ChannelError(f"the connection to the guest was lost while {command!r} ran "
                               "(QEMU exited, the guest rebooted or its SSH server died); "
                               f"output so far: {tail_text(out + err)}")
        return CommandResult(command, status, out, err, time.monotonic() - started)

    def _check(self, watch: Callable[[], None] | None, command: str,
               transport: paramiko.Transport) -> None:
        """While a command is silent: the caller's watch; every PING_AFTER seconds, whether
        the server answers (on the command's connection)."""
        if watch is not None:
            watch()
        if time.monotonic() - self._pinged < PING_AFTER:
            return
        self._pinged = time.monotonic()
        if not self.answers(transport=transport):
            raise ChannelError(f"the guest's SSH server stopped answering while {command!r} "
                               f"ran (no reply within {PING_TIMEOUT:g} s)")

    @staticmethod
    def _feed(chan: paramiko.Channel,
              data: bytes | str | Iterable[bytes] | None) -> threading.Thread | None:
        if data is None:
            chan.shutdown_write()
            return None
        chunks = [data.encode() if isinstance(data, str) else data] \
            if isinstance(data, (bytes, str)) else data

        def send() -> None:
            try:
                for chunk in chunks:
                    chan.sendall(chunk)
                chan.shutdown_write()
            except (OSError, paramiko.SSHException):
                pass

        thread = threading.Thread(target=send, daemon=True, name="sandbox-stdin")
        thread.start()
        return thread

    def _kill_session(self, pid: int | None) -> bool:
        """Kill the timed-out command's process tree: stop it all first, then SIGKILL, so
        nothing forks away in between; whether that was done. (The SSH server may not give
        each command a session of its own, so the tree is walked rather than the session
        killed.)"""
        if pid is None:
            return False
        tree = 't() { for c in $(pgrep -P "$1"); do t "$c"; done; echo "$1"; }'
        script = (f"{tree}; kill -STOP $(t {pid}) 2>/dev/null; "
                  f"kill -KILL $(t {pid}) 2>/dev/null; true")
        try:
            with self._lease(30.0) as lease:
                chan = self._exec(lease.transport, script)
                try:
                    chan.shutdown_write()
                    chan.status_event.wait(10)
                finally:
                    chan.close()
                    lease.reusable = chan.exit_status_ready()
        except Exception:  # noqa: BLE001 - best effort: the timeout is what gets reported
            return False
        return True

    # -- files ------------------------------------------------------------------------------

    @property
    def sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is None:
                lease = self._take(30.0)  # the SFTP session keeps its connection
                try:
                    sftp_channel = self._subsystem(lease.transport, "sftp")
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    self._give(lease)
                    raise ChannelError(f"the guest refused an SFTP session: {exc}") from exc
                except BaseException:
                    self._give(lease)
                    raise
                sftp_channel.settimeout(SFTP_IDLE_TIMEOUT)
                self._sftp, self._sftp_lease = paramiko.SFTPClient(sftp_channel), lease
            return self._sftp

    def put(self, local: Path, remote: str) -> None:
        mode = stat.S_IMODE(local.stat().st_mode)
        try:
            self.sftp.put(str(local), remote)
            self.sftp.chmod(remote, mode)
        except OSError as exc:  # a guest stalled for SFTP_IDLE_TIMEOUT ends here too
            raise ChannelError(f"could not copy {local} into the guest as {remote}: "
                               f"{guest_text(exc.strerror or repr(exc))}") from exc

    def get(self, remote: str, local: Path, *, max_size: int = GET_MAX_SIZE,
            timeout: float = 600.0) -> None:
        """Copy regular file ``remote`` to ``local``: at most ``max_size`` bytes, within
        ``timeout`` seconds in all, else GuestDataError. The file appears at ``local`` only
        once it is all there (written beside it under another name, then renamed)."""
        if local.is_dir():
            raise ChannelError(f"{local} is a directory on the host; give get the path of the "
                               "file to write")
        deadline = time.monotonic() + timeout
        part = local.parent / f".{local.name[:200]}.{secrets.token_hex(4)}.part"
        try:
            sftp = self.sftp
            check_regular(remote, sftp.stat(remote).st_mode)
            with sftp.open(remote, "rb") as source:
                opened = source.stat()  # what was opened: the path may have changed since
                check_regular(remote, opened.st_mode)
                size = opened.st_size or 0
                if size > max_size:
                    raise too_large(remote, max_size, f"it has {size} bytes")
                source.prefetch(size, max_concurrent_requests=64)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                with os.fdopen(fd, "wb") as target:
                    copy_bounded(source, target, remote, max_size, deadline, timeout)
            os.replace(part, local)
        except OSError as exc:
            raise ChannelError(f"could not copy {remote} from the guest to {local}: "
                               f"{guest_text(exc.strerror or repr(exc))}") from exc
        finally:
            part.unlink(missing_ok=True)

    def push(self, local_dir: Path, remote_dir: str, timeout: float) -> None:
        """The contents of ``local_dir`` into ``remote_dir`` as one tar stream (modes kept)."""
        with self._lease(30.0) as lease:
            status, errors = self._push(lease, local_dir, remote_dir, timeout)
        if status != 0:
            raise ChannelError(f"push of {local_dir} to {remote_dir} failed in the guest "
                               f"(tar status {status}): {guest_text(errors.strip(), 30)}")

    def _push(self, lease: _Lease, local_dir: Path, remote_dir: str,
              timeout: float) -> tuple[int, str]:
        try:
            chan = self._exec(lease.transport, f"mkdir -p {shlex.quote(remote_dir)} && "
                                               f"tar -x -p -f - -C {shlex.quote(remote_dir)}")
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ChannelError(f"push of {local_dir} to {remote_dir} failed: {exc}") from exc
        try:
            chan.settimeout(timeout)
            with chan.makefile("wb") as stream, \
                    tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for entry in sorted(local_dir.iterdir()):
                    tar.add(str(entry), arcname=entry.name)
            chan.shutdown_write()
            deadline = time.monotonic() + timeout
            errors = read_tail(chan, PUSH_ERRORS_KEEP, deadline)
            if not chan.status_event.wait(max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"tar in the guest did not finish within {timeout:g} s")
            status = chan.recv_exit_status()
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise ChannelError(f"push of {local_dir} to {remote_dir} failed: {exc}") from exc
        finally:
            chan.close()
            lease.reusable = chan.exit_status_ready()
        return status, errors


class _Lease:
    """A connection taken from the pool; ``reusable`` False when its session may still have
    a child to reap (its exit status never came), so that it is closed, not used again."""

    def __init__(self, transport: paramiko.Transport) -> None:
        self.transport = transport
        self.reusable = True


def connect(opener: Callable[[float], Any], key: paramiko.PKey, host_key: str | None, *,
            timeout: float, alive: Callable[[], None] | None = None,
            attempts: int | None = None, user: str = "root",
            more: Callable[[float], Any] | None = None) -> Channel:
    """A connected :class:`Channel`, retrying failed attempts (refused, reset, a server not
    yet up) for up to ``timeout`` seconds or ``attempts`` tries; ``alive()`` is called before
    each attempt and may raise to stop early. ChannelError names the deadline and the last
    error. ``more`` opens further connections (see CONNECTIONS_MAX)."""
    import tenacity

    deadline = time.monotonic() + timeout

    def attempt() -> Channel:
        if alive is not None:
            alive()
        channel = Channel(opener, key, host_key, user, more)
        channel.connect(timeout=max(1.0, min(20.0, deadline - time.monotonic())))
        return channel

    stop: tenacity.stop.stop_base = tenacity.stop_after_delay(timeout)
    if attempts is not None:
        stop = stop | tenacity.stop_after_attempt(attempts)
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((OSError, paramiko.SSHException, EOFError)),
        wait=tenacity.wait_fixed(0.25), stop=stop, reraise=True)
    try:
        return retrying(attempt)
    except (OSError, paramiko.SSHException, EOFError) as exc:
        tries = f"{attempts} attempt(s) within " if attempts is not None else ""
        raise ChannelError(f"the guest did not answer on SSH ({tries}{timeout:g} s; last "
                           f"error: {exc!r})") from exc
