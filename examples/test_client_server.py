"""Two machines: a server, and a client that reaches it through the host.

Machines share no network (each is isolated). The server's port is forwarded to the host's
loopback; a client with network="user" reaches the host's loopback at 10.0.2.2.
"""

import pytest


@pytest.mark.vm(network="user")
def test_client_talks_to_server(vm_factory):
    server, client = vm_factory(network="restricted"), vm_factory()
    server.succeed("mkdir -p /srv && echo hello-from-server > /srv/index.html && "
                   "cd /srv && nohup python3 -m http.server 8000 >/dev/null 2>&1 &")
    server.wait_for_port(8000, timeout=60)
    port = server.forward(8000)
    page = client.wait_until_succeeds(
        f"python3 -c \"import urllib.request; "
        f"print(urllib.request.urlopen('http://10.0.2.2:{port}/').read().decode())\"",
        timeout=60)
    assert page.strip() == "hello-from-server"
    # And the server, with the default restricted network, cannot reach the client's host.
    server.fail(f"python3 -c \"import socket; socket.create_connection(('10.0.2.2', {port}), 3)\"")
