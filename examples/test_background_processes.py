"""Background processes and live output.

``vm.spawn()`` starts a server (or any long-running command) and returns a handle at once;
the test talks to it with ``run()`` while it runs, reads what it printed so far, and stops it.
``run(on_output=...)`` sees a command's output while it is still running. Run this file with
``pytest -s`` to watch each command's output live, prefixed with its VM's name.
"""

from __future__ import annotations

import signal

from pytest_smolvm import SmolVM

FETCH = """
import time, urllib.request
for _ in range(300):
    try:
        print(urllib.request.urlopen("http://127.0.0.1:8000/motd").read().decode()); break
    except OSError:
        time.sleep(0.1)
"""


def test_a_server_in_the_background(smolvm: SmolVM) -> None:
    smolvm.put(b"hello from a spawned server\n", "/srv/motd")
    with smolvm.spawn("python3 -m http.server 8000 --bind 127.0.0.1", cwd="/srv") as server:
        r = smolvm.run(["python3", "-c", FETCH], timeout=60)
        assert r.stdout == "hello from a spawned server\n\n"
        assert server.poll() is None                      # still serving
        server.kill(signal.SIGTERM)
        result = server.wait(timeout=10)
    assert result.exit_code == -signal.SIGTERM
    assert "GET /motd" in result.stderr                   # http.server logs requests on stderr


def test_talk_to_a_process_on_its_stdin(smolvm: SmolVM) -> None:
    p = smolvm.spawn(["python3", "-u", "-c", "import sys\nfor line in sys.stdin: print(line.upper(), end='')"])
    p.write_stdin("first line\n")
    p.write_stdin("second line\n")
    p.close_stdin()
    assert p.wait(timeout=30).stdout == "FIRST LINE\nSECOND LINE\n"


def test_watch_output_as_it_arrives(smolvm: SmolVM) -> None:
    progress: list[str] = []
    smolvm.run("for i in 1 2 3; do echo step $i; sleep 0.2; done",
               on_output=lambda stream, text: progress.append(text))
    assert "".join(progress) == "step 1\nstep 2\nstep 3\n"
    assert len(progress) > 1                              # it came in pieces, as printed
