"""The gateway's auth: API keys hashed in a real SQLite file, real PyJWT tokens, roles per action and chain, rate
limits, size limits, and `autoglm keys` as a child process."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from workbench.errors import (
    AccessError,
    Forbidden,
    PayloadTooLarge,
    RateLimited,
    SettingsError,
    StoreError,
    Unauthenticated,
    WorkbenchError,
)
from workbench.fronts.server.auth import (
    ACTIONS,
    KEYS_FILE,
    PEPPER_FILE,
    Auth,
    FailedLogins,
    KeyStore,
    Principal,
    load_roles,
)

ROOT = Path(__file__).parent.parent
SECRET = "s3cret-for-tests-only-" + "0123456789abcdef" * 3  # 70 bytes: HS512 (the wrong alg) wants 64
AUDIENCE, ISSUER = "autoglm-test", "https://issuer.test"


def token(claims: dict[str, object] | None = None, *, key: str = SECRET, algorithm: str = "HS256",
          **overrides: object) -> str:
    now = int(time.time())
    body: dict[str, object] = {"sub": "carol", "role": "runner", "aud": AUDIENCE, "iss": ISSUER,
                               "iat": now, "nbf": now - 5, "exp": now + 600}
    body.update(claims or {})
    body.update(overrides)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, algorithm=algorithm)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    """A token with any header, signed by hand (HMAC-SHA256 with ``key``) or not at all (``key=None``)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.fixture
def auth(tmp_path: Path) -> Auth:
    return Auth(tmp_path, jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)


def bearer(credential: str) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"}


# -- API keys -------------------------------------------------------------------------------------


def test_a_new_key_authenticates_by_bearer_or_x_api_key(auth: Auth) -> None:
    assert auth.keys is not None
    key = auth.keys.add("alice", "runner")
    assert key.startswith("agw_") and len(key) > 40
    assert auth.authenticate(bearer(key)) == Principal("alice", "runner", "key")
    assert auth.authenticate({"x-api-key": key}) == Principal("alice", "runner", "key")
    # Two keys never come out the same.
    assert auth.keys.add("bob", "viewer") != key


def test_keys_are_stored_hashed_and_never_listed(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    key = store.add("alice", "admin")
    secret = key.removeprefix("agw_").partition("_")[2]
    store.close()
    raw = (tmp_path / KEYS_FILE).read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob(f"{KEYS_FILE}-*"))
    assert secret.encode() not in raw and key.encode() not in raw
    with sqlite3.connect(tmp_path / KEYS_FILE) as db:
        (salt, digest), = db.execute("SELECT salt, hash FROM keys").fetchall()
    # A salted, peppered HMAC-SHA256: without the pepper file the hash cannot be checked against a guess.
    assert len(salt) == 16 and len(digest) == 32
    assert digest != hashlib.sha256(salt + secret.encode()).digest()
    pepper = base64.b64decode((tmp_path / PEPPER_FILE).read_bytes())
    assert digest == hmac.new(pepper, salt + secret.encode(), hashlib.sha256).digest()
    assert (tmp_path / PEPPER_FILE).stat().st_mode & 0o077 == 0
    listed = KeyStore(tmp_path).list()
    assert [(row["name"], row["role"], row["revoked"]) for row in listed] == [("alice", "admin", False)]
    assert key not in json.dumps(listed) and secret not in json.dumps(listed)


@pytest.mark.parametrize("credential", [
    "agw_000000000000_notarealsecret",  # an id that does not exist
    "agw_",
    "agw_nounderscore",
    "plainly-wrong",
    "a.b",
], ids=["unknown-id", "prefix-only", "no-secret", "not-a-key", "two-dots"])
def test_malformed_or_unknown_keys_are_refused(auth: Auth, credential: str) -> None:
    assert auth.keys is not None
    auth.keys.add("alice", "runner")
    with pytest.raises(Unauthenticated) as caught:
        auth.authenticate(bearer(credential))
    assert caught.value.http_status == 401
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_the_right_id_with_a_wrong_secret_is_refused(auth: Auth) -> None:
    assert auth.keys is not None
    key = auth.keys.add("alice", "runner")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    with pytest.raises(Unauthenticated, match="not valid"):
        auth.authenticate(bearer(tampered))


def test_no_credentials_and_bad_headers_are_401(auth: Auth) -> None:
    with pytest.raises(Unauthenticated, match="no credentials"):
        auth.authenticate({})
    with pytest.raises(Unauthenticated, match="Bearer"):
        auth.authenticate({"authorization": "Basic YWxpY2U6cHc="})
    with pytest.raises(Unauthenticated, match="Bearer"):
        auth.authenticate({"authorization": "Bearer "})


def test_a_revoked_key_stops_at_once_and_its_name_is_free_again(auth: Auth, tmp_path: Path) -> None:
    assert auth.keys is not None
    key = auth.keys.add("alice", "runner")
    assert auth.authenticate(bearer(key)).name == "alice"
    KeyStore(tmp_path).revoke("alice")  # another process's store, the same file
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(key))
    with pytest.raises(SettingsError, match="no active key named 'alice'"):
        auth.keys.revoke("alice")
    new = auth.keys.add("alice", "viewer")
    assert auth.authenticate(bearer(new)) == Principal("alice", "viewer", "key")
    with pytest.raises(Unauthenticated):
        auth.authenticate(bearer(key))
    assert [(row["role"], row["revoked"]) for row in auth.keys.list()] == [("runner", True), ("viewer", False)]


def test_an_auth_says_what_a_caller_needs_and_when_no_caller_could_authenticate(tmp_path: Path) -> None:
    # What `autoglm serve` prints at its start, in place of the repr "<Auth <KeyStore '.../keys.sqlite3'>>".
    store = tmp_path / "keys.sqlite3"
    keyed = Auth(tmp_path)
    assert keyed.describe() == f"API keys from {store} (0 active)"
    assert keyed.admits_nobody() == (f"no caller can authenticate: the key store {store} holds no active API key "
                                     "and no JWT key is set")
    with pytest.raises(Unauthenticated):  # what the warning says: nobody gets in
        keyed.authenticate(bearer("agw_0123456789ab_guess"))
    key = KeyStore(tmp_path).add("alice", "runner")  # another process's store, the same file: taken at once
    assert keyed.authenticate(bearer(key)).name == "alice"
    assert keyed.describe() == f"API keys from {store} (1 active)" and keyed.admits_nobody() is None
    KeyStore(tmp_path).revoke("alice")
    assert keyed.describe() == f"API keys from {store} (0 active)" and keyed.admits_nobody() is not None
    # A JWT secret lets callers in with no key at all; an open server asks for nothing.
    jwt_only = Auth(tmp_path, jwt_secret=SECRET)
    assert jwt_only.describe() == f"API keys from {store} (0 active) or JWTs signed HS256"
    assert jwt_only.admits_nobody() is None
    assert Auth.open().describe() == "none, every caller is admin 'local'" and Auth.open().admits_nobody() is None


def test_key_names_roles_and_duplicates_are_checked(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.add("alice", "runner")
    with pytest.raises(SettingsError, match="a key named 'alice' exists"):
        store.add("alice", "admin")
    with pytest.raises(SettingsError, match="unknown role 'root'"):
        store.add("bob", "root")
    with pytest.raises(SettingsError, match="not allowed"):
        store.add("bob smith", "runner")
    with pytest.raises(SettingsError, match="not allowed"):
        store.add("", "runner")


def test_a_different_pepper_is_refused_rather_than_matching_nothing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    KeyStore(tmp_path).add("alice", "runner")
    monkeypatch.setenv("AUTOGLM_KEY_PEPPER", "another pepper entirely")
    with pytest.raises(StoreError, match="another pepper"):
        KeyStore(tmp_path).list()


def test_a_key_store_from_a_newer_workbench_is_refused(tmp_path: Path) -> None:
    KeyStore(tmp_path).add("alice", "runner")
    with sqlite3.connect(tmp_path / KEYS_FILE) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema 99, newer"):
        KeyStore(tmp_path).list()


def test_a_pepper_from_the_environment_keeps_it_out_of_the_data_dir(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_KEY_PEPPER", "pepper kept in a secret manager")
    key = KeyStore(tmp_path).add("alice", "runner")
    assert not (tmp_path / PEPPER_FILE).exists()
    assert Auth(tmp_path).authenticate(bearer(key)).name == "alice"


def test_keys_verify_from_many_threads(auth: Auth) -> None:
    assert auth.keys is not None
    keys = {auth.keys.add(f"user{i}", "runner"): f"user{i}" for i in range(4)}
    seen: list[str] = []
    lock = threading.Lock()

    def check(key: str) -> None:
        for _ in range(25):
            name = auth.authenticate(bearer(key)).name
            with lock:
                seen.append(name)

    threads = [threading.Thread(target=check, args=(key,)) for key in keys for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == sorted(name for name in keys.values() for _ in range(50))


# -- JWT ------------------------------------------------------------------------------------------


def test_a_valid_jwt_names_its_subject_and_role(auth: Auth) -> None:
    assert auth.authenticate(bearer(token())) == Principal("carol", "runner", "jwt")
    limited = auth.authenticate(bearer(token(chains=["qa"])))
    assert limited.chains == frozenset({"qa"})
    assert limited.owner == "jwt:carol"


@pytest.mark.parametrize(("credential", "message"), [
    (lambda: token(exp=int(time.time()) - 60), "expired"),
    (lambda: token(nbf=int(time.time()) + 3600), "not valid yet"),
    (lambda: token(key=SECRET[::-1]), "signature does not verify"),
    (lambda: token(aud="someone-else"), "audience"),
    (lambda: token(aud=None), "'aud'"),
    (lambda: token(iss="https://evil.test"), "issuer"),
    (lambda: token(exp=None), "'exp'"),
    (lambda: token(sub=None), "'sub'"),
    (lambda: token(role=None), "'role'"),
    (lambda: token(algorithm="HS512"), "algorithm"),
    (lambda: token(chains="qa"), "'chains'"),
], ids=["expired", "not-yet", "wrong-key", "wrong-audience", "no-audience", "wrong-issuer", "no-exp", "no-sub",
        "no-role", "wrong-alg", "bad-chains"])
def test_bad_jwts_are_401(auth: Auth, credential, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(Unauthenticated, match=message):
        auth.authenticate(bearer(credential()))


def test_alg_none_is_refused_even_with_valid_claims(auth: Auth) -> None:
    claims = jwt.decode(token(), SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    for alg in ("none", "None", "NONE"):
        with pytest.raises(Unauthenticated, match="algorithm"):
            auth.authenticate(bearer(forged({"alg": alg, "typ": "JWT"}, claims, None)))


def test_the_algorithm_comes_from_the_config_not_the_token(auth: Auth) -> None:
    claims = jwt.decode(token(), SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    # HS/RS confusion: a token that says RS256 but carries an HMAC signature made with what the attacker knows.
    public_key = b"-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"
    for header in ({"alg": "RS256", "typ": "JWT"}, {"alg": "ES256"}, {"alg": "HS256 "}):
        for key in (SECRET.encode(), public_key):
            with pytest.raises(Unauthenticated):
                auth.authenticate(bearer(forged(header, claims, key)))
    # The same forgery with the pinned header and the real secret passes: the refusals above were the alg.
    assert auth.authenticate(bearer(forged({"alg": "HS256", "typ": "JWT"}, claims, SECRET.encode()))).name == "carol"


def test_jwt_settings_that_would_be_unsafe_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="unsigned"):
        Auth(jwt_secret=SECRET, jwt_algorithms=("HS256", "none"))
    with pytest.raises(SettingsError, match="mixes"):
        Auth(jwt_secret=SECRET, jwt_algorithms=("HS256", "RS256"))
    with pytest.raises(SettingsError, match="at least 32"):
        Auth(jwt_secret="short", jwt_algorithms=("HS256",))
    with pytest.raises(SettingsError, match="at least 64"):
        Auth(jwt_secret="x" * 40, jwt_algorithms=("HS256", "HS512"))
    with pytest.raises(SettingsError, match="need jwt_secret"):
        Auth(jwt_public_key=b"pem", jwt_algorithms=("HS256",))
    with pytest.raises(SettingsError, match="unknown JWT algorithm"):
        Auth(jwt_secret=SECRET, jwt_algorithms=("HS257",))
    from jwt.algorithms import has_crypto

    if not has_crypto:  # RS256 needs PyJWT[crypto]; without it the server says so instead of accepting nothing
        with pytest.raises(SettingsError, match="cryptography"):
            Auth(jwt_public_key=b"pem", jwt_algorithms=("RS256",))


def test_a_server_without_jwt_settings_takes_no_jwt(tmp_path: Path) -> None:
    with pytest.raises(Unauthenticated, match="takes no JWTs"):
        Auth(tmp_path).authenticate(bearer(token()))
    key = KeyStore(tmp_path).add("alice", "runner")
    with pytest.raises(Unauthenticated, match="takes no API keys"):  # no data dir: JWTs only
        Auth(jwt_secret=SECRET).authenticate(bearer(key))


# -- roles ----------------------------------------------------------------------------------------


ALLOWED = {
    "viewer": {"chains.list", "runs.read", "models.list", "metrics.read"},
    "runner": {"chains.list", "runs.read", "models.list", "metrics.read", "chains.invoke"},
    "admin": set(ACTIONS),
}


@pytest.mark.parametrize("role", sorted(ALLOWED))
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_each_role_may_do_exactly_its_actions(auth: Auth, role: str, action: str) -> None:
    who = Principal("x", role, "key")
    if action in ALLOWED[role]:
        auth.authorize(who, action, "qa")
        auth.authorize(who, action)
    else:
        with pytest.raises(Forbidden, match=f"role {role!r} may not {action}") as caught:
            auth.authorize(who, action, "qa")
        assert caught.value.http_status == 403


def test_a_role_or_a_key_can_be_limited_to_some_chains(tmp_path: Path) -> None:
    auth = Auth(tmp_path, roles={"qa-runner": {"actions": ["chains.invoke", "chains.list"], "chains": ["qa"]}})
    who = Principal("dave", "qa-runner", "jwt")
    auth.authorize(who, "chains.invoke", "qa")
    with pytest.raises(Forbidden, match="on chain 'summarize'"):
        auth.authorize(who, "chains.invoke", "summarize")
    assert auth.keys is not None
    key = auth.keys.add("erin", "runner", chains=["qa"])
    erin = auth.authenticate(bearer(key))
    assert erin.chains == frozenset({"qa"})
    auth.authorize(erin, "chains.invoke", "qa")
    with pytest.raises(Forbidden, match="limited to chains: qa"):
        auth.authorize(erin, "chains.invoke", "summarize")


def test_an_undefined_role_is_forbidden_and_bad_role_specs_are_refused(auth: Auth) -> None:
    with pytest.raises(Forbidden, match="does not define"):
        auth.authorize(Principal("mallory", "superuser", "jwt"), "chains.list")
    with pytest.raises(SettingsError, match="unknown action 'chains.delete'"):
        Auth(roles={"odd": ["chains.delete"]})
    with pytest.raises(SettingsError, match="is a string"):
        Auth(roles={"odd": "chains.list"})


# -- rate and size limits, open mode ----------------------------------------------------------------


def test_the_rate_limit_is_per_principal_with_retry_after(tmp_path: Path) -> None:
    auth = Auth(tmp_path, rate_per_s=2.0, burst=3)
    alice, bob = Principal("alice", "runner", "key"), Principal("bob", "runner", "key")
    for _ in range(3):
        auth.admit(alice)
    with pytest.raises(RateLimited) as caught:
        auth.admit(alice)
    error = caught.value
    assert error.http_status == 429 and 0 < error.retry_after_s <= 0.5
    assert error.headers == {"Retry-After": "1"}
    auth.admit(bob)  # another caller's bucket is full
    # A key and a token of the same name are different callers.
    auth.admit(Principal("alice", "runner", "jwt"))
    time.sleep(error.retry_after_s + 0.01)  # obeying Retry-After gets the next request in
    auth.admit(alice)


def test_a_batch_can_cost_its_size(tmp_path: Path) -> None:
    auth = Auth(tmp_path, rate_per_s=1.0, burst=10)
    alice = Principal("alice", "runner", "key")
    auth.admit(alice, cost=8)
    with pytest.raises(RateLimited) as caught:
        auth.admit(alice, cost=4)  # 2 left, 4 asked: 2 s until there are 4
    assert 0 < caught.value.retry_after_s <= 2.0
    auth.admit(alice, cost=2)
    with pytest.raises(PayloadTooLarge, match="split it into batches of at most 10"):
        auth.admit(alice, cost=11)  # no wait would ever let it in: not a 429


def test_a_batch_refused_for_its_rate_is_told_when_it_will_fit(tmp_path: Path) -> None:
    auth = Auth(tmp_path, rate_per_s=10.0, burst=10)
    alice = Principal("alice", "runner", "key")
    auth.admit(alice, cost=5)
    auth.admit(alice)  # the gateway's door: one per request, before the body says it is a batch of 8
    with pytest.raises(RateLimited, match="a batch of 8 runs") as caught:
        auth.admit(alice, cost=8, paid=1)  # 4 left, 7 more asked
    assert 0.3 < caught.value.retry_after_s <= 0.4  # until the bucket holds all 8, door included
    time.sleep(caught.value.retry_after_s + 0.01)
    auth.admit(alice)  # the retry pays the door again, and the rest fits
    auth.admit(alice, cost=8, paid=1)
    with pytest.raises(PayloadTooLarge, match="burst of 10"):
        auth.admit(alice, cost=11, paid=1)


def test_no_rate_limit_when_asked(tmp_path: Path) -> None:
    auth = Auth(tmp_path, rate_per_s=None)
    for _ in range(1000):
        auth.admit(Principal("alice", "runner", "key"))
    with pytest.raises(SettingsError, match="admits nothing"):
        Auth(rate_per_s=0.0)


def test_bodies_over_the_limit_are_413(auth: Auth) -> None:
    small = Auth(max_body_bytes=100)
    small.check_size(100)
    small.check_size(None)
    with pytest.raises(PayloadTooLarge, match="101 bytes") as caught:
        small.check_size(101)
    assert caught.value.http_status == 413
    assert auth.max_body_bytes == 1 << 20


def test_open_auth_is_a_local_admin_on_loopback_only() -> None:
    auth = Auth.open()
    who = auth.authenticate({})
    assert who == Principal("local", "admin", "open")
    auth.authorize(who, "models.admin")
    for _ in range(500):
        auth.admit(who)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        auth.check_host(host)
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com"):
        with pytest.raises(SettingsError, match="loopback"):
            auth.check_host(host)
    Auth().check_host("0.0.0.0")  # with credentials any address is fine


def test_access_errors_form_one_branch_of_the_tree() -> None:
    for cls, status in ((Unauthenticated, 401), (Forbidden, 403), (PayloadTooLarge, 413)):
        assert issubclass(cls, AccessError) and issubclass(cls, WorkbenchError) and cls.http_status == status
    assert RateLimited("x", retry_after_s=2.2).headers == {"Retry-After": "3"}


def test_auth_from_the_environment(tmp_path: Path) -> None:
    env = {"AUTOGLM_JWT_SECRET": SECRET, "AUTOGLM_JWT_AUDIENCE": AUDIENCE, "AUTOGLM_JWT_ISSUER": ISSUER,
           "AUTOGLM_RATE_PER_S": "0", "AUTOGLM_MAX_BODY_BYTES": "2048"}
    auth = Auth.from_env(tmp_path, environ=env)
    assert auth.authenticate(bearer(token())).name == "carol"
    assert auth.max_body_bytes == 2048
    for _ in range(300):
        auth.admit(Principal("carol", "runner", "jwt"))
    with pytest.raises(SettingsError, match="AUTOGLM_BURST='many' is not a number"):
        Auth.from_env(tmp_path, environ={"AUTOGLM_BURST": "many"})
    # Only 0 turns a limit off: a negative or NaN setting (a slip in a manifest) is refused, not taken as "none".
    for name, value in [("AUTOGLM_RATE_PER_S", "-5"), ("AUTOGLM_RATE_PER_S", "nan"), ("AUTOGLM_LOGIN_FAILURES", "-1")]:
        with pytest.raises(SettingsError, match=f"{name}='{value}' is not a number >= 0"):
            Auth.from_env(tmp_path, environ={name: value})


# -- failed logins per client address ---------------------------------------------------------------


def test_failed_logins_lock_an_address_out_even_for_valid_credentials(tmp_path: Path) -> None:
    auth = Auth(tmp_path, login_failures=3, login_window_s=600)
    assert auth.keys is not None
    good = bearer(auth.keys.add("alice", "runner"))
    bad = bearer("agw_000000000000_" + "x" * 43)
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            auth.authenticate(bad, "203.0.113.5")
    # A success neither waits nor wipes the slate: else one valid key would let its holder guess others forever.
    assert auth.authenticate(good, "203.0.113.5").name == "alice"
    with pytest.raises(Unauthenticated):
        auth.authenticate(bad, "203.0.113.5")
    with pytest.raises(RateLimited, match="too many failed logins from 203.0.113.5") as caught:
        auth.authenticate(good, "203.0.113.5")
    assert 590 < caught.value.retry_after_s <= 600 and caught.value.http_status == 429
    assert "3 failed logins within 600 s" in (caught.value.hint or "")
    assert auth.authenticate(good, "203.0.113.6").name == "alice"  # another address
    assert Auth(tmp_path, login_failures=None).authenticate(good, "203.0.113.5").name == "alice"


def test_a_lockout_ends_when_its_window_passes(tmp_path: Path) -> None:
    auth = Auth(tmp_path, login_failures=2, login_window_s=0.3)
    assert auth.keys is not None
    good = bearer(auth.keys.add("alice", "runner"))
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            auth.authenticate({}, "203.0.113.5")
    with pytest.raises(RateLimited) as caught:
        auth.authenticate(good, "203.0.113.5")
    time.sleep(caught.value.retry_after_s + 0.01)
    assert auth.authenticate(good, "203.0.113.5").name == "alice"
    with pytest.raises(Unauthenticated):  # counted afresh: one failure does not lock it again
        auth.authenticate({}, "203.0.113.5")
    assert auth.authenticate(good, "203.0.113.5").name == "alice"


def test_failed_logins_are_tracked_for_a_bounded_number_of_addresses() -> None:
    limiter = FailedLogins(2, 600, max_addresses=3)
    assert limiter.failed("10.0.0.1") is False and limiter.failed("10.0.0.1") is True
    assert limiter.locked_for("10.0.0.1") > 0
    for n in range(2, 100):
        limiter.failed(f"10.0.0.{n}")
    assert len(limiter) == 3
    assert limiter.locked_for("10.0.0.1") == 0.0  # the least recently seen were forgotten
    with pytest.raises(SettingsError, match="locks out everyone or no one"):
        FailedLogins(0, 60)


@pytest.mark.parametrize(("trusted", "peer", "forwarded", "client"), [
    ((), "10.0.0.5", "198.51.100.7", "10.0.0.5"),  # by default X-Forwarded-For is anyone's to write
    (("10.0.0.5",), "10.0.0.5", "198.51.100.7", "198.51.100.7"),
    (("10.0.0.5",), "10.0.0.6", "198.51.100.7", "10.0.0.6"),  # not from the trusted proxy
    (("10.0.0.5",), "10.0.0.5", None, "10.0.0.5"),
    # Read from the right: what the client wrote itself (the left) is passed over.
    (("10.0.0.5",), "10.0.0.5", "1.2.3.4, 198.51.100.7", "198.51.100.7"),
    (("10.0.0.0/24",), "10.0.0.5", "198.51.100.7, 10.0.0.9", "198.51.100.7"),  # past every trusted hop
    (("10.0.0.5",), "10.0.0.5", "not-an-address", "10.0.0.5"),
    (("::1",), "::1", "2001:db8::7", "2001:db8::7"),
    (("10.0.0.5",), None, "198.51.100.7", None),
], ids=["untrusted-default", "trusted", "other-peer", "no-header", "rightmost", "network", "garbage", "ipv6",
        "no-peer"])
def test_x_forwarded_for_is_believed_only_from_trusted_proxies(trusted: tuple[str, ...], peer: str | None,
                                                               forwarded: str | None, client: str | None) -> None:
    assert Auth(trusted_proxies=trusted).client_address(peer, forwarded) == client


def test_login_limits_and_trusted_proxies_from_the_environment(tmp_path: Path) -> None:
    auth = Auth.from_env(tmp_path, environ={"AUTOGLM_LOGIN_FAILURES": "4", "AUTOGLM_LOGIN_WINDOW_S": "30",
                                            "AUTOGLM_TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16"})
    assert auth.failed_logins is not None
    assert (auth.failed_logins.limit, auth.failed_logins.window_s) == (4, 30.0)
    assert auth.client_address("10.1.2.3", "198.51.100.7") == "198.51.100.7"
    assert Auth.from_env(tmp_path, environ={}).failed_logins is not None  # on by default
    assert Auth.from_env(tmp_path, environ={"AUTOGLM_LOGIN_FAILURES": "0"}).failed_logins is None
    with pytest.raises(SettingsError, match="trusted proxy 'proxy.internal' is not an IP address"):
        Auth.from_env(tmp_path, environ={"AUTOGLM_TRUSTED_PROXIES": "proxy.internal"})


def test_a_public_key_from_the_environment_checks_rs256_tokens(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    auth = Auth.from_env(tmp_path, environ={"AUTOGLM_JWT_PUBLIC_KEY": str(pem), "AUTOGLM_JWT_AUDIENCE": AUDIENCE,
                                            "AUTOGLM_JWT_ISSUER": ISSUER})
    assert auth.jwt_algorithms == ("RS256",)  # the default with a public key
    assert auth.authenticate(bearer(token(key=private, algorithm="RS256"))).name == "carol"  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="algorithm"):
        auth.authenticate(bearer(token()))  # an HS256 token


# -- the command line -------------------------------------------------------------------------------


def autoglm(*args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "autoglm"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "workbench.fronts.cli"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env=env)


def test_autoglm_keys_add_prints_a_key_that_authenticates(tmp_path: Path) -> None:
    added = autoglm("keys", "add", "ci-bot", "--role", "runner", "--data-dir", str(tmp_path))
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("agw_") and "\n" not in key
    assert "only time it is shown" in added.stderr
    who = Auth(tmp_path).authenticate(bearer(key))
    assert who == Principal("ci-bot", "runner", "key")

    listed = autoglm("keys", "list", "--data-dir", str(tmp_path))
    assert listed.returncode == 0 and "ci-bot" in listed.stdout and "runner" in listed.stdout
    assert key not in listed.stdout and key.removeprefix("agw_").partition("_")[2] not in listed.stdout
    as_json = json.loads(autoglm("keys", "--data-dir", str(tmp_path), "list", "--json").stdout)
    assert [(row["name"], row["revoked"]) for row in as_json] == [("ci-bot", False)]

    again = autoglm("keys", "add", "ci-bot", "--role", "admin", "--data-dir", str(tmp_path))
    assert again.returncode == 2 and "autoglm: a key named 'ci-bot' exists" in again.stderr
    assert "Traceback" not in again.stderr

    revoked = autoglm("keys", "revoke", "ci-bot", "--data-dir", str(tmp_path))
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    with pytest.raises(Unauthenticated):
        Auth(tmp_path).authenticate(bearer(key))


def test_autoglm_keys_refuses_an_unknown_role(tmp_path: Path) -> None:
    done = autoglm("keys", "add", "x", "--role", "root", "--data-dir", str(tmp_path))
    assert done.returncode == 2 and "autoglm: unknown role 'root'" in done.stderr
    assert "hint: roles: admin, runner, viewer" in done.stderr
    assert not (tmp_path / KEYS_FILE).exists()


def test_custom_roles_from_a_file_for_keys_and_the_server(tmp_path: Path) -> None:
    roles = tmp_path / "roles.yaml"
    roles.write_text("qa-runner:\n  actions: [chains.list, chains.invoke]\n  chains: [qa]\n", encoding="utf-8")
    added = autoglm("keys", "add", "bot", "--role", "qa-runner", "--roles", str(roles), "--data-dir", str(tmp_path))
    assert added.returncode == 0, added.stderr
    auth = Auth.from_env(tmp_path, environ={"AUTOGLM_ROLES": str(roles)})
    who = auth.authenticate(bearer(added.stdout.strip()))
    assert who.role == "qa-runner"
    auth.authorize(who, "chains.invoke", "qa")
    with pytest.raises(Forbidden, match="on chain 'summarize'"):
        auth.authorize(who, "chains.invoke", "summarize")
    with pytest.raises(Forbidden):
        auth.authorize(who, "runs.read")


@pytest.mark.parametrize(("text", "message"), [
    ("- viewer\n", "not a mapping"),
    ("odd: [chains.delete]\n", "unknown action 'chains.delete'"),
    ("odd: {actions: [chains.list], scope: all}\n", "unknown field 'scope'"),
    ("odd: [unclosed\n", "not YAML"),
], ids=["list", "bad-action", "bad-field", "bad-yaml"])
def test_a_bad_roles_file_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SettingsError, match=message):
        load_roles(path)
