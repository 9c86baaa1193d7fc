"""Failover on a private network: two servers share a virtual address with keepalived (VRRP);
the primary's link is cut; the client is served by the backup within a bound.

The servers and the client are clones on one private network (vm_network); the image is
this directory's recipe (Debian 12 with keepalived).
"""

from pathlib import Path

import pytest

RECIPE = Path(__file__).parent / "failover.toml"
#: How long the client may go unserved after the primary is cut off (VRRP adverts every
#: 0.2 s: the backup takes over after about 3 missed ones).
BOUND = 5.0

KEEPALIVED = """
global_defs {{
    vrrp_version 3
}}
vrrp_instance web {{
    state {state}
    interface eth1
    virtual_router_id 51
    priority {priority}
    advert_int 0.2
    virtual_ipaddress {{
        {vip}/24
    }}
}}
"""

#: Answers every connection on port 7000 with this machine's name.
SERVE = ("systemd-run --unit hello python3 -c \"import socket; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 7000)); "
         "s.listen()\nwhile True:\n c, _ = s.accept(); "
         "c.sendall(open('/etc/hostname', 'rb').read()); c.close()\"")

#: The client: ask the virtual address every 50 ms for 30 s; log (time, answer).
CLIENT = """
import socket, sys, time
end = time.time() + 30
with open("/root/answers", "w", buffering=1) as log:
    while time.time() < end:
        try:
            with socket.create_connection((sys.argv[1], 7000), 0.2) as s:
                log.write(f"{time.time()} {s.recv(64).decode().strip()}\\n")
        except OSError:
            log.write(f"{time.time()} -\\n")
        time.sleep(0.05)
"""


def start_server(vm, state, priority, vip):
    vm.succeed(f"echo {vm.name} > /etc/hostname && {SERVE}")
    vm.succeed(f"cat > /etc/keepalived/keepalived.conf <<'EOF'\n"
               f"{KEEPALIVED.format(state=state, priority=priority, vip=vip)}EOF\n"
               "systemctl start keepalived")


@pytest.mark.vm(image=str(RECIPE))
def test_the_backup_serves_when_the_primary_is_cut_off(vm_factory, vm_network):
    lan = vm_network()
    primary = vm_factory(name="primary", networks=[lan])
    backup = vm_factory(name="backup", networks=[lan])
    client = vm_factory(name="client", networks=[lan])
    vip = str(lan.subnet.network_address + 250)
    start_server(primary, "MASTER", 150, vip)
    start_server(backup, "BACKUP", 100, vip)
    primary.wait_until_succeeds(f"ip -br addr show eth1 | grep -q {vip}", timeout=30)

    client.succeed(f"cat > /root/client.py <<'EOF'\n{CLIENT}EOF\n"
                   f"systemd-run --unit client python3 /root/client.py {vip}")
    client.wait_until_succeeds("grep -q primary /root/answers", timeout=30)
    cut = float(client.succeed("date +%s.%N"))
    primary.block(lan)
    client.wait_until_succeeds("grep -q backup /root/answers", timeout=30)

    answers = [line.split() for line in client.succeed("cat /root/answers").splitlines()]
    last_primary = max(float(t) for t, who in answers if who == "primary")
    first_backup = min(float(t) for t, who in answers if who == "backup" and float(t) > cut)
    gap = first_backup - max(last_primary, cut)
    print(f"\nswitch-over: the client was served by the backup {gap:.2f} s after the cut")
    assert gap < BOUND
    assert backup.succeed(f"ip -br addr show eth1 | grep -c {vip}") == "1\n"
