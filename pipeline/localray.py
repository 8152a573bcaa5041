"""Start and stop a single-machine Ray head on 127.0.0.1 -- and only that one.

    python -m pipeline.localray start STATE_DIR [--port 6379] [--dashboard-port 8265] [--num-cpus N]
    eval "$(python -m pipeline.localray env STATE_DIR)"     # RAY_ADDRESS etc. for `ray job submit`
    python -m pipeline.localray stop STATE_DIR

For the demo and the tests. `ray stop` ends every Ray process on the machine; this stops exactly the processes
started here: each carries OLAF_LOCAL_RAY=<id> in its environment, inherited from `ray start`. The head runs in
single-node mode (everything binds and talks on 127.0.0.1), sends no usage statistics, and requires a token
(RAY_AUTH_MODE=token) kept in STATE_DIR/auth_token.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

MARKER = "OLAF_LOCAL_RAY"
TEMP_MARK = ".olaf-localray"  # in the head's temp dir: the proof that this module made it (stop removes no other)
# The one copy of what a Ray on this machine alone needs (Ray reads it at import time; its workers inherit it):
# single-node mode, so that it binds and talks on 127.0.0.1 only (else it picks the default route's address),
# and no usage statistics sent anywhere.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class LocalRayError(Exception):
    """A state folder this module cannot act on; the message says what to do."""


def read_state(state: Path) -> dict | None:
    """STATE_DIR/state.json, checked (None when there is none): a damaged one names no processes and no folder
    this module may touch."""
    f = state / "state.json"
    if not f.is_file():
        return None
    try:
        info = json.loads(f.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        for key, kind in (("marker", str), ("temp_dir", str), ("dashboard_port", int)):
            if not isinstance(info.get(key), kind):
                raise ValueError(f"{key} is {info.get(key)!r}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LocalRayError(f"{f} is damaged ({str(e).splitlines()[0][:120]}): it cannot say which processes and "
                            f"folder are its head's, so nothing was stopped or removed. Stop that head by hand (its "
                            f"processes carry {MARKER}=<marker> in their environment), then delete {f}") from None
    return info


def ray_env(state: Path) -> dict[str, str]:
    """What every process talking to this head needs (Ray reads these at import time)."""
    info = read_state(state)
    if info is None:
        raise LocalRayError(f"{state} describes no running head: start one with python -m pipeline.localray start "
                            f"{state}")
    return {
        **LOOPBACK_ENV,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(state / "auth_token"),
        "RAY_ADDRESS": f"http://127.0.0.1:{info['dashboard_port']}",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str, token: str | None = None) -> bool:
    """Whether an HTTP server answers at `url` (any status: it is up)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def start(state: Path, port: int = 6379, dashboard_port: int = 8265, num_cpus: int | None = None,
          timeout: float = 120) -> dict:
    """Start the head and return once it takes jobs: its dashboard answers and so does the node's job agent.
    The agent and the Ray Client server get free ports (Ray's fixed defaults, 52365 and 10001, would collide
    with any other Ray on the machine, and the job server would then answer "No available agent")."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    if (state / "state.json").exists():
        raise SystemExit(f"{state} already describes a running head; stop it first (python -m pipeline.localray stop {state})")
    token = state / "auth_token"
    if not token.exists():
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
    temp = tempfile.mkdtemp(prefix="olaf-ray-")  # short: Ray's socket paths must fit in 107 bytes
    marker = f"{os.getpid()}-{secrets.token_hex(4)}"
    (Path(temp) / TEMP_MARK).write_text(marker)
    agent_port = _free_port()
    info = {"marker": marker, "temp_dir": temp, "port": port, "dashboard_port": dashboard_port,
            "agent_port": agent_port}
    (state / "state.json").write_text(json.dumps(info))
    env = {**os.environ, **ray_env(state), MARKER: marker}
    env.pop("RAY_ADDRESS")
    # job entrypoints run `python` from the head's PATH: make it this interpreter's environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--dashboard-agent-listen-port", str(agent_port), "--ray-client-server-port", str(_free_port()),
           "--temp-dir", temp, "--disable-usage-stats"] + (["--num-cpus", str(num_cpus)] if num_cpus else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        stop(state)
        raise SystemExit(f"ray start failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _answers(f"http://127.0.0.1:{dashboard_port}/api/version", token.read_text().strip()) and \
                _answers(f"http://127.0.0.1:{agent_port}/api/local_raylet_healthz"):
            return info
        time.sleep(0.2)
    stop(state)
    raise SystemExit(f"the Ray head on 127.0.0.1:{dashboard_port} did not take jobs within {timeout:.0f} s")


def descendants(roots) -> list[int]:
    """`roots` and every process below them, from /proc (a parent's exit makes its children orphans: take the
    tree before signalling anything)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, out = list(roots), set(roots)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return sorted(out)


def _marked(marker: str) -> list[int]:
    """Processes carrying the marker, and all their descendants (Ray's agents rename themselves with
    setproctitle, which hides their environment, but they are the raylet's children)."""
    needle = f"{MARKER}={marker}".encode()
    marked = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes():
                    marked.add(int(d.name))
            except OSError:
                pass
    return descendants(marked)


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"  # a zombie is dead: only its parent can reap it
    except (OSError, IndexError):
        return False


def _made_here(temp: Path, marker: str) -> bool:
    """Whether `temp` is the folder `start` made for the head of `marker` (its mark file says so)."""
    try:
        return (temp / TEMP_MARK).read_text() == marker
    except (OSError, UnicodeDecodeError):
        return False


def stop(state: Path, grace: float = 5.0) -> int:
    """Stop the head described in STATE_DIR; returns how many processes needed a kill. Its temp dir is removed
    only when the mark `start` left in it proves that this module made it."""
    state = state.resolve()
    f = state / "state.json"
    info = read_state(state)
    if info is None:
        return 0
    pids = _marked(info["marker"])
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):  # once the raylet is gone, its agents are
        # orphans that no longer show as descendants: keep the full list from before the first signal
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while time.time() - t0 < wait and any(_alive(p) for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    temp = Path(info["temp_dir"])
    if _made_here(temp, info["marker"]):
        shutil.rmtree(temp, ignore_errors=True)
    elif temp.exists():
        print(f"note: left {temp} in place: it holds no mark of this head ({TEMP_MARK}), so olaf did not make it",
              file=sys.stderr)
    f.unlink()
    return len(pids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.localray", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a head on 127.0.0.1")
    s.add_argument("state", type=Path)
    s.add_argument("--port", type=int, default=6379)
    s.add_argument("--dashboard-port", type=int, default=8265)
    s.add_argument("--num-cpus", type=int, default=None)
    e = sub.add_parser("env", help="print shell exports for clients of the head")
    e.add_argument("state", type=Path)
    t = sub.add_parser("stop", help="stop exactly the processes of that head")
    t.add_argument("state", type=Path)
    a = p.parse_args(argv)
    try:
        if a.cmd == "start":
            info = start(a.state, a.port, a.dashboard_port, a.num_cpus)
            print(f"Ray head on 127.0.0.1:{info['port']} (jobs: http://127.0.0.1:{info['dashboard_port']})")
        elif a.cmd == "env":
            for k, v in ray_env(a.state.resolve()).items():
                print(f"export {k}={v}")
        else:
            print(f"stopped the Ray head of {a.state} ({stop(a.state)} processes needed a kill)")
    except LocalRayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
