"""The pytest plugin, driven through pytester: real guests behind the fixtures."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import sandbox_cli

pytest_plugins = ["pytester"]


def test_vm_fixture_passes_and_cleans_up(pytester: pytest.Pytester,
                                         built_image: dict[str, Any]) -> None:
    pytester.makepyfile("""
        def test_uname(vm):
            assert vm.succeed("uname -s") == "Linux\\n"

        def test_two(vm_factory):
            a, b = vm_factory(), vm_factory()
            a.succeed("touch /root/only-a")
            b.fail("test -e /root/only-a")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_tests_without_fixtures_start_nothing(pytester: pytest.Pytester, tmp_path: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_plain():\n    assert 1 + 1 == 2\n")
    monkeypatch.setenv("SANDBOX_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("SANDBOX_CACHE_DIR", str(tmp_path / "cache"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (tmp_path / "runtime").exists()
    assert not (tmp_path / "cache").exists()


def test_failure_report_shows_console_and_commands(pytester: pytest.Pytester,
                                                   built_image: dict[str, Any]) -> None:
    pytester.makepyfile("""
        def test_broken(vm):
            vm.run("echo diagnostic-output; exit 7")
            vm.succeed("cat /etc/no-such-config")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-log-dir=logs")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    logs = sorted(p.name for p in (pytester.path / "logs").iterdir())
    assert len(logs) == 2 and logs[0].endswith(".commands.log")
    assert "sandbox-guest: ready" in (pytester.path / "logs" / logs[1]).read_text()
    assert re.search(r"sandbox vm\d+: console tail", text)
    assert "sandbox-guest: ready" in text
    assert re.search(r"sandbox vm\d+: guest commands", text)
    assert "$ echo diagnostic-output; exit 7    [exit 7" in text
    assert "diagnostic-output" in text
    assert "$ cat /etc/no-such-config    [exit 1" in text
    assert "No such file or directory" in text


def test_keep_on_failure_leaves_the_vm_reachable(pytester: pytest.Pytester,
                                                 built_image: dict[str, Any]) -> None:
    pytester.makepyfile("""
        def test_keep_me(vm):
            vm.succeed("echo evidence > /root/evidence")
            assert False, "fails on purpose"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "--sandbox-keep-on-failure")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "kept VM test_keep_me" in text
    assert "sandbox ssh test_keep_me" in text
    assert re.search(r"ssh -i \S+/images/[^/ ]+/client_key -p \d+ .*root@127.0.0.1", text)
    try:
        listed = json.loads(sandbox_cli("list", "--format", "json").stdout)
        assert [m["status"] for m in listed if m["name"] == "test_keep_me"] == ["running"]
        shown = sandbox_cli("exec", "test_keep_me", "--", "cat", "/root/evidence")
        assert (shown.returncode, shown.stdout) == (0, "evidence\n")
    finally:
        assert sandbox_cli("down", "test_keep_me").returncode == 0
    assert "test_keep_me" not in sandbox_cli("list").stdout


def test_option_precedence_marker_then_cli_then_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        sandbox_memory = 768M
        sandbox_cpus = 3
        sandbox_image = from-ini
    """)
    pytester.makepyfile("""
        import pytest
        from sandbox.plugin import machine_shape

        def test_defaults(request):
            assert machine_shape(request) == {"memory": "1536M", "cpus": 3, "image": "from-ini"}

        @pytest.mark.vm(memory="2G", network="user")
        def test_marker(request):
            shape = machine_shape(request)
            assert shape == {"memory": "2G", "cpus": 3, "image": "from-ini", "network": "user"}
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-memory", "1536M")
    result.assert_outcomes(passed=2)


def test_cpu_from_marker_option_and_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini("""
        [pytest]
        sandbox_cpu = Nehalem
    """)
    pytester.makepyfile("""
        import pytest
        from sandbox.plugin import machine_shape
        from sandbox.vm.spec import MachineSpec

        def test_ini(request):
            assert machine_shape(request) == {"cpu": "Nehalem"}

        @pytest.mark.vm(cpu="x86-64-v3")
        def test_marker(request):
            assert MachineSpec.from_kwargs(**machine_shape(request)).cpu == "x86-64-v3"

        @pytest.mark.vm(cpu="Haswell,+avx2")
        def test_bad(vm):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*cpu: CPU model 'Haswell,+avx2' is not a model name*"])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-cpu=max",
                                           "-k", "test_marker")
    result.assert_outcomes(passed=1)


def test_unknown_marker_argument_is_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vm(memroy="2G")
        def test_typo(vm):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown machine option(s) 'memroy'*"])


def test_hooks_adjust_prepare_and_see_the_outcome(pytester: pytest.Pytester,
                                                  built_image: dict[str, Any]) -> None:
    pytester.makeconftest("""
        OUTCOMES = []

        def pytest_sandbox_spec(shape, node):
            shape["network"] = "user"

        def pytest_sandbox_ready(machine, node):
            machine.succeed("echo installed > /root/app")

        def pytest_sandbox_teardown(machine, node, failed):
            OUTCOMES.append((node.name, failed, machine.succeed("cat /root/app").strip()))

        def pytest_sessionfinish(session):
            print("OUTCOMES", sorted(OUTCOMES))
    """)
    pytester.makepyfile("""
        def test_ok(vm):
            assert vm.spec.network == "user"
            assert vm.succeed("cat /root/app") == "installed\\n"

        def test_bad(vm):
            assert False
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1, failed=1)
    assert ("OUTCOMES [('test_bad', True, 'installed'), ('test_ok', False, 'installed')]"
            in result.stdout.str())


def test_xdist_two_workers_share_the_golden_snapshot(pytester: pytest.Pytester,
                                                     built_image: dict[str, Any]) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_each_in_its_own_vm(vm, n):
            vm.fail("test -e /root/marker")
            vm.succeed(f"echo {n} > /root/marker")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=6)


def test_every_machine_is_closed_even_when_a_teardown_hook_raises(
        pytester: pytest.Pytester, built_image: dict[str, Any]) -> None:
    pytester.makeconftest("""
        def pytest_sandbox_teardown(machine, node, failed):
            raise RuntimeError("a teardown hook broke")
    """)
    pytester.makepyfile("""
        from pathlib import Path

        def test_two(vm_factory):
            a, b = vm_factory(), vm_factory()
            Path("pids").write_text(f"{a.pid} {b.pid}")

        def test_then_both_are_gone():  # in the same process, before it exits
            import os, time
            pids = [int(p) for p in Path("pids").read_text().split()]
            time.sleep(1)
            assert len(pids) == 2
            assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    assert "a teardown hook broke" in result.stdout.str()


def test_vm_template_is_made_once_for_all_workers_and_runs(
        pytester: pytest.Pytester, built_image: dict[str, Any], tmp_path: Path) -> None:
    import sandbox

    name, log = f"plugin-tpl-{os.getpid()}", tmp_path / "setups.log"
    pytester.makeconftest(f"""
        import pytest

        @pytest.fixture(scope="session")
        def prepared(vm_template):
            def seed(vm):
                with open({str(log)!r}, "a") as setups:
                    setups.write("setup\\n")
                vm.succeed("echo seeded > /root/data")
            return vm_template({name!r}, [seed, "systemd-run --unit idler sleep 1d"], key="k")
    """)
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_from_the_factory(vm_factory, prepared, n):
            vm = vm_factory(template=prepared)
            assert vm.succeed("cat /root/data") == "seeded\\n"
            vm.succeed("systemctl is-active idler && echo changed > /root/data")

        @pytest.mark.vm(template={name!r})
        def test_from_the_marker(vm, prepared):
            assert vm.succeed("cat /root/data") == "seeded\\n"
    """)
    try:
        for _ in range(2):  # the second run reuses what the first made
            result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
            result.assert_outcomes(passed=5)
        assert log.read_text() == "setup\n"
        assert len([t for t in sandbox.templates() if t.name == name]) == 1
    finally:
        sandbox.remove_template(name)


def test_keep_on_failure_keeps_nothing_of_a_killed_run(pytester: pytest.Pytester,
                                                       built_image: dict[str, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--sandbox-keep-on-failure keeps the VMs of a test that failed, and only those: a
    pytest SIGKILLed in the middle of a test (which has not failed) leaves no QEMU behind."""
    import subprocess
    import sys
    import tempfile
    import time

    from .conftest import clean_up_run, kill_and_expect_no_qemu, qemu_processes

    runtime = Path(tempfile.mkdtemp(prefix="keep-run-"))
    monkeypatch.setenv("SANDBOX_RUNTIME_DIR", str(runtime))
    started = pytester.path / "started"
    pytester.makepyfile(f"""
        import pathlib, time

        def test_still_running(vm_factory):
            a, b = vm_factory(), vm_factory()
            a.succeed("true")
            pathlib.Path({str(started)!r}).write_text("up")
            time.sleep(600)
    """)
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                            "--sandbox-keep-on-failure"], cwd=pytester.path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not started.exists():
            assert run.poll() is None and time.monotonic() < deadline, "the VMs never started"
            time.sleep(0.1)
        assert len(qemu_processes(str(runtime))) == 2
        kill_and_expect_no_qemu(run, str(runtime), "a VM outlived its killed pytest")
    finally:
        clean_up_run(run, runtime)


def test_a_comma_in_the_runtime_directory_and_names_refused_before_a_start(
        pytester: pytest.Pytester, built_image: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's option strings end a value at a comma: a runtime directory with one still
    runs clones (from the usual cache), and a machine name that would break out of its
    option, or out of the run directory, is refused before anything starts."""
    import shutil
    import tempfile

    runtime = Path(tempfile.mkdtemp(prefix="a,b-"))
    monkeypatch.setenv("SANDBOX_RUNTIME_DIR", str(runtime))
    pytester.makepyfile(f"""
        import pathlib
        import pytest
        from sandbox.errors import MachineNameError

        def test_clone_under_a_comma(vm_factory):
            vm = vm_factory(name="db")
            assert "," in str(vm.dir) and vm.succeed("echo ok") == "ok\\n"
            vm.snapshot("s1")
            vm.restore("s1")
            assert vm.succeed("hostname") != ""

        @pytest.mark.parametrize("name", ["db,x=y", "../x"])
        def test_bad_name(vm_factory, name):
            with pytest.raises(MachineNameError, match="use 1 to 63 letters"):
                vm_factory(name=name)
            runs = list(pathlib.Path({str(runtime)!r}).glob("run-*/*"))
            assert runs == [] or all(p.name == "owner.json" for p in runs), runs
    """)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
        result.assert_outcomes(passed=3)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_failure_reports_reach_pytest_html_and_junit_xml(pytester: pytest.Pytester,
                                                         built_image: dict[str, Any]) -> None:
    """With pytest-html, a failing test's console tail and transcript are collapsible,
    escaped HTML extras of its row; JUnit XML carries them in system-out (junit_logging)."""
    import xml.etree.ElementTree as ElementTree
    from html.parser import HTMLParser

    pytester.makepyfile("""
        def test_broken(vm):
            vm.run("echo '<b>not bold</b>'")
            assert vm.succeed("cat /etc/hostname") == "elsewhere\\n"
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--html=report.html", "--self-contained-html",
        "--junitxml=junit.xml", "-o", "junit_logging=system-out")
    result.assert_outcomes(failed=1)

    class Page(HTMLParser):
        """The report's data blob (pytest-html renders its rows from it)."""
        blob = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            found = dict(attrs)
            if found.get("id") == "data-container":
                self.blob = found.get("data-jsonblob") or ""

    page = Page()
    page.feed((pytester.path / "report.html").read_text())
    tests = json.loads(page.blob)["tests"]
    (row,) = [r for rows in tests.values() for r in rows if r["result"] == "Failed"]
    fragments = [extra["content"] for extra in row["extras"] if extra["format_type"] == "html"]

    class Blocks(HTMLParser):
        """<details><summary>TITLE</summary><pre>TEXT</pre></details> blocks, and any
        element that appeared inside a <pre> (there must be none: the text is escaped)."""

        def __init__(self) -> None:
            super().__init__()
            self.blocks: dict[str, str] = {}
            self.inside_pre: list[str] = []
            self.stack: list[str] = []
            self.title = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if "pre" in self.stack:
                self.inside_pre.append(tag)
            self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            if self.stack and self.stack[-1] == tag:
                self.stack.pop()

        def handle_data(self, data: str) -> None:
            if self.stack[-2:] == ["details", "summary"]:
                self.title = data
            elif self.stack[-2:] == ["details", "pre"]:
                self.blocks[self.title] = self.blocks.get(self.title, "") + data

    blocks = Blocks()
    for fragment in fragments:
        blocks.feed(fragment)
    titles = sorted(blocks.blocks)
    assert len(titles) == 2 and titles[0].endswith(": console tail"), titles
    assert "sandbox-guest: ready" in blocks.blocks[titles[0]]
    transcript = blocks.blocks[titles[1]]
    assert titles[1].endswith(": guest commands")
    assert "<b>not bold</b>" in transcript and blocks.inside_pre == []
    assert "$ cat /etc/hostname    [exit 0" in transcript

    (case,) = ElementTree.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    out = case.findtext("system-out") or ""
    assert "console tail" in out and "sandbox-guest: ready" in out
    assert "<b>not bold</b>" in out
