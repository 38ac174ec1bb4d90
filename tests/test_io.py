"""mopoe.io's run lock with real processes: two contend for one folder, a SIGKILLed holder's lock is taken over."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mopoe.io import LOCK_FILE, RunLockedError, clean_stale_temp, expand_path, run_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}

CONTENDER = textwrap.dedent("""
    import os, sys, time
    from mopoe.io import RunLockedError, run_lock
    folder, gate = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(gate): time.sleep(0.001)          # start together
    try:
        with run_lock(folder):
            print("got", os.getpid(), flush=True)
            time.sleep(1.5)                                    # hold it while the other one tries
    except RunLockedError as e:
        print("refused", e.pid, "|", e, flush=True)
""")


def _spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def test_two_processes_contend_for_one_folder(tmp_path):
    folder, gate = tmp_path / "run", tmp_path / "gate"
    procs = [_spawn(CONTENDER, folder, gate) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]   # both imported, waiting at the gate
    gate.write_text("go")
    outs = [p.communicate(timeout=60) for p in procs]
    lines = [o.strip() for o, err in outs]
    assert all(p.returncode == 0 for p in procs), [err for o, err in outs]
    got = [line for line in lines if line.startswith("got")]
    refused = [line for line in lines if line.startswith("refused")]
    assert len(got) == 1 and len(refused) == 1, lines
    winner = int(got[0].split()[1])
    assert refused[0].split()[1] == str(winner)                # RunLockedError.pid is the winner's
    assert f"PID {winner}" in refused[0] and str(folder) in refused[0]


def test_sigkilled_holder_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    holder = _spawn("import sys, time\nfrom mopoe.io import run_lock\nwith run_lock(sys.argv[1]):\n"
                    "    print('locked', flush=True); time.sleep(120)", folder)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        with run_lock(folder): pass
    holder.send_signal(signal.SIGKILL); holder.wait(timeout=30)
    assert (folder / LOCK_FILE).exists()                       # the file stays; the kernel released the flock
    with run_lock(folder) as held:
        assert held.stale["pid"] == holder.pid                 # the killed holder's record, reported
        # while this process holds it, another process is refused and told this PID
        probe = subprocess.run([sys.executable, "-c",
                                "import sys\nfrom mopoe.io import run_lock\nwith run_lock(sys.argv[1]): pass",
                                str(folder)], capture_output=True, text=True, env=ENV, timeout=60)
        assert probe.returncode != 0 and "RunLockedError" in probe.stderr and f"PID {os.getpid()}" in probe.stderr


def test_expand_path_and_cleaning(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOPOE_RUNS", "$HOME/runs")           # a value with $: kept as it is (expanded once)
    assert expand_path("~/r1") == str(tmp_path / "r1")
    assert expand_path("$MOPOE_RUNS/a") == "$HOME/runs/a"
    run = Path(expand_path("~/r1")); run.mkdir()
    (run / ".checkpoint.pt.new").write_bytes(b"0" * 10); (run / ".results.json.ab12cd.tmp").write_text("{")
    with pytest.raises(RuntimeError, match="hold run_lock"): clean_stale_temp(run)
    with run_lock("~/r1"):
        assert [p.name for p in clean_stale_temp("~/r1")] == [".checkpoint.pt.new", ".results.json.ab12cd.tmp"]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
