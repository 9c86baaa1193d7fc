"""A suite whose setup is slow, made once: install a service, seed its database, start it.

The ``inventory`` fixture saves that machine as a template (once per host and key: the key
follows the app's files, so editing them makes a new one); every test then gets a clone of
it in about a second, with the service running and the data seeded, and may change anything.
"""

import json
from pathlib import Path

import pytest

import sandbox

APP = Path(__file__).parent / "app"
#: Items seeded: about 20 s of setup under TCG on 2 cores.
ROWS = 60000


@pytest.fixture(scope="session")
def inventory(vm_template):
    def setup(vm):
        vm.push(APP, "/opt/src")
        vm.succeed(f"ROWS={ROWS} /opt/src/install.sh", timeout=900)

    return vm_template("inventory", setup, key=sandbox.content_key(APP, str(ROWS)))


def get(vm, path):
    return json.loads(vm.succeed(f"python3 -c \"import urllib.request; print(urllib.request."
                                 f"urlopen('http://127.0.0.1:8080{path}').read().decode())\""))


def order(vm, item, qty):
    return vm.run(f"python3 -c \"import urllib.request as u; print(u.urlopen(u.Request("
                  f"'http://127.0.0.1:8080/order/{item}/{qty}', method='POST')).status)\"")


def test_the_service_is_up_with_the_seeded_data(vm_factory, inventory):
    vm = vm_factory(template=inventory)
    assert get(vm, "/stats")["items"] == ROWS
    assert get(vm, "/items/1")["name"] == "item-000001"


def test_an_order_takes_stock(vm_factory, inventory):
    vm = vm_factory(template=inventory)
    before = get(vm, "/items/7")["stock"]
    assert order(vm, 7, 1).stdout.strip() == "201"
    assert get(vm, "/items/7")["stock"] == before - 1


def test_an_order_beyond_the_stock_is_refused(vm_factory, inventory):
    vm = vm_factory(template=inventory)
    stock = get(vm, "/items/9")["stock"]
    assert "409" in order(vm, 9, stock + 1).stderr
    assert get(vm, "/items/9")["stock"] == stock


def test_wiping_the_database_touches_this_clone_only(vm_factory, inventory):
    vm = vm_factory(template=inventory)
    vm.succeed("python3 -c \"import sqlite3; db = sqlite3.connect('/var/lib/inventory/db.sqlite');"
               " db.execute('DELETE FROM items'); db.commit()\"")
    assert get(vm, "/stats")["items"] == 0
    other = vm_factory(template=inventory)  # a sibling clone still has everything
    assert get(other, "/stats")["items"] == ROWS


@pytest.mark.vm(template="inventory")
def test_a_crashed_service_is_restarted(vm, inventory):
    vm.succeed("systemctl kill --signal=KILL inventory")
    vm.wait_until_succeeds("systemctl is-active inventory", timeout=60)
    vm.wait_for_port(8080, timeout=60)
    assert get(vm, "/stats")["items"] == ROWS


def test_stopping_the_service_is_undone_by_the_next_clone(vm_factory, inventory):
    vm = vm_factory(template=inventory)
    vm.succeed("systemctl stop inventory")
    vm.fail("python3 -c \"import urllib.request; urllib.request.urlopen("
            "'http://127.0.0.1:8080/stats')\"")
    assert get(vm_factory(template=inventory), "/stats")["items"] == ROWS
