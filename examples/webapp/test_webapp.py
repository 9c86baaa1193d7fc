"""Push a web service from the host into a fresh VM, install it, test it through a port."""

import json
import urllib.request
from pathlib import Path

APP = Path(__file__).parent / "app"


def test_service_starts_and_answers(vm):
    vm.push(APP, "/opt/app")
    vm.succeed("/opt/app/install.sh")
    vm.wait_for_unit("webapp.service", timeout=60)
    vm.wait_for_port(8080, timeout=60)
    port = vm.forward(8080)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        assert response.status == 200
        assert json.load(response)["status"] == "ok"


def test_unknown_path_is_404(vm):
    vm.push(APP, "/opt/app")
    vm.succeed("/opt/app/install.sh")
    vm.wait_for_port(8080, timeout=60)
    status = vm.succeed("python3 -c \"import urllib.request, urllib.error\n"
                        "try: urllib.request.urlopen('http://127.0.0.1:8080/nope')\n"
                        "except urllib.error.HTTPError as e: print(e.code)\"")
    assert status.strip() == "404"
