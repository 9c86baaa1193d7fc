"""Twenty tests, each in its own VM: the suite behind the plugin's timing figure.

    .venv/bin/pytest bench/suite20 -q            # serial
    .venv/bin/pytest bench/suite20 -q -n 2       # two xdist workers
"""

import pytest


@pytest.mark.parametrize("n", range(20))
def test_fresh_vm_each_time(vm, n):
    vm.fail("test -e /root/seen")            # nothing from another test is visible
    vm.succeed(f"echo {n} > /root/seen")
    assert vm.succeed("cat /root/seen") == f"{n}\n"
