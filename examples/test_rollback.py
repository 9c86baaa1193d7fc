"""Roll one machine back inside a test with snapshot/restore."""


def test_rollback_after_a_destructive_step(vm):
    vm.succeed("mkdir -p /var/lib/app && echo v1 > /var/lib/app/schema")
    vm.snapshot("before-migration")
    vm.succeed("echo v2 > /var/lib/app/schema && rm -rf /usr/share/doc")
    assert vm.succeed("cat /var/lib/app/schema") == "v2\n"
    vm.restore("before-migration")
    assert vm.succeed("cat /var/lib/app/schema") == "v1\n"
    vm.succeed("test -d /usr/share/doc")
