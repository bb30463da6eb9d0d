"""Nomad's HTTP API, as ``@nomad``, ``nomad create`` and the pool's nomad backend use it (register, watch,
read logs, deregister) and as the dev cluster sets up its ACLs (bootstrap, namespace, policy, token).

Settings come from Nomad's own variables (``NOMAD_ADDR``, ``NOMAD_TOKEN``,
``NOMAD_NAMESPACE``, ``NOMAD_REGION``, ``NOMAD_CACERT``, ``NOMAD_CLIENT_CERT``,
``NOMAD_CLIENT_KEY``), ``METAFLOW_NOMAD_ADDR`` over ``NOMAD_ADDR``. TLS
certificates are verified, unlike python-nomad's default; ``NOMAD_SKIP_VERIFY``
turns that off, as for Nomad's CLI. An address ``unix:///PATH`` is a Unix
socket, as for Nomad's own client: a task reaches its agent's Task API at
``unix://$NOMAD_SECRETS_DIR/api.sock`` with its workload identity as the token.

Watching uses Nomad's blocking queries (``index`` and ``wait``: the request
returns when the object changes, or after ``wait``), so a task that runs an
hour costs a request a minute, not a poll a second; the logs endpoint is
read as a stream (``logs.FrameDecoder``), which python-nomad cannot do.
Every failure to reach Nomad, or a refusal, is a ``StackError`` naming the
setting to fix.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import httpx

from metaflow_stack.errors import StackError
from metaflow_stack.http_answers import AnswerTooLarge, AnswerTooSlow, whole

#: Where a dev agent listens (``nomad agent -dev``).
DEFAULT_ADDRESS = "http://127.0.0.1:4646"
#: How long a blocking query waits for a change before it returns unchanged.
WAIT_S = 60
#: Seconds to connect, and to wait for an answer beyond a blocking query's own wait.
CONNECT_S, SLACK_S = 10.0, 15.0
#: How long a watched task outlives an agent that does not answer (asked again, with backoff).
OUTAGE_S = 300.0
#: The most an answer (other than a log stream) may hold: a busy cluster's job list is a few MB.
MAX_ANSWER = 64 << 20
#: The longest a followed log may go without a byte: Nomad sends a heartbeat frame every second with nothing
#: else to send (``streamHeartbeatRate``; ten seconds in older releases).
FOLLOW_READ_S = 30.0


@dataclass(frozen=True)
class Settings:
    """Where Nomad is and who asks."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    namespace: str | None = None
    region: str | None = None
    ca_cert: str | None = None
    client_cert: tuple[str, str] | None = None
    verify: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        cert, key = env.get("NOMAD_CLIENT_CERT"), env.get("NOMAD_CLIENT_KEY")
        return cls(
            address=(env.get("METAFLOW_NOMAD_ADDR") or env.get("NOMAD_ADDR") or DEFAULT_ADDRESS).rstrip("/"),
            token=env.get("NOMAD_TOKEN") or None,
            namespace=env.get("NOMAD_NAMESPACE") or None,
            region=env.get("NOMAD_REGION") or None,
            ca_cert=env.get("NOMAD_CACERT") or None,
            client_cert=(cert, key) if cert and key else None,
            verify=env.get("NOMAD_SKIP_VERIFY", "").lower() not in ("1", "true", "yes"),
        )

    def cli_options(self) -> str:
        """The options of Nomad's CLI that name these settings' namespace and region, as a command an
        operator is told to run about a job must."""
        return f"-namespace {self.namespace or 'default'} " + (f"-region {self.region} " if self.region else "")

    def at(self, namespace: str | None, region: str | None) -> Settings:
        """These settings for a job in ``namespace`` and ``region`` where given (a decorator's), which every
        call about that job must name."""
        return replace(self, namespace=namespace or self.namespace, region=region or self.region)


def _tls(settings: Settings) -> ssl.SSLContext:
    """How to reach an agent over HTTPS: its certificate verified against ``NOMAD_CACERT`` (else the usual
    authorities), not at all with ``NOMAD_SKIP_VERIFY``, and this machine's client certificate presented where
    one is set (an agent with ``verify_https_client`` requires it). One context holds both: httpx drops a
    client certificate given beside a CA file's path."""
    try:
        if not settings.verify:
            context = httpx.create_ssl_context(verify=False)
        elif settings.ca_cert:
            context = ssl.create_default_context(cafile=settings.ca_cert)
        else:
            context = httpx.create_ssl_context()
        if settings.client_cert:
            context.load_cert_chain(*settings.client_cert)
    except OSError as exc:  # (ssl.SSLError among them)
        named = [settings.ca_cert or "", *(settings.client_cert or ())]
        raise StackError(
            f"Nomad's TLS files ({', '.join(filter(None, named))}) cannot be used: {exc}",
            fix="set NOMAD_CACERT, NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY to readable PEM files",
        ) from None
    return context


class NomadClient:
    """One Nomad agent's HTTP API (``close`` when done, or use as a context manager)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        s = self.settings
        socket = s.address.removeprefix("unix://") if s.address.startswith("unix://") else None
        try:
            scheme = httpx.URL(s.address).scheme
        except httpx.InvalidURL as exc:
            scheme = f"none it can read ({exc})"
        if scheme not in ("http", "https", "unix"):
            raise StackError(
                f"NOMAD_ADDR={s.address} is no address of a Nomad agent: its scheme is {scheme or 'missing'}",
                fix="write it as http://HOST:4646, https://HOST:4646 or unix:///PATH",
            )
        self._http = httpx.Client(
            base_url="http://127.0.0.1" if socket else s.address,  # (the host a socket's requests name)
            headers={"X-Nomad-Token": s.token} if s.token else {},
            verify=_tls(s),
            transport=httpx.HTTPTransport(uds=socket) if socket else None,
            timeout=httpx.Timeout(CONNECT_S + SLACK_S, connect=CONNECT_S),
        )

    def __enter__(self) -> NomadClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def namespace(self) -> str:
        """The namespace this client's calls are in: the settings', else Nomad's ``default``."""
        return self.settings.namespace or "default"

    def _params(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("namespace", self.settings.namespace), ("region", self.settings.region)) if v}
        return {**params, **(extra or {})}

    def _request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        request = self._http.build_request(method, path, params=self._params(params), **kwargs)
        # The answer whole within its read timeout (a blocking query's wait with its slack) and the slack again:
        # httpx's timeouts are per read, and a server that sends a byte now and then would hold the call forever.
        read_s = (kwargs.get("timeout") or self._http.timeout).read or CONNECT_S + SLACK_S
        deadline = time.monotonic() + read_s + SLACK_S
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        read = self._whole(response, method, path, deadline)
        _raise_for(read, method, path)
        return read

    def _whole(self, response: httpx.Response, method: str, path: str, deadline: float | None = None) -> httpx.Response:
        """A streamed answer read (decoded: Nomad compresses what it sends), up to ``MAX_ANSWER`` and by
        ``deadline`` (``Unavailable`` after it: worth asking again, as a watch does)."""
        try:
            return whole(response, MAX_ANSWER, deadline)
        except AnswerTooLarge as exc:
            raise StackError(
                f"Nomad's answer to {method} {path} is {exc}", fix="check that NOMAD_ADDR is a Nomad agent"
            ) from None
        except AnswerTooSlow:
            raise Unavailable(
                f"Nomad's answer to {method} {path} was not whole in time (it came a little at a time)",
                fix="check that NOMAD_ADDR is a Nomad agent, and the network or proxy between",
            ) from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc, answered=True) from None

    def _unreachable(self, exc: Exception, answered: bool = False) -> StackError:
        """Why the agent could not be asked (``answered``: the failure came after its answer began)."""
        s, said, text = self.settings, f"{type(exc).__name__}: {exc}", str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            if "Hostname mismatch" in text or "IP address mismatch" in text:  # (trusted, for another host)
                fix = "address the agent by a name its certificate holds (NOMAD_ADDR)"
            elif "expired" in text:
                fix = "renew the agent's certificate"
            elif "not yet valid" in text:
                fix = "check this machine's clock, then the certificate's dates"
            else:
                fix = "set NOMAD_CACERT to the CA that signed it"
            return Unavailable(
                f"the Nomad agent at {s.address} has a certificate this machine refuses ({said})", fix=fix
            )
        # An agent that verifies its clients (tls verify_https_client) refuses one with no certificate: Go's TLS
        # says so in an alert (certificate required, or bad certificate before TLS 1.3); some servers close the
        # connection before any answer.
        refused = any(alert in text for alert in ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE"))
        closed = isinstance(exc, httpx.RemoteProtocolError) and not answered
        if (refused or closed) and s.address.startswith("https:") and not s.client_cert:
            return Unavailable(
                f"the Nomad agent at {s.address} refused this machine's connection ({said}): an agent that "
                "verifies its clients (tls verify_https_client) refuses one with no certificate",
                fix="set NOMAD_CLIENT_CERT and NOMAD_CLIENT_KEY",
            )
        return Unavailable(
            f"no Nomad agent answers at {s.address} ({said})",
            fix="start one (`just nomad-up`) or set NOMAD_ADDR to its address",
        )

    def _blocking(self, path: str, index: int, wait_s: float, outage_s: float = OUTAGE_S) -> tuple[Any, int]:
        """A blocking query: the object once its index passes ``index`` (or after ``wait_s``), and its index.

        A task may run for hours: an agent that does not answer for a while (a restart, no cluster leader:
        5xx) is asked again, with backoff, for up to ``outage_s``, rather than failing a healthy task. An
        index that did not move (a server that ignores it) costs a second, not a busy loop."""
        params = {"index": index, "wait": f"{int(wait_s)}s"} if index else {}
        timeout = httpx.Timeout(wait_s + SLACK_S, connect=CONNECT_S)
        deadline, pause = time.monotonic() + outage_s, 1.0
        while True:
            try:
                response = self._request("GET", path, params=params, timeout=timeout)
                break
            except StackError as exc:
                if not isinstance(exc, Unavailable) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
                # Asked afresh: an agent back from an outage may have begun its indexes again (a dev agent
                # keeps none), and would hold a query on an index it has not reached for the whole wait.
                params = {}
        moved = _index(response, index)
        if index and moved <= index:
            time.sleep(1.0)
        # (at least 1: an answer read as index 0, asked again with none, would be answered at once, in a loop)
        return _json(response, path), max(moved, 1)

    def leader(self) -> str:
        """The cluster leader's address (``GET /v1/status/leader``, no token needed): empty until one is elected."""
        answer = _json(self._request("GET", "/v1/status/leader"), "/v1/status/leader")
        return answer if isinstance(answer, str) else ""

    def bootstrap_acl(self) -> dict[str, Any]:
        """The cluster's first management token (``POST /v1/acl/bootstrap``; Nomad answers it once)."""
        return _json(self._request("POST", "/v1/acl/bootstrap"), "/v1/acl/bootstrap")

    def token_self(self) -> dict[str, Any]:
        """The token this client sends, as Nomad knows it (``NotFound`` for one it does not)."""
        return _json(self._request("GET", "/v1/acl/token/self"), "/v1/acl/token/self")

    def acls_enabled(self) -> bool:
        """Whether the agent enforces ACLs: without them, Nomad answers its ACL endpoints 400 "ACL support
        disabled" (any other answer, a refusal too, is an agent with them)."""
        try:
            self.token_self()
        except StackError as exc:
            if isinstance(exc, Unavailable):
                raise
            return "ACL support disabled" not in exc.message
        return True

    def nodes(self, resources: bool = False) -> list[dict[str, Any]]:
        """The cluster's client nodes, with their status and drivers, and with ``resources`` what each has and
        reserves (``NodeResources``, ``ReservedResources``) (``node:read``)."""
        params = {"resources": "true"} if resources else None
        return _json(self._request("GET", "/v1/nodes", params=params), "/v1/nodes")

    def put_namespace(self, name: str, description: str) -> None:
        """Create or update the namespace ``name`` (management token)."""
        self._request("POST", f"/v1/namespace/{name}", json={"Name": name, "Description": description})

    def put_policy(self, name: str, rules: str, description: str, job: tuple[str, str] | None = None) -> None:
        """Create or update the ACL policy ``name`` with HCL ``rules`` (management token); given ``job`` (its
        namespace and ID), the policy is that job's workloads' own (``JobACL``: what ``nomad acl policy apply
        -job`` writes), and holds for its dispatched and periodic children too."""
        body: dict[str, Any] = {"Name": name, "Description": description, "Rules": rules}
        if job is not None:
            body["JobACL"] = {"Namespace": job[0], "JobID": job[1]}
        self._request("POST", f"/v1/acl/policy/{name}", json=body)

    def delete_policy(self, name: str) -> None:
        """Remove the ACL policy ``name`` (management token); one already gone is no error."""
        with contextlib.suppress(NotFound):
            self._request("DELETE", f"/v1/acl/policy/{name}")

    def put_variable(self, path: str, items: dict[str, str]) -> None:
        """Write the Nomad Variable at ``path`` (``variables`` ``write`` on it): a job's own, at
        ``nomad/jobs/<job>``, its workloads may read by their identity's implicit policy, and no other
        workload (tokens whose policies grant ``read`` there may)."""
        body = {"Namespace": self.namespace, "Path": path, "Items": items}
        self._request("PUT", f"/v1/var/{path}", json=body)

    def delete_variable(self, path: str) -> None:
        """Remove the Nomad Variable at ``path`` (``destroy`` on it); one already gone is no error."""
        with contextlib.suppress(NotFound):
            self._request("DELETE", f"/v1/var/{path}")

    def variable(self, path: str) -> dict[str, str]:
        """The items of the Nomad Variable at ``path`` (``NotFound`` when there is none)."""
        answer = _json(self._request("GET", f"/v1/var/{path}"), "/v1/var")
        items = answer.get("Items") if isinstance(answer, dict) else None
        if not isinstance(items, dict):
            raise StackError(f"Nomad's answer for the variable {path} holds no items: {str(answer)[:200]}")
        return {str(k): str(v) for k, v in items.items()}

    def create_token(self, name: str, policies: list[str]) -> dict[str, Any]:
        """A new client token holding ``policies`` (management token)."""
        body = {"Name": name, "Type": "client", "Policies": policies}
        return _json(self._request("POST", "/v1/acl/token", json=body), "/v1/acl/token")

    def register(self, job: dict[str, Any]) -> str:
        """Register ``job``; the ID of the evaluation that places it."""
        answer = _json(self._request("PUT", "/v1/jobs", json={"Job": job}), "/v1/jobs")
        if not isinstance(answer, dict) or not isinstance(answer.get("EvalID"), str):
            raise StackError(f"Nomad's answer to the job's registration has no EvalID: {str(answer)[:200]}")
        return answer["EvalID"]

    def evaluation(self, eval_id: str, index: int = 0, wait_s: float = WAIT_S) -> tuple[dict[str, Any], int]:
        return self._blocking(f"/v1/evaluation/{eval_id}", index, wait_s)

    def allocations(
        self, job: str, index: int = 0, wait_s: float = WAIT_S, outage_s: float = OUTAGE_S
    ) -> tuple[list[dict[str, Any]], int]:
        """The job's allocations (a purged job's too, until Nomad collects them)."""
        return self._blocking(f"/v1/job/{_escaped(job)}/allocations", index, wait_s, outage_s)

    def allocation(self, alloc_id: str, index: int = 0, wait_s: float = WAIT_S) -> tuple[dict[str, Any], int]:
        return self._blocking(f"/v1/allocation/{alloc_id}", index, wait_s)

    def jobs(self, prefix: str) -> list[dict[str, Any]]:
        """The jobs whose IDs start with ``prefix``, with their ``Meta``."""
        return _json(self._request("GET", "/v1/jobs", params={"prefix": prefix, "meta": "true"}), "/v1/jobs")

    def validate(self, job: dict[str, Any]) -> list[str]:
        """What Nomad finds wrong with ``job``, without registering it (``/v1/validate/job``); none: it would take
        it. A job Nomad cannot even read (a number past its range) is a ``StackError`` with Nomad's words."""
        answer = _json(self._request("POST", "/v1/validate/job", json={"Job": job}), "/v1/validate/job")
        found = answer.get("ValidationErrors") if isinstance(answer, dict) else None
        return [str(error) for error in found] if isinstance(found, list) else []

    def deregister(self, job: str) -> None:
        """Stop ``job`` and forget it (``purge``); one already gone is no error."""
        with contextlib.suppress(NotFound):
            self._request("DELETE", f"/v1/job/{_escaped(job)}", params={"purge": "true"})

    def job(self, job: str) -> dict[str, Any]:
        """The registered ``job`` (``NotFound`` when there is none)."""
        return _json(self._request("GET", f"/v1/job/{_escaped(job)}"), "/v1/job")

    def force_periodic(self, job: str) -> str:
        """Run the periodic ``job`` now; the evaluation of the child it launches (its ``JobID``)."""
        path = f"/v1/job/{_escaped(job)}/periodic/force"
        answer = _json(self._request("POST", path), path)
        if not isinstance(answer, dict) or not isinstance(answer.get("EvalID"), str):
            raise StackError(f"Nomad's answer to forcing {job} names no evaluation: {str(answer)[:200]}")
        return answer["EvalID"]

    def dispatch(self, job: str, meta: dict[str, str]) -> tuple[str, str]:
        """Dispatch the parameterized ``job`` with ``meta``; the dispatched job's ID and its evaluation's."""
        path = f"/v1/job/{_escaped(job)}/dispatch"
        answer = _json(self._request("POST", path, json={"Meta": meta}), path)
        if not isinstance(answer, dict) or not all(
            isinstance(answer.get(k), str) for k in ("DispatchedJobID", "EvalID")
        ):
            raise StackError(f"Nomad's answer to the dispatch of {job} names no job: {str(answer)[:200]}")
        return answer["DispatchedJobID"], answer["EvalID"]

    @contextlib.contextmanager
    def logs(
        self, alloc_id: str, task: str, kind: str, offset: int = 0, follow: bool = True
    ) -> Iterator[Iterator[bytes]]:
        """The body of ``task``'s ``kind`` log (``stdout``, ``stderr``) from ``offset`` (counted across its
        rotated files), followed unless told, as chunks."""
        flags = {"follow": "true" if follow else "false", "origin": "start", "offset": offset}
        params = self._params({"task": task, "type": kind, **flags})
        # Followed, a quiet task's log sends only Nomad's heartbeats; a stream with none for longer went half-open
        # (a partition, a proxy's idle cut) and is given up, so that its reader resumes it. Not followed, the
        # answer ends.
        timeout = httpx.Timeout(FOLLOW_READ_S if follow else CONNECT_S + SLACK_S, connect=CONNECT_S)
        answered = False
        try:
            with self._http.stream("GET", f"/v1/client/fs/logs/{alloc_id}", params=params, timeout=timeout) as response:
                answered = True
                if response.is_error:  # (what it says is read up to a limit: it is retried in a loop)
                    error = self._whole(
                        response, "GET", "/v1/client/fs/logs", time.monotonic() + timeout.read + SLACK_S
                    )
                    _raise_for(error, "GET", "/v1/client/fs/logs")
                yield response.iter_bytes()  # (decoded: Nomad compresses what it sends)
        except httpx.TransportError as exc:
            raise self._unreachable(exc, answered) from None


class NotFound(StackError):
    """Nomad does not know the object (404)."""


class Refused(StackError):
    """Nomad refuses the token this client sends (403)."""


class Unavailable(StackError):
    """Nomad does not answer, or answers that it cannot now (5xx): worth asking again."""


def _escaped(job: str) -> str:
    """A job ID as a path segment: a dispatched job's holds a ``/`` (``parent/dispatch-...``)."""
    return quote(job, safe="")


def _json(response: httpx.Response, path: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise StackError(f"Nomad's answer to {path} is not JSON: {response.text[:200]!r}") from None


def _index(response: httpx.Response, index: int) -> int:
    try:
        return int(response.headers.get("X-Nomad-Index") or index)
    except ValueError:
        return index


def _raise_for(response: httpx.Response, method: str, path: str) -> None:
    """A ``StackError`` for a refusal: a 403 names the token, others what Nomad said."""
    if not response.is_error:
        return
    said = response.text.strip()[:300]
    if response.status_code in (401, 403):  # (401: a Task API request without a token)
        raise Refused(
            f"Nomad refused {method} {path}: {said or 'permission denied'}",
            fix="set NOMAD_TOKEN to an ACL token that may submit jobs and read logs in the namespace (NOMAD_NAMESPACE)",
        )
    if response.status_code == 404:
        raise NotFound(f"Nomad knows no {path}: {said}", fix="check the job's namespace (NOMAD_NAMESPACE) and region")
    error = Unavailable if response.status_code >= 500 else StackError
    raise error(
        f"Nomad answered {response.status_code} to {method} {path}: {said}",
        fix="check the job's settings (@nomad) and the agent's log",
    )
