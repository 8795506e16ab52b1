"""GCS backend specifics the conformance suite cannot express: errors, retries, endpoint, clock."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from sweep.store import CREATE_ONLY, Conflict, StoreError, open_store
from sweep.store.backoff import Backoff
from sweep.store.gcs import GCSStore
from sweep.store.gcs_http import GCSClient, Response
from sweep.testing.store_conformance import COUNTER_KEY, increment


def fast_client(url: str, max_attempts: int = 6) -> GCSClient:
    return GCSClient(
        endpoint_url=url, backoff=Backoff(initial_s=0.001, max_s=0.01), max_attempts=max_attempts
    )


@pytest.fixture
def client(fake_gcs) -> GCSClient:
    return fast_client(fake_gcs.url)


@pytest.fixture
def store(fake_gcs, client) -> GCSStore:
    return GCSStore(fake_gcs.bucket, f"gcs-{uuid.uuid4().hex[:12]}", client=client)


def error_response(status: int, message: str) -> Response:
    body = f'{{"error": {{"code": {status}, "message": "{message}"}}}}'.encode()
    return Response(status, {"content-type": "application/json"}, body)


class Faults:
    """Wraps GCSClient.send: fail chosen requests before or after they reach the server."""

    def __init__(self, client: GCSClient, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real_send = client.send
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.before: list[int] = []  # statuses to return instead of sending, consumed in order
        self.after: list[int] = []  # statuses to return after sending (the response is "lost")
        self.after_methods = {"POST"}
        self.lock = threading.Lock()
        monkeypatch.setattr(client, "send", self.send)

    def send(self, method, url, params, headers, body):
        with self.lock:
            self.calls.append((method, url, dict(params)))
            before = self.before.pop(0) if self.before else None
            after = self.after.pop(0) if self.after and method in self.after_methods else None
        if before is not None:
            return error_response(before, "injected before send")
        resp = self.real_send(method, url, params, headers, body)
        if after is not None:
            return error_response(after, "injected after send")
        return resp


# -- error messages name the bucket and the fix -------------------------------------------------


def test_missing_bucket_names_bucket_and_create_command(fake_gcs, client):
    store = GCSStore("no-such-bucket-x", "exp", client=client)
    for op in (
        lambda: store.read("k"),
        lambda: store.write("k", b"x"),
        lambda: store.list(),
        lambda: store.stat("k"),
    ):
        with pytest.raises(StoreError) as info:
            op()
        message = str(info.value)
        assert "bucket 'no-such-bucket-x' does not exist" in message
        assert "gcloud storage buckets create gs://no-such-bucket-x" in message


def test_forbidden_names_bucket_role_and_login(store, client, monkeypatch):
    faults = Faults(client, monkeypatch)
    faults.before = [403]
    with pytest.raises(StoreError) as info:
        store.read("experiment.json")
    message = str(info.value)
    assert "bucket 'sweep-test'" in message and "experiment.json" in message
    assert "roles/storage.objectAdmin" in message and "gcloud auth application-default login" in message
    assert len(faults.calls) == 1, "403 is not transient and must not be retried"


def test_unauthenticated_says_how_to_log_in(store, client, monkeypatch):
    Faults(client, monkeypatch).before = [401]
    with pytest.raises(StoreError, match="gcloud auth application-default login"):
        store.write("k", b"x")


def test_unexpected_status_is_reported_with_key(store, client, monkeypatch):
    Faults(client, monkeypatch).before = [400]
    with pytest.raises(StoreError, match=r"HTTP 400.*injected before send") as info:
        store.stat("trials/3/claim.json")
    assert "trials/3/claim.json" in str(info.value) and not isinstance(info.value, Conflict)


# -- retries ---------------------------------------------------------------------------------------------


def test_transient_errors_are_retried_and_nothing_is_lost(store, client, monkeypatch):
    faults = Faults(client, monkeypatch)
    faults.before = [503, 429, 500]
    version = store.write("k", b"data", if_version=CREATE_ONLY)
    assert len(faults.calls) == 4
    faults.before = [503, 502]
    assert store.read("k") == (b"data", version)
    faults.before = [504]
    assert store.list() == ["k"]


def test_retries_are_bounded(fake_gcs, monkeypatch):
    client = fast_client(fake_gcs.url, max_attempts=4)
    store = GCSStore(fake_gcs.bucket, "bounded", client=client)
    faults = Faults(client, monkeypatch)
    faults.before = [503] * 10
    with pytest.raises(StoreError, match=r"still failing after 4 attempts \(last: HTTP 503"):
        store.read("k")
    assert len(faults.calls) == 4


def test_unreachable_endpoint_is_a_store_error(fake_gcs):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    store = GCSStore(fake_gcs.bucket, "x", client=fast_client(dead, max_attempts=2))
    with pytest.raises(
        StoreError, match=r"still failing after 2 attempts.*check network access to http://127"
    ):
        store.read("k")


def test_lost_response_to_a_conditional_write_is_not_a_conflict(store, client, monkeypatch):
    faults = Faults(client, monkeypatch)
    v1 = store.write("k", b"one")
    # The server commits the write, the response is lost, the retry then fails its
    # own precondition: that must be recognised as our write, not a lost race.
    faults.after = [503]
    v2 = store.write("k", b"two", if_version=v1)
    assert store.read("k") == (b"two", v2)
    faults.after = [503]
    v3 = store.write("new", b"x", if_version=CREATE_ONLY)
    assert store.read("new") == (b"x", v3)


def test_retried_write_that_really_lost_the_race_still_conflicts(fake_gcs, store, client, monkeypatch):
    other = GCSStore(fake_gcs.bucket, store.uri.split("/", 3)[3], client=fast_client(fake_gcs.url))
    v1 = store.write("k", b"one")
    faults = Faults(client, monkeypatch)
    real_send = faults.real_send

    def send(method, url, params, headers, body):
        if method == "POST" and not faults.calls:
            faults.calls.append((method, url, params))
            other.write("k", b"theirs", if_version=v1)  # a rival wins while our first try is lost
            return error_response(503, "injected")
        return real_send(method, url, params, headers, body)

    monkeypatch.setattr(client, "send", send)
    with pytest.raises(Conflict):
        store.write("k", b"ours", if_version=v1)
    assert store.read("k")[0] == b"theirs"


def test_lost_response_is_recognised_even_after_a_rival_overwrote_it(fake_gcs, store, client, monkeypatch):
    other = GCSStore(fake_gcs.bucket, store.uri.split("/", 3)[3], client=fast_client(fake_gcs.url))
    v1 = store.write("k", b"one")
    faults = Faults(client, monkeypatch)
    real_send = faults.real_send
    rival_versions = []

    def send(method, url, params, headers, body):
        resp = real_send(method, url, params, headers, body)
        if method == "POST" and not faults.calls:
            faults.calls.append((method, url, params))
            # Our write committed; before we hear back, a rival reads it and builds on it.
            data, ours = other.read("k")
            rival_versions.append(other.write("k", data + b"+rival", if_version=ours))
            return error_response(503, "injected after send")
        return resp

    monkeypatch.setattr(client, "send", send)
    ours = store.write("k", b"two", if_version=v1)
    # Reporting Conflict here would make a read-modify-write caller apply "two" twice.
    assert ours != v1 and ours != rival_versions[0]
    assert store.read("k") == (b"two+rival", rival_versions[0])


def test_cas_counter_survives_lost_responses_exactly_once(store, client, monkeypatch):
    faults = Faults(client, monkeypatch)
    faults.after = [503] * 8  # the first 8 uploads commit but their responses are lost
    n, m = 3, 5

    def work(i: int) -> None:
        for _ in range(m):
            increment(store, worker=f"t{i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    state, _ = store.read_json(COUNTER_KEY)
    # A write applied twice (lost response, retry seen as conflict, re-increment) would overshoot.
    assert state["n"] == n * m
    assert sorted(state["log"]) == sorted(f"t{i}" for i in range(n) for _ in range(m))


# -- the requests we send --------------------------------------------------------------------------------


def test_conditional_requests_carry_generation_preconditions(store, client, monkeypatch):
    faults = Faults(client, monkeypatch)
    v1 = store.write("k", b"one", if_version=CREATE_ONLY)
    v2 = store.write("k", b"two", if_version=v1)
    store.delete("k", if_version=v2)
    sent = [(m, p) for m, _, p in faults.calls if m in ("POST", "DELETE")]
    assert sent[0] == ("POST", {"uploadType": "multipart", "ifGenerationMatch": "0"})
    assert sent[1] == ("POST", {"uploadType": "multipart", "ifGenerationMatch": v1})
    # On real GCS this server-side condition is what makes the delete atomic.
    assert sent[2] == ("DELETE", {"ifGenerationMatch": v2})


def test_read_without_generation_header_pins_the_generation(store, client, monkeypatch):
    version = store.write("k", b"data")
    faults = Faults(client, monkeypatch)
    real_send = faults.real_send

    def send(method, url, params, headers, body):
        resp = real_send(method, url, params, headers, body)
        faults.calls.append((method, url, dict(params)))
        stripped = {h: v for h, v in resp.headers.items() if h != "x-goog-generation"}
        return Response(resp.status, stripped, resp.body)

    monkeypatch.setattr(client, "send", send)
    assert store.read("k") == (b"data", version)
    assert faults.calls[-1][2] == {"alt": "media", "generation": version}


# -- endpoint selection and the clock -------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["SWEEP_GCS_ENDPOINT", "STORAGE_EMULATOR_HOST"])
def test_open_store_finds_the_endpoint_in_the_environment(fake_gcs, monkeypatch, variable):
    monkeypatch.delenv("SWEEP_GCS_ENDPOINT", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv(variable, fake_gcs.url.removeprefix("http://"))
    store = open_store(f"gs://{fake_gcs.bucket}/env-{variable}-{uuid.uuid4().hex[:6]}")
    assert isinstance(store, GCSStore) and store.client.endpoint_url == fake_gcs.url
    version = store.write("k", b"x")
    assert store.read("k") == (b"x", version)


def test_now_probes_the_server_then_extrapolates(fake_gcs, monkeypatch):
    client = fast_client(fake_gcs.url)
    store = GCSStore(fake_gcs.bucket, "clock", client=client, clock_refresh_s=60)
    faults = Faults(client, monkeypatch)
    first = store.now()
    time.sleep(0.05)
    second = store.child("sub").now()
    assert [m for m, _, _ in faults.calls] == ["POST"], "one probe serves the store and its children"
    assert 0.04 <= second - first < 5.0
    assert abs(store.now() - time.time()) < 5  # the fake server shares this machine's clock


def test_clock_probe_refreshes_after_interval(fake_gcs, monkeypatch):
    client = fast_client(fake_gcs.url)
    store = GCSStore(fake_gcs.bucket, "clock2", client=client, clock_refresh_s=0)
    faults = Faults(client, monkeypatch)
    store.now()
    store.now()
    assert [m for m, _, _ in faults.calls] == ["POST", "POST"]
    assert store.list() == []
