"""`pipeline spot-agent`: a cloud's preemption notice becomes a drain of this Ray node.

A spot VM is taken back with a notice (AWS: 2 minutes; GCP: 30 s) that only the VM's metadata
server tells, and Ray does not listen to it. This agent runs beside `ray start` on every worker
node (cluster.yaml starts it): every few seconds it asks the metadata server, and on a notice it
drains its own Ray node with the notice's deadline and reason PREEMPTION, the call Ray's own
autoscaler makes. Ray Train's PreemptionWatcher polls the draining nodes
(`ray._private.state.state.get_draining_nodes()`, deadline included), so every rank learns of it
through `ray.train.get_preemption_info()` and the run checkpoints before the deadline; the restart
is charged to the preemption budget, not to `max_failures`.

- AWS (IMDSv2): PUT /latest/api/token, then GET /latest/meta-data/spot/instance-action: 404 until
  a notice, then {"action": "terminate" | "stop" | "hibernate", "time": "2026-...Z"}.
- GCP: GET /computeMetadata/v1/instance/preempted (header Metadata-Flavor: Google): "TRUE" once
  the VM is preempted; it stops 30 s later. The deadline counts from the poll that saw it, less
  one poll interval (it may have turned TRUE just after the previous poll).

A metadata server that does not answer is said once (and once when it answers again) and polled
again: the agent never stops, and never stops the node. After a drain is accepted the agent says
one line and exits. It imports neither torch nor ffcv, and Ray only to find and drain its node.

`--drain-now SECONDS` is the Kubernetes side (a worker pod's preStop hook): drain this node at
once with a deadline SECONDS away and wait until it has drained (its raylet exits once no work is
left on it) or the deadline passed.
"""
from __future__ import annotations

import fcntl
import http.client
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

# the same link-local address on AWS and GCP; AWS's own SDKs take another from this variable
# (a test's metadata server on 127.0.0.1, an IMDS proxy)
DEFAULT_ENDPOINT = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "169.254.169.254"
DEFAULT_POLL_SECONDS = 5.0               # AWS suggests every 5 s; Ray Train polls drains every 5 s
DEFAULT_HTTP_TIMEOUT = 2.0
AWS_TOKEN_PATH = "/latest/api/token"
AWS_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_TTL_S = 21600
AWS_NOTICE_S = 120                       # when a notice's time cannot be read
GCP_ROOT_PATH = "/computeMetadata/v1/"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCP_NOTICE_S = 30
PROVIDERS = ("auto", "aws", "gcp")
_HELD: list[int] = []


class MetadataUnavailable(Exception):
    """The metadata server did not answer, or not as it should: poll again later."""


@dataclass(frozen=True)
class Notice:
    provider: str
    action: str
    deadline_ms: int


# -- decisions (plain functions) -------------------------------------------------------------------
def metadata_base(endpoint: str) -> str:
    """'169.254.169.254', '127.0.0.1:8080' or a full http:// URL -> the URL requests start with."""
    endpoint = endpoint.strip().rstrip("/")
    return endpoint if "://" in endpoint else f"http://{endpoint}"


def iso_ms(text: str) -> int | None:
    """'2026-11-29T11:45:00Z' -> milliseconds since the epoch; None if it is not such a time."""
    try:
        when = datetime.fromisoformat(text.strip())
    except (ValueError, AttributeError, TypeError):
        return None
    if when.tzinfo is None:     # IMDS times are UTC
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


def ms_iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def aws_notice(body: str, seen_ms: int) -> Notice:
    """The body of a 200 from spot/instance-action. The instance goes at its `time`; a body
    that cannot be read is still a notice (the endpoint answers 200 only then), taken as AWS's
    2 minutes from now."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        doc = {}
    deadline = iso_ms(str(doc.get("time", "")))
    action = str(doc.get("action") or "terminate")
    return Notice("aws", action, deadline if deadline else seen_ms + AWS_NOTICE_S * 1000)


def gcp_notice(body: str, seen_ms: int, poll_seconds: float) -> Notice | None:
    """The body of instance/preempted: TRUE is a notice, anything else is not."""
    if body.strip().upper() != "TRUE":
        return None
    return Notice("gcp", "preempted", seen_ms + int(max(GCP_NOTICE_S - poll_seconds, 1) * 1000))


def provider_of(aws_token_status: int | None, gcp_status: int | None,
                gcp_flavor: str | None) -> str | None:
    """Which metadata server answered: AWS gives an IMDSv2 token; GCP's answers with the header
    Metadata-Flavor: Google. None: neither (not a cloud VM, or the server is not up yet)."""
    if aws_token_status == 200:
        return "aws"
    if gcp_status == 200 and (gcp_flavor or "").lower() == "google":
        return "gcp"
    return None


def choose_node(explicit: str | None, local_alive: list[str],
                alive_at_ip: list[str]) -> tuple[str | None, str]:
    """This machine's Ray node: the one given, else the one alive node whose raylet runs here,
    else the one alive node at this machine's IP (a raylet in another PID namespace).
    Returns (node id, '') or (None, why not)."""
    if explicit:
        return explicit, ""
    if len(local_alive) == 1:
        return local_alive[0], ""
    if len(local_alive) > 1:
        return None, f"{len(local_alive)} Ray nodes run on this machine: pass --node-id"
    if len(alive_at_ip) == 1:
        return alive_at_ip[0], ""
    if len(alive_at_ip) > 1:
        return None, f"{len(alive_at_ip)} Ray nodes have this machine's IP: pass --node-id"
    return None, "no Ray node runs on this machine (yet)"


def words(exc) -> str:
    """An error in one short line (a timeout's text can be empty)."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def trouble_line(failures_before: int, exc: Exception, base: str) -> str | None:
    """Said once when the metadata server stops answering, not at every poll."""
    if failures_before:
        return None
    return f"[spot] instance metadata at {base} not answering ({exc}); polling on"


def back_line(failures_before: int, base: str) -> str | None:
    if not failures_before:
        return None
    return f"[spot] instance metadata at {base} answers again (after {failures_before} failed polls)"


# -- the metadata server -----------------------------------------------------------------------------
class Metadata:
    """HTTP to the metadata server; never through a proxy (it is link-local)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = DEFAULT_HTTP_TIMEOUT):
        self.base = metadata_base(endpoint)
        self.timeout = timeout
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({})).open

    def request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict, str]:
        """(status, headers, body); MetadataUnavailable when nothing usable came back."""
        req = urllib.request.Request(self.base + path, method=method, headers=headers)
        try:
            with self._open(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read(65536).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers or {}), ""
        except (OSError, http.client.HTTPException, ValueError) as exc:   # refused, timeout, reset
            raise MetadataUnavailable(words(getattr(exc, "reason", None) or exc)) from exc

    def status(self, method: str, path: str, headers: dict[str, str]) -> tuple[int | None, dict]:
        try:
            status, got, _ = self.request(method, path, headers)
            return status, got
        except MetadataUnavailable:
            return None, {}


class AwsWatch:
    provider = "aws"

    def __init__(self, md: Metadata, poll_seconds: float):
        self.md, self.token, self.token_at = md, None, 0.0

    def _token(self) -> str:
        if self.token is None or time.monotonic() - self.token_at > AWS_TOKEN_TTL_S - 300:
            status, _, body = self.md.request(
                "PUT", AWS_TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
            if status != 200 or not body.strip():
                raise MetadataUnavailable(f"IMDSv2 token request answered {status}")
            self.token, self.token_at = body.strip(), time.monotonic()
        return self.token

    def check(self) -> Notice | None:
        for _ in range(2):     # a token the server no longer takes (401): one new token, once
            status, _, body = self.md.request("GET", AWS_NOTICE_PATH,
                                              {"X-aws-ec2-metadata-token": self._token()})
            if status != 401:
                break
            self.token = None
        if status == 404:
            return None
        if status == 200:
            return aws_notice(body, int(time.time() * 1000))
        raise MetadataUnavailable(f"{AWS_NOTICE_PATH} answered {status}")


class GcpWatch:
    provider = "gcp"

    def __init__(self, md: Metadata, poll_seconds: float):
        self.md, self.poll_seconds = md, poll_seconds

    def check(self) -> Notice | None:
        status, _, body = self.md.request("GET", GCP_PREEMPTED_PATH, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise MetadataUnavailable(f"{GCP_PREEMPTED_PATH} answered {status}")
        return gcp_notice(body, int(time.time() * 1000), self.poll_seconds)


WATCHES = {"aws": AwsWatch, "gcp": GcpWatch}


def make_watch(md: Metadata, provider: str, poll_seconds: float):
    if provider == "auto":
        aws, _ = md.status("PUT", AWS_TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        gcp, headers = (None, {}) if aws == 200 else md.status(
            "GET", GCP_ROOT_PATH, {"Metadata-Flavor": "Google"})
        flavor = next((v for k, v in headers.items() if k.lower() == "metadata-flavor"), None)
        provider = provider_of(aws, gcp, flavor)
        if provider is None:
            raise MetadataUnavailable("neither an AWS nor a GCP metadata server answers")
    return WATCHES[provider](md, poll_seconds)


# -- this Ray node -----------------------------------------------------------------------------------
class RayNode:
    """This machine's Ray node, through the GCS (Ray imported only here)."""

    def __init__(self, address: str | None = None, node_id: str | None = None):
        self.address_given, self.explicit = address, node_id

    def _gcs(self):
        import ray._raylet
        from ray._private.services import canonicalize_bootstrap_address

        # --address, else RAY_ADDRESS, else the cluster the last `ray start` here joined
        address = canonicalize_bootstrap_address(self.address_given)
        if not address:
            raise ConnectionError("no Ray cluster address: pass --address HEAD:6379 or set "
                                  "RAY_ADDRESS")
        return ray._raylet.GcsClient(address=address), address

    def _alive(self, gcs) -> dict:
        from ray.core.generated import gcs_pb2

        infos = gcs.get_all_node_info(timeout=5)
        return {nid.hex(): info for nid, info in infos.items()
                if info.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE}

    def find(self) -> tuple[str | None, str]:
        if self.explicit:
            return self.explicit, ""
        from ray._private.services import find_node_ids, node_ip_address_from_perspective

        gcs, address = self._gcs()
        alive = self._alive(gcs)
        ip = node_ip_address_from_perspective(address)
        local = sorted(set(find_node_ids()) & set(alive))
        at_ip = sorted(n for n, info in alive.items() if info.node_manager_address == ip)
        return choose_node(None, local, at_ip)

    def drain(self, node_id: str, notice: Notice) -> tuple[bool, str]:
        from ray.core.generated import autoscaler_pb2

        gcs, _ = self._gcs()
        accepted, why = gcs.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.DRAIN_NODE_REASON_PREEMPTION,
            f"preemption notice ({notice.provider}): {notice.action}, deadline "
            f"{ms_iso(notice.deadline_ms)}",
            notice.deadline_ms, timeout=10)
        return bool(accepted), why

    def alive(self, node_id: str) -> bool:
        gcs, _ = self._gcs()
        return node_id in self._alive(gcs)


# -- the agent ---------------------------------------------------------------------------------------
class Agent:
    """One poll per step(); run() loops. Lines go to `say`."""

    def __init__(self, md: Metadata, node: RayNode, provider: str = "auto",
                 poll_seconds: float = DEFAULT_POLL_SECONDS, say: Callable[[str], None] = print):
        self.md, self.node, self.provider = md, node, provider
        self.poll_seconds, self.say = poll_seconds, say
        self.watch = None
        self.failures = 0
        self.notice: Notice | None = None
        self.node_id: str | None = None
        self.drain_trouble = ""

    def start(self) -> None:
        try:
            self.node_id, why = self.node.find()
        except Exception as exc:  # noqa: BLE001 - Ray not up yet: looked up again on a notice
            why = f"the Ray cluster does not answer yet: {words(exc)}"
        where = f"Ray node {self.node_id}" if self.node_id else f"this machine's Ray node ({why})"
        self.say(f"[spot] watching the instance metadata at {self.md.base} every "
                 f"{self.poll_seconds:g} s for a preemption notice; on one, {where} is drained")

    def step(self) -> int | None:
        """One poll; an exit status once the agent is done, else None."""
        if self.notice is None:
            self.notice = self._poll()
            if self.notice is None:
                return None
        return self._drain()

    def _poll(self) -> Notice | None:
        try:
            if self.watch is None:
                self.watch = make_watch(self.md, self.provider, self.poll_seconds)
            notice = self.watch.check()
        except MetadataUnavailable as exc:
            line = trouble_line(self.failures, exc, self.md.base)
            self.failures += 1
            if line:
                self.say(line)
            return None
        line = back_line(self.failures, self.md.base)
        self.failures = 0
        if line:
            self.say(line)
        return notice

    def _drain(self) -> int | None:
        notice = self.notice
        now_ms = int(time.time() * 1000)
        try:
            node_id, why = self.node.find()
            node_id = node_id or self.node_id     # Ray down here now: the node seen at start
            if node_id is None:
                raise LookupError(why)
            accepted, reason = self.node.drain(node_id, notice)
        except Exception as exc:  # noqa: BLE001 - GCS unreachable: try again until the deadline
            trouble = words(exc)
            if now_ms > notice.deadline_ms:
                self.say(f"[spot] {notice.provider} notice: {notice.action} at "
                         f"{ms_iso(notice.deadline_ms)}, passed without a drain ({trouble})")
                return 1
            if trouble != self.drain_trouble:
                self.say(f"[spot] {notice.provider} notice: {notice.action} at "
                         f"{ms_iso(notice.deadline_ms)}, but cannot drain yet ({trouble}); retrying")
                self.drain_trouble = trouble
            return None
        if not accepted:   # PREEMPTION drains are not rejectable; said if it ever happens
            self.say(f"[spot] Ray refused to drain node {node_id}: {reason}")
            return 1
        self.say(f"[spot] {notice.provider} notice: {notice.action} at "
                 f"{ms_iso(notice.deadline_ms)}; drained Ray node {node_id} with that deadline "
                 f"({(notice.deadline_ms - now_ms) / 1000:.0f} s from now)")
        return 0

    def run(self, sleep: Callable[[float], None] = time.sleep) -> int:
        self.start()
        while True:
            done = self.step()
            if done is not None:
                return done
            sleep(self.poll_seconds)


def drain_now(node: RayNode, seconds: float, say: Callable[[str], None] = print,
              wait: bool = True) -> int:
    """The preStop hook: drain at once with a deadline `seconds` away, then wait until the node
    is gone or the deadline passed. Says what happened; a cluster that is already going away
    (no GCS) is not an error."""
    deadline_ms = int((time.time() + seconds) * 1000)
    notice = Notice("kubernetes", "pod terminating", deadline_ms)
    try:
        node_id, why = node.find()
        if node_id is None:
            say(f"[spot] nothing to drain: {why}")
            return 0
        accepted, reason = node.drain(node_id, notice)
    except Exception as exc:  # noqa: BLE001 - the head may be going away with the whole cluster
        say(f"[spot] could not drain this node ({words(exc)})")
        return 0
    if not accepted:
        say(f"[spot] Ray refused to drain node {node_id}: {reason}")
        return 0
    say(f"[spot] drained Ray node {node_id} with a deadline {seconds:g} s away "
        f"({ms_iso(deadline_ms)})")
    start = time.monotonic()
    while wait and time.time() * 1000 < deadline_ms:
        try:
            if not node.alive(node_id):
                say(f"[spot] Ray node {node_id} finished draining in "
                    f"{time.monotonic() - start:.0f} s")
                return 0
        except Exception:  # noqa: BLE001 - GCS gone: nothing left to wait for
            return 0
        time.sleep(0.5)
    if wait:
        say(f"[spot] Ray node {node_id} still had work at its deadline")
    return 0


def hold_lock(node_id: str | None) -> int | None:
    """One agent per node: re-running the start commands (`ray up` again) starts another one,
    which sees the first and leaves. Returns the other agent's PID when one holds the lock."""
    name = f"pipeline-spot-agent{'-' + node_id[:16] if node_id else ''}.lock"
    try:
        fd = os.open(os.path.join(tempfile.gettempdir(), name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:    # another user's lock file: no lock, rather than no agent
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 32).decode().strip()
        os.close(fd)
        return int(other) if other.isdigit() else -1
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD.append(fd)    # held as long as this process lives
    return None


def main(endpoint: str = DEFAULT_ENDPOINT, provider: str = "auto",
         poll_seconds: float = DEFAULT_POLL_SECONDS, node_id: str | None = None,
         address: str | None = None, timeout: float = DEFAULT_HTTP_TIMEOUT,
         drain_now_seconds: float | None = None, say: Callable[[str], None] = print) -> int:
    node = RayNode(address, node_id)
    if drain_now_seconds is not None:
        return drain_now(node, drain_now_seconds, say)
    other = hold_lock(node_id)
    if other is not None:
        say(f"[spot] an agent already watches this node (pid {other}); leaving it to that one")
        return 0
    return Agent(Metadata(endpoint, timeout), node, provider, poll_seconds, say).run()
