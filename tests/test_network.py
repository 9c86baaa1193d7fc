"""Private networks between machines: names, isolation, link faults, partitions (real guests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sandbox
from sandbox.net.segment import NetworkError

from .conftest import ROOT, qemu_processes

pytest_plugins = ["pytester"]

Factory = Callable[..., sandbox.Machine]

#: A TCP server answering every connection with /root/answer, as a transient unit.
SERVE = ("systemd-run --unit hello python3 -c \"import socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); "
         "s.listen()\nwhile True:\n c, _ = s.accept(); "
         "c.sendall(open('/root/answer', 'rb').read()); c.close()\"")


def serve(vm: sandbox.Machine, answer: str) -> None:
    vm.succeed(f"echo {answer} > /root/answer && {SERVE}")
    vm.wait_for_port(7000, timeout=30)


def probe(vm: sandbox.Machine, host: str, timeout: float = 1.0) -> sandbox.CommandResult:
    return vm.run(f"python3 -c \"import socket; s = socket.create_connection(('{host}', 7000), "
                  f"{timeout}); print(s.recv(64).decode().strip())\"", timeout=30)


def test_three_clones_reach_each_other_by_name_with_tcp_and_multicast(
        built_image: dict[str, Any], vm_factory: Factory,
        vm_network: Callable[..., sandbox.Network]) -> None:
    net = vm_network()
    db, web, cache = (vm_factory(name=n, networks=[net]) for n in ("db", "web", "cache"))
    for vm in (db, web, cache):
        names = vm.succeed("getent hosts db web cache").split()
        assert names == [db.address(net), "db", web.address(net), "web",
                         cache.address(net), "cache"]
    serve(db, "from-db")
    assert probe(web, "db").stdout.strip() == "from-db"
    assert probe(cache, "db").stdout.strip() == "from-db"
    # multicast (what VRRP uses) crosses the segment: cache listens, web sends
    cache.succeed("systemd-run --unit listen python3 -c \"import socket, struct; "
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 5007)); "
                  "s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, "
                  "struct.pack('4s4s', socket.inet_aton('239.1.1.1'), "
                  f"socket.inet_aton('{cache.address(net)}'))); "
                  "open('/root/got', 'wb').write(s.recv(64))\"")
    web.succeed(f"python3 -c \"import socket; s = socket.socket(socket.AF_INET, "
                f"socket.SOCK_DGRAM); s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, "
                f"socket.inet_aton('{web.address(net)}'))\nfor _ in range(20):\n"
                f" s.sendto(b'multicast-hello', ('239.1.1.1', 5007)); import time; "
                f"time.sleep(0.1)\"")
    assert cache.wait_until_succeeds("cat /root/got", timeout=10) == "multicast-hello"
    assert web.succeed("cat /sys/class/net/eth1/mtu") == "1500\n"
    macs = {vm.succeed("cat /sys/class/net/eth1/address") for vm in (db, web, cache)}
    assert len(macs) == 3  # clones of one snapshot, each with its own MAC


def test_a_cold_booted_machine_joins_clones(built_image: dict[str, Any], vm_factory: Factory,
                                            vm_network: Callable[..., sandbox.Network]) -> None:
    """No clone identity for the guest agent to carry: the cold machine's network is set up
    over SSH, and it is told later names over SSH too; clones use their agents."""
    net = vm_network()
    first = vm_factory(name="first", networks=[net])
    cold = vm_factory(name="cold", networks=[net], cold=True)
    last = vm_factory(name="last", networks=[net])
    for vm in (first, cold, last):
        assert vm.succeed("getent hosts first cold last").split() == [
            first.address(net), "first", cold.address(net), "cold", last.address(net), "last"]
    serve(cold, "from-cold")
    assert probe(first, "cold").stdout.strip() == "from-cold"
    assert probe(last, "cold").stdout.strip() == "from-cold"


def test_block_and_unblock_take_effect_at_once(
        built_image: dict[str, Any], vm_factory: Factory,
        vm_network: Callable[..., sandbox.Network]) -> None:
    net = vm_network()
    db, web = vm_factory(name="db", networks=[net]), vm_factory(name="web", networks=[net])
    serve(db, "up")
    assert probe(web, "db").stdout.strip() == "up"
    started = time.monotonic()
    web.block(net)
    assert time.monotonic() - started < 1
    assert web.succeed("cat /sys/class/net/eth1/carrier") == "0\n"
    assert probe(web, "db").exit_status != 0
    web.unblock(net)
    assert web.succeed("cat /sys/class/net/eth1/carrier") == "1\n"
    assert web.wait_until_succeeds(
        "python3 -c \"import socket; print(socket.create_connection(('db', 7000), 1)"
        ".recv(64).decode().strip())\"", timeout=10) == "up\n"


def test_partition_and_heal(built_image: dict[str, Any], vm_factory: Factory,
                            vm_network: Callable[..., sandbox.Network]) -> None:
    net = vm_network()
    a, b, c = (vm_factory(name=n, networks=[net]) for n in ("a", "b", "c"))
    serve(a, "from-a")
    net.partition([a, b], [c])
    assert probe(b, "a").stdout.strip() == "from-a"  # same side
    assert probe(c, "a").exit_status != 0            # the other side
    net.heal()
    assert probe(c, "a").stdout.strip() == "from-a"


def test_two_networks_are_isolated_at_layer_2(
        built_image: dict[str, Any], vm_factory: Factory,
        vm_network: Callable[..., sandbox.Network]) -> None:
    one, two = vm_network("one"), vm_network("two")
    a = vm_factory(name="a", networks=[one])
    b = vm_factory(name="b", networks=[one, two])
    c = vm_factory(name="c", networks=[two])
    serve(a, "from-a")
    assert probe(b, "a").stdout.strip() == "from-a"  # b is on both
    # c takes an address in one's subnet on its only segment: still nothing of one reaches it
    spare = one.subnet.network_address + 200
    c.succeed(f"ip addr add {spare}/24 dev eth1")
    assert probe(c, a.address(one)).exit_status != 0
    assert b.address(two) != b.address(one)


def test_bad_requests_are_named(built_image: dict[str, Any], vm_factory: Factory,
                                vm_network: Callable[..., sandbox.Network]) -> None:
    net = vm_network()
    with pytest.raises(NetworkError, match="'under_score' is not a valid hostname"):
        vm_factory(name="under_score", networks=[net])
    vm_factory(name="dup", networks=[net])
    with pytest.raises(sandbox.SandboxError, match="named 'dup' runs in this process already"):
        vm_factory(name="dup", networks=[net])
    closed = vm_network()
    closed.close()
    with pytest.raises(NetworkError, match="is not open"):
        sandbox.launch(networks=[closed])
    with pytest.raises(sandbox.SandboxError, match="is not open: use it in a with block"):
        sandbox.launch(networks=[sandbox.Network()])


CONCURRENT = '''
def test_each_worker_has_its_own_lab(vm_factory, vm_network, worker_id):
    lab = vm_network("lab")
    server = vm_factory(name="server", networks=[lab])
    client = vm_factory(name="client", networks=[lab])
    server.succeed(f"echo {worker_id} > /srv-token && systemd-run --unit t python3 -m "
                   "http.server 8000 --directory /")
    server.wait_for_port(8000, timeout=30)
    got = client.wait_until_succeeds("python3 -c \\"import urllib.request; print(urllib."
                                     "request.urlopen('http://server:8000/srv-token').read()"
                                     ".decode())\\"", timeout=30)
    assert got.strip() == worker_id
'''


def test_concurrent_runs_with_networks_of_the_same_name_are_isolated(
        pytester: pytest.Pytester, built_image: dict[str, Any]) -> None:
    pytester.makepyfile(test_concurrent="import pytest\n\n" + CONCURRENT.replace(
        "def test_each", "@pytest.mark.parametrize('n', range(2))\ndef test_each").replace(
        "vm_network, worker_id)", "vm_network, worker_id, n)"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=2)


CHILD = """
import json, sys, time
import sandbox
net = sandbox.Network("doomed").start()
machines = [sandbox.launch(name=n, networks=[net]) for n in ("a", "b")]
print(json.dumps({"switch": int((net.path / "switch.pid").read_text()),
                  "run": str(net.path.parent)}), flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_owner_leaves_no_switch_and_no_qemu(built_image: dict[str, Any]) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert child.stdout is not None
        facts = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 10
    run_id = Path(facts["run"]).name.removeprefix("run-")
    while time.monotonic() < deadline and (Path(f"/proc/{facts['switch']}").exists()
                                           or qemu_processes(f"sandbox-{run_id}-")):
        time.sleep(0.1)
    assert not Path(f"/proc/{facts['switch']}").exists(), "the switch outlived its owner"
    assert qemu_processes(f"sandbox-{run_id}-") == []
    prune = subprocess.run([sys.executable, "-m", "sandbox.cli", "prune"], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert prune.returncode == 0, prune.stderr
    assert not Path(facts["run"]).exists()


def test_a_machine_on_no_network_is_unchanged(built_image: dict[str, Any]) -> None:
    with sandbox.launch() as vm:
        assert vm.run("test -e /sys/class/net/eth1").exit_status != 0


def test_named_machines_share_a_named_network(built_image: dict[str, Any]) -> None:
    from sandbox.net.named_network import networks_dir

    from .conftest import sandbox_cli

    network = f"lab{os.getpid()}"
    first = sandbox_cli("up", "net-a", "--network", network)
    assert first.returncode == 0, first.stderr
    try:
        second = sandbox_cli("up", "net-b", "--network", network)
        assert second.returncode == 0, second.stderr
        assert f", {network} 192.168." in second.stdout
        listed = {m["name"]: m for m in json.loads(sandbox_cli("ls", "--format", "json").stdout)}
        address_a = listed["net-a"]["networks"][network]
        assert sandbox_cli("exec", "net-b", "--", "getent", "hosts", "net-a").stdout.split() \
            == [address_a, "net-a"]
        assert sandbox_cli("exec", "net-a", "--", "getent", "hosts", "net-b").returncode == 0
        bad = sandbox_cli("up", "net-c", "--network", "bad/name")
        assert bad.returncode == 2 and "network name 'bad/name'" in bad.stderr
    finally:
        sandbox_cli("down", "net-a", "net-b")
    deadline = time.monotonic() + 15  # the switch ends a few seconds after its last member
    while (networks_dir() / network).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (networks_dir() / network).exists()


def test_a_template_saved_on_a_network_is_cloned_onto_one(
        built_image: dict[str, Any], vm_network: Callable[..., sandbox.Network]) -> None:
    net, other = vm_network(), vm_network()
    name = f"netted-{os.getpid()}"
    with sandbox.launch(name="base", networks=[net]) as vm:
        vm.succeed("echo ready > /root/state")
        vm_address = vm.address(net)
        template = vm.save_template(name)
    try:
        with pytest.raises(sandbox.TemplateError, match="0 network"):
            sandbox.launch(template=template)
        with sandbox.launch(name="y", networks=[other]) as y, \
                sandbox.launch(name="base", template=template, networks=[other]) as x:
            assert x.succeed("cat /root/state") == "ready\n"
            assert x.succeed("ip -4 -o addr show dev eth1 | wc -l") == "1\n"
            assert y.succeed("getent hosts base").split() == [x.address(other), "base"]
            # its /etc/hosts had a line for its name on the old network: replaced
            assert x.succeed("getent hosts base y").split() == [
                x.address(other), "base", y.address(other), "y"]
            assert x.address(other) != vm_address
    finally:
        sandbox.remove_template(name)


def _frame(destination: bytes, source: bytes, payload: bytes = b"") -> bytes:
    return destination + source + b"\x08\x00" + payload


def _received(sock: socket.socket, wait: float = 0.5) -> list[bytes]:
    """The frames ``sock`` got within ``wait`` seconds."""
    frames, deadline = [], time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            frames.append(sock.recv(65536))
        except TimeoutError:
            break
    return frames


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def test_the_switch_pins_each_ports_mac_and_drops_spoofed_frames(
        vm_network: Callable[..., sandbox.Network]) -> None:
    """Real switch process, raw datagram sockets for members: a member sending frames as a
    peer's MAC neither takes the peer's unicast traffic nor reaches anyone, and a flood of
    random source MACs leaves the switch's table and memory as they were."""
    from sandbox.net import switch

    net = vm_network()
    assert net.path is not None
    pid = int((net.path / "switch.pid").read_text())
    target = str(net.path / "switch.sock")
    macs = {n: bytes([0x52, 0x54, 0, 0, 0, i]) for i, n in enumerate("abc", 2)}
    members = {}
    with tempfile.TemporaryDirectory(prefix="sw", dir="/tmp") as scratch:
        for name, mac in macs.items():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(f"{scratch}/{name}.sock")
            members[name] = sock
            switch.request(net.path, "join", port=f"{scratch}/{name}.sock", mac=mac.hex(":"))
        a, b, c = members["a"], members["b"], members["c"]
        try:
            # c claims b's MAC: to a, and to everyone
            c.sendto(_frame(macs["a"], macs["b"], b"spoof"), target)
            c.sendto(_frame(b"\xff" * 6, macs["b"], b"spoof"), target)
            assert _received(a) == []
            a.sendto(_frame(macs["b"], macs["a"], b"for-b"), target)
            assert _received(b) == [_frame(macs["b"], macs["a"], b"for-b")]  # not stolen
            assert _received(c) == []
            b.sendto(_frame(macs["a"], macs["b"], b"for-a"), target)  # b's own MAC: fine
            assert _received(a) == [_frame(macs["a"], macs["b"], b"for-a")]
            # 200k frames from random source MACs: nothing learnt, memory bounded
            before = _rss_kib(pid)
            c.settimeout(60)  # a busy host's switch may drain its queue late; never block forever
            for _ in range(200_000):
                c.sendto(_frame(b"\xff" * 6, bytes([0x52]) + os.urandom(5)), target)
            answer = switch.request(net.path, "ping")
            assert answer["ports"] == 3 and answer["macs"] == 3
            grown = _rss_kib(pid) - before
            assert grown < 4096, f"the switch grew by {grown} KiB"
            with pytest.raises(ValueError, match="not a unicast MAC"):
                switch.request(net.path, "join", port=f"{scratch}/d.sock",
                               mac="01:00:5e:00:00:01")
            with pytest.raises(ValueError, match="'mac'"):
                switch.request(net.path, "join", port=f"{scratch}/d.sock")
            for n in range(3, switch.MAX_PORTS):  # the table is capped
                switch.request(net.path, "join", port=f"{scratch}/p{n}.sock",
                               mac=f"52:54:01:00:{n >> 8:02x}:{n & 255:02x}")
            with pytest.raises(ValueError, match=f"{switch.MAX_PORTS} ports already"):
                switch.request(net.path, "join", port=f"{scratch}/full.sock",
                               mac="52:54:02:00:00:01")
        finally:
            for sock in members.values():
                sock.close()


def test_a_clone_taking_a_peers_mac_steals_nothing(
        built_image: dict[str, Any], vm_factory: Factory,
        vm_network: Callable[..., sandbox.Network]) -> None:
    """c sets its NIC to b's MAC and keeps broadcasting from it: the switch drops c's frames
    (the MAC of c's port is the one the host gave it), so what a sends b still reaches b."""
    net = vm_network()
    a, b, c = (vm_factory(name=n, networks=[net]) for n in ("a", "b", "c"))
    serve(b, "from-b")
    mac_b = b.succeed("cat /sys/class/net/eth1/address").strip()
    broadcast = net.subnet.broadcast_address
    c.succeed(f"ip link set eth1 address {mac_b} && systemd-run --unit spoof python3 -c "
              "\"import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
              "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\nwhile True:\n"
              f" s.sendto(b'spoof', ('{broadcast}', 9)); time.sleep(0.01)\"")
    c.wait_until_succeeds("systemctl is-active spoof", timeout=10)
    time.sleep(0.5)
    for _ in range(5):
        assert probe(a, "b").stdout.strip() == "from-b"


def test_a_named_network_survives_down_up_and_a_killed_switch(
        built_image: dict[str, Any]) -> None:
    """`down` then `up` on the same named network at once, and again and again around the
    grace the switch gives its last member (`up` started 1 to 2.8 s after the `down`, so it
    finds the switch and joins it after the grace): the network is there for each new
    machine. A switch killed while a member runs is started again by the next `up`, and
    knows the old member."""
    from sandbox.net.named_network import networks_dir

    from .conftest import sandbox_cli

    network, tag = f"grace{os.getpid()}", os.getpid()
    path = networks_dir() / network
    names = [f"m{n}-{tag}" for n in range(6)]

    def up(name: str) -> None:
        result = sandbox_cli("up", name, "--network", network)
        assert result.returncode == 0, result.stderr

    try:
        up(names[0])
        for previous, name, wait in zip(names[:4], names[1:5], (0, 1.0, 2.0, 2.8), strict=True):
            assert sandbox_cli("down", previous).returncode == 0
            time.sleep(wait)
            up(name)
        from sandbox.net import switch

        assert switch.request(path, "ping")["ports"] == 1  # those gone left it
        old = int((path / "switch.pid").read_text())
        os.kill(old, signal.SIGKILL)
        while Path(f"/proc/{old}").exists():
            time.sleep(0.05)
        up(names[5])
        assert int((path / "switch.pid").read_text()) != old
        assert switch.request(path, "ping")["ports"] == 2  # the running one joined again
        for source, target in ((names[4], names[5]), (names[5], names[4])):
            reach = sandbox_cli("exec", source, "--", "python3", "-c", "import socket; "
                                f"socket.create_connection(('{target}', 22), 5)")
            assert reach.returncode == 0, reach.stderr
    finally:
        for name in names:
            sandbox_cli("down", name)
    deadline = time.monotonic() + 15  # the switch ends a few seconds after its last member
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not path.exists()


def test_a_named_network_held_by_another_command_is_a_network_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.net import named_network, switch

    network = f"held{os.getpid()}"
    path = named_network.networks_dir() / network
    monkeypatch.setattr(named_network, "LOCK_TIMEOUT", 0.3)
    try:
        with switch.network_lock(path, 1), pytest.raises(
                NetworkError, match=f"network {network} stayed locked for 0.3 s by another "
                "sandbox command; try again"):
            named_network.ensure(network)
    finally:
        with switch.network_lock(path, 1):  # as the switch does: removed under the lock
            shutil.rmtree(path)


def test_a_network_lock_waiter_starts_over_when_the_directory_goes(tmp_path: Path) -> None:
    """The switch removes its directory, lock file included, under the lock: a command that
    was waiting for that lock then holds the lock of a new directory, not the removed one."""
    import threading

    from sandbox.net import switch

    path, held, events = tmp_path / "net", threading.Event(), []

    def waiter() -> None:
        held.wait()
        with switch.network_lock(path, 5):
            events.append((path / "lock").exists())  # the lock file at the path, not gone

    thread = threading.Thread(target=waiter)
    thread.start()
    with switch.network_lock(path, 1):
        held.set()
        time.sleep(0.3)  # the waiter opened the old lock file and waits on it
        shutil.rmtree(path)
    thread.join(10)
    assert events == [True]
    with pytest.raises(TimeoutError), switch.network_lock(path, 0), \
            switch.network_lock(path, 0):  # it is a lock still
        pass
