"""deploy/: the Kubernetes manifests against Kubernetes' own schemas, and the Dockerfile read as a build would."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' (kubernetes-validate)")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
# The Kubernetes version the manifests are written for (the oldest minor still under upstream support when
# they were written); strict schemas, so a misspelt field is an error, not an ignored key.
KUBERNETES_VERSION = "1.33"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
NON_ROOT_UID = 10001


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _resources() -> dict[str, dict[str, Any]]:
    """Every manifest by 'folder/file:kind/name', e.g. 'gpu/deployment.yaml:deployment/autoglm'."""
    found = {}
    for path in MANIFESTS:
        for doc in _documents(path):
            found[f"{path.relative_to(K8S)}:{doc['kind'].lower()}/{doc['metadata']['name']}"] = doc
    return found


def _deployments() -> dict[str, dict[str, Any]]:
    return {key: doc for key, doc in _resources().items() if doc["kind"] == "Deployment"}


def _one(kind: str, folder: Path = K8S) -> dict[str, Any]:
    [doc] = [doc for path in folder.glob("*.yaml") for doc in _documents(path) if doc["kind"] == kind]
    return doc


def _gateway(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return container


# --- Kubernetes -------------------------------------------------------------------------------------------------


def test_the_folder_holds_what_a_deployment_needs() -> None:
    kinds = sorted(doc["kind"] for path in K8S.glob("*.yaml") for doc in _documents(path))
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service"]
    assert [doc["kind"] for doc in _documents(K8S / "gpu" / "deployment.yaml")] == ["Deployment"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_passes_the_kubernetes_schema(path: Path) -> None:
    for doc in _documents(path):
        assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_the_validator_catches_a_misspelt_field() -> None:
    """The schema check above can fail: strict mode rejects a field Kubernetes does not know."""
    deployment = _one("Deployment")
    _gateway(deployment)["readinesProbe"] = _gateway(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("key", sorted(_deployments()))
def test_probes_ask_health_on_the_served_port(key: str) -> None:
    container = _gateway(_deployments()[key])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    args = container["args"]
    assert ports["http"] == int(args[args.index("--port") + 1])
    assert ports["grpc"] == int(args[args.index("--grpc-port") + 1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/health", probe
        assert check["port"] in ("http", ports["http"]), probe


@pytest.mark.parametrize("key", sorted(_deployments()))
def test_the_service_reaches_the_container_ports(key: str) -> None:
    deployment, service = _deployments()[key], _one("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {port["name"]: port["containerPort"] for port in _gateway(deployment)["ports"]}
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        assert target in container_ports or target in container_ports.values(), port


@pytest.mark.parametrize("key", sorted(_deployments()))
def test_pods_run_as_non_root_on_a_read_only_root(key: str) -> None:
    pod = _deployments()[key]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == NON_ROOT_UID
    assert pod["automountServiceAccountToken"] is False
    writable = {volume["name"] for volume in pod["volumes"] if "emptyDir" in volume}
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        # What the container writes must be a volume, the root filesystem being read-only.
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert "/data" in mounts and mounts["/data"]["name"] in writable, container["name"]
    gateway_mounts = {m["mountPath"]: m for m in _gateway(_deployments()[key])["volumeMounts"]}
    assert gateway_mounts["/tmp"]["name"] in writable  # the image points every cache under /tmp
    assert gateway_mounts["/models"]["readOnly"] is True


@pytest.mark.parametrize("key", sorted(_deployments()))
def test_every_volume_and_reference_is_defined(key: str) -> None:
    pod = _deployments()[key]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        assert {m["name"] for m in container["volumeMounts"]} <= volumes.keys(), container["name"]
    assert volumes["chain"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == _one("PersistentVolumeClaim")["metadata"]["name"]
    # The Secret is made by hand (deploy/README.md), never committed: the manifests only name it.
    assert volumes["auth"]["secret"]["secretName"] == "autoglm-auth"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in _gateway(_deployments()[key])["env"]}
    assert env == {"AUTOGLM_JWT_SECRET": {"name": "autoglm-auth", "key": "jwt-secret", "optional": True},
                   "AUTOGLM_KEY_PEPPER": {"name": "autoglm-auth", "key": "key-pepper", "optional": True}}
    assert not any(doc["kind"] == "Secret" for doc in _resources().values())


def test_the_init_container_copies_the_keys_the_secret_holds(tmp_path: Path) -> None:
    """Its one-line program, run with the Secret's and the data directory's paths pointed at temporary ones."""
    [init] = _one("Deployment")["spec"]["template"]["spec"]["initContainers"]
    program, flag, source = init["command"]
    assert (program, flag) == ("python", "-c")
    secret, data = tmp_path / "secret", tmp_path / "data"
    secret.mkdir(), data.mkdir()
    local = source.replace("/secrets/auth/", f"{secret}/").replace("/data/", f"{data}/")
    assert local != source
    subprocess.run([sys.executable, "-c", local], check=True)  # a Secret without keys: nothing to copy
    assert list(data.iterdir()) == []
    (secret / "keys.sqlite3").write_bytes(b"SQLite format 3\0")
    (secret / "keys.pepper").write_text("cGVwcGVy")
    (secret / "jwt-secret").write_text("not copied")
    subprocess.run([sys.executable, "-c", local], check=True)
    assert sorted(p.name for p in data.iterdir()) == ["keys.pepper", "keys.sqlite3"]
    assert (data / "keys.sqlite3").read_bytes() == b"SQLite format 3\0"


def test_only_the_gpu_variant_asks_for_a_gpu() -> None:
    cpu = _one("Deployment")
    gpu = _one("Deployment", K8S / "gpu")
    resources = _gateway(gpu)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(_gateway(cpu)["resources"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["spec"]["template"]["spec"][
        "tolerations"]
    assert _gateway(gpu)["image"].endswith(":cuda") and _gateway(cpu)["image"].endswith(":cpu")
    # Same Deployment otherwise: applying gpu/ after the folder replaces the CPU one, nothing else changes.
    assert gpu["metadata"] == cpu["metadata"]
    for deployment in (cpu, gpu):
        _gateway(deployment).pop("resources")
        _gateway(deployment).pop("image")
        deployment["spec"]["template"]["spec"].pop("tolerations", None)
        deployment["spec"]["template"]["spec"]["initContainers"][0].pop("image")
    assert gpu == cpu


def test_the_config_map_serves_the_spec_in_deploy() -> None:
    from workbench.chains.spec import parse_spec

    text = _one("ConfigMap")["data"]["chain.yaml"]
    assert text == (DEPLOY / "chain.yaml").read_text()
    spec = parse_spec(text, known_models={"tiny"})
    args = _gateway(_one("Deployment"))["args"]
    assert args[args.index("--spec") + 1] == "/config/chain.yaml"
    assert {source.partition("=")[0] for flag, source in zip(args, args[1:]) if flag == "--model"} == set(spec.models())


# --- the Dockerfile -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    text: str
    line: int

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form CMD, ENTRYPOINT or HEALTHCHECK CMD."""
        text = self.text.split(" CMD ", 1)[-1] if self.keyword == "HEALTHCHECK" else self.text
        value = json.loads(text)
        assert isinstance(value, list), f"line {self.line}: {self.keyword} in shell form"
        return value


def _instructions(path: Path) -> list[Instruction]:
    """A Dockerfile's instructions, continuation lines joined and comments dropped, as docker reads them."""
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction is dropped
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if not continued:
            keyword, _, rest = " ".join(pending).partition(" ")
            found.append(Instruction(keyword.upper(), rest.strip(), start))
            pending = []
    assert not pending, f"{path}: the last instruction ends in a continuation"
    return found


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    # Go's filepath.Match, as Docker's patternmatcher uses it: * and ? stop at '/', ** crosses directories.
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            out += "(.*/)?" if token.endswith("/") else ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out + "(/.*)?")  # a directory's pattern covers what is inside it


def _excluded(path: str, patterns: list[str]) -> bool:
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _dockerignore_regex(pattern.lstrip("!")).fullmatch(path):
            excluded = not negated
    return excluded


def _dockerignore() -> list[str]:
    lines = (line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _tracked(source: str) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--", source], cwd=ROOT, capture_output=True, text=True, check=True)
    return listed.stdout.split()


DOCKERFILE = _instructions(DEPLOY / "Dockerfile")


def _keyword(keyword: str) -> list[Instruction]:
    return [i for i in DOCKERFILE if i.keyword == keyword]


def _command() -> list[str]:
    """What the final image runs: ENTRYPOINT then CMD of the last stage."""
    final = max(i for i, ins in enumerate(DOCKERFILE) if ins.keyword == "FROM")
    last = {ins.keyword: ins for ins in DOCKERFILE[final:]}
    return last["ENTRYPOINT"].exec_form() + last["CMD"].exec_form()


def test_every_copy_source_is_in_the_build_context() -> None:
    copies = [c for c in _keyword("COPY") if not c.text.startswith("--from=")]
    assert copies
    patterns = _dockerignore()
    for copy in copies:
        *sources, _ = shlex.split(copy.text)
        for source in sources:
            files = _tracked(source)
            assert files, f"line {copy.line}: COPY {source}: no such file in the repository"
            kept = [f for f in files if not _excluded(f, patterns)]
            assert kept, f"line {copy.line}: COPY {source}: .dockerignore leaves it out of the build context"
            if (ROOT / source).is_file():
                assert kept == [source], f"line {copy.line}: .dockerignore leaves out {source}"


def test_the_dockerignore_keeps_the_context_small() -> None:
    patterns = _dockerignore()
    for heavy in ("tests/test_deploy.py", "notebooks/01-quickstart.ipynb", ".venv/bin/python", "deploy/Dockerfile",
                  "workbench/__pycache__/bench.cpython-311.pyc"):
        assert _excluded(heavy, patterns), heavy
    assert not _excluded("workbench/bench.py", patterns)


def test_the_package_link_to_the_front_end_resolves_in_the_image() -> None:
    """workbench's widgets link to extensions/; the files behind the link are copied beside the package."""
    link = ROOT / "workbench/fronts/notebook/widgets/_extensions"
    assert link.is_symlink()
    target = link.resolve().relative_to(ROOT)
    copied = {s for c in _keyword("COPY") for s in shlex.split(c.text)[:-1]}
    for asset in ("trace_viewer.js", "trace_viewer.css"):
        assert f"{target}/{asset}" in copied


def test_the_image_runs_autoglm_serve_as_a_user_on_all_interfaces() -> None:
    command = _command()
    assert command[:2] == ["autoglm", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    exposed = _keyword("EXPOSE")[-1].text.split()
    assert exposed == [command[command.index("--port") + 1], command[command.index("--grpc-port") + 1]]
    assert command[command.index("--spec") + 1].startswith("/config/")
    assert command[command.index("--model") + 1].partition("=")[2].startswith("/models/")
    [user] = _keyword("USER")
    uid = user.text.partition(":")[0]
    assert uid.isdigit() and int(uid) == NON_ROOT_UID  # numeric, so runAsNonRoot can verify it
    assert DOCKERFILE.index(user) > max(i for i, ins in enumerate(DOCKERFILE) if ins.keyword == "RUN")


def test_the_healthcheck_asks_health_on_the_served_port() -> None:
    [check] = _keyword("HEALTHCHECK")
    probe = check.exec_form()
    assert probe[:2] == ["python", "-c"]
    compile(probe[2], "HEALTHCHECK", "exec")
    [url] = re.findall(r"http://[^'\"]+", probe[2])
    command = _command()
    assert urlparse(url).path == "/health"
    assert str(urlparse(url).port) == command[command.index("--port") + 1]


def test_the_image_installs_cpu_torch_and_the_serve_extra_under_the_constraints() -> None:
    [base] = [a for a in _keyword("ARG") if a.text.startswith("PYTHON_IMAGE=")]
    assert base.text == "PYTHON_IMAGE=python:3.11-slim"
    [index] = [a for a in _keyword("ARG") if a.text.startswith("TORCH_INDEX=")]
    assert index.text == "TORCH_INDEX=https://download.pytorch.org/whl/cpu"
    installs = [r.text for r in _keyword("RUN") if "pip install" in r.text]
    assert any("-c constraints.txt" in i and '--index-url "${TORCH_INDEX}" torch' in i for i in installs)
    assert any("-c constraints.txt" in i and '".[serve]"' in i for i in installs)
    assert "torch==" in (ROOT / "constraints.txt").read_text()


@pytest.mark.parametrize("key", sorted(_deployments()))
def test_the_kubernetes_args_are_the_image_command(key: str) -> None:
    """The manifests spell out the image's CMD, so the two cannot drift apart."""
    assert ["autoglm", *_gateway(_deployments()[key])["args"]] == _command()


def test_the_dockerfile_needs_no_frontend_from_a_registry() -> None:
    """No `# syntax=` directive: BuildKit would fetch that frontend image from Docker Hub before building."""
    first = (DEPLOY / "Dockerfile").read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.IGNORECASE), first


def _docker_daemon() -> bool:
    """Whether a Docker daemon answers; quick when none does (CI has the CLI at most, and no socket)."""
    if shutil.which("docker") is None:
        return False
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Extra `docker build` arguments, for a machine without Docker Hub or download.pytorch.org: e.g.
# "--network host --build-arg PYTHON_IMAGE=local/python:3.11-slim --build-arg TORCH_INDEX=http://127.0.0.1:8765/simple"
# (deploy/build_local_base.sh makes that base; deploy/README.md says how it was seen working).
BUILD_ARGS_ENV = "AUTOGLM_DOCKER_BUILD_ARGS"


@pytest.fixture(scope="module")
def image() -> str:
    """deploy/Dockerfile built by the local Docker daemon, once per module; skipped where none answers."""
    if not _docker_daemon():
        pytest.skip("no docker daemon to build deploy/Dockerfile with")
    tag = "autoglm-workbench:test"
    extra = shlex.split(os.environ.get(BUILD_ARGS_ENV, ""))
    subprocess.run(["docker", "build", *extra, "-f", "deploy/Dockerfile", "-t", tag, "."], cwd=ROOT, check=True,
                   timeout=1800)
    return tag


@pytest.mark.slow
def test_the_image_builds_and_runs_as_non_root(image: str) -> None:
    whoami = subprocess.run(["docker", "run", "--rm", "--entrypoint", "id", image, "-u"], capture_output=True,
                            text=True, check=True, timeout=120)
    assert whoami.stdout.strip() == str(NON_ROOT_UID)
    usage = subprocess.run(["docker", "run", "--rm", image, "serve", "--help"], capture_output=True, text=True,
                           check=True, timeout=120)
    assert "--spec" in usage.stdout


def _docker(*args: str, timeout: float = 120) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=timeout).stdout.strip()


def _logs(container: str) -> str:
    done = subprocess.run(["docker", "logs", "--tail", "40", container], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


@pytest.mark.slow
def test_the_image_serves_as_the_readme_runs_it(image: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """deploy/README.md's commands on the built image: a key made by `keys add` in the data volume, then the
    server with a read-only root, the models and the spec mounted read-only. Docker's own HEALTHCHECK turns
    healthy, /health answers without a key, the chain refuses a request without one and answers with one, over
    REST and gRPC, and the server runs as uid 10001."""
    import httpx

    # Only now: the session-scoped tiny model would be built before the module-scoped image fixture skips.
    tiny_path = request.getfixturevalue("tiny_path")
    models, data = tmp_path / "models", tmp_path / "data"
    shutil.copytree(tiny_path, models / "tiny")
    for path in [models, *models.rglob("*")]:  # the README's `chmod -R a+rX models`: uid 10001 reads them
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    data.mkdir()
    data.chmod(0o777)  # writable by uid 10001 whoever runs the test (the README's `chown 10001 data`)
    pepper = os.urandom(32).hex()
    env = {**os.environ, "AUTOGLM_KEY_PEPPER": pepper}
    added = subprocess.run(["docker", "run", "--rm", "-e", "AUTOGLM_KEY_PEPPER", "-v", f"{data}:/data", image,
                            "keys", "add", "ci", "--role", "runner"], env=env, capture_output=True, text=True,
                           check=True, timeout=120)
    [key] = re.findall(r"agw_\S+", added.stdout)
    name = f"autoglm-test-{os.getpid()}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--read-only", "--tmpfs", "/tmp",
                    "-p", "127.0.0.1::8000", "-p", "127.0.0.1::50051", "-e", "AUTOGLM_KEY_PEPPER",
                    "-v", f"{models}:/models:ro", "-v", f"{DEPLOY / 'chain.yaml'}:/config/chain.yaml:ro",
                    "-v", f"{data}:/data", image], env=env, capture_output=True, text=True, check=True, timeout=120)
    try:
        deadline = time.monotonic() + 150  # the first check runs one interval (15 s) after the start
        while (health := _docker("inspect", "-f", "{{.State.Health.Status}}", name)) != "healthy":
            assert _docker("inspect", "-f", "{{.State.Running}}", name) == "true", _logs(name)
            assert health != "unhealthy" and time.monotonic() < deadline, f"{health}: {_logs(name)}"
            time.sleep(1)
        assert _docker("exec", name, "id", "-u") == str(NON_ROOT_UID)
        assert _docker("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", name) == "true"
        http = _docker("port", name, "8000/tcp").splitlines()[0]
        assert httpx.get(f"http://{http}/health", timeout=30).json()["status"] == "ok"
        url = f"http://{http}/v1/chains/qa/invoke"
        body = {"inputs": {"question": "What is 2 + 2?"}}
        assert httpx.post(url, json=body, timeout=60).status_code == 401  # no key: no run
        answered = httpx.post(url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=120)
        assert answered.status_code == 200, answered.text
        assert answered.json()["status"] == "ok" and answered.json()["output"]

        grpc = pytest.importorskip("grpc")
        from workbench.fronts.server import chain_pb2, chain_pb2_grpc

        request = chain_pb2.InvokeRequest(chain="qa", inputs_json=json.dumps(body["inputs"]))
        with grpc.insecure_channel(_docker("port", name, "50051/tcp").splitlines()[0]) as channel:
            stub = chain_pb2_grpc.ChainServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Invoke(request, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = stub.Invoke(request, metadata=[("authorization", f"Bearer {key}")], timeout=120)
        assert json.loads(reply.output_json)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)


def test_the_secret_names_are_the_ones_the_server_reads(tmp_path: Path) -> None:
    """The env the manifests set is what the server's Auth reads: a JWT signed with AUTOGLM_JWT_SECRET gets in."""
    jwt = pytest.importorskip("jwt")
    from workbench.fronts.server.auth import PEPPER_ENV, Auth

    names = {e["name"] for e in _gateway(_one("Deployment"))["env"]}
    assert PEPPER_ENV in names
    secret = "s" * 32
    auth = Auth.from_env(tmp_path, environ={name: secret for name in names})
    token = jwt.encode({"sub": "ci", "role": "runner", "exp": 4102444800}, secret, algorithm="HS256")
    who = auth.authenticate({"authorization": f"Bearer {token}"})
    assert (who.name, who.role, who.via) == ("ci", "runner", "jwt")


def test_the_image_keeps_keys_and_sessions_in_the_data_volume() -> None:
    env = " ".join(e.text for e in _keyword("ENV"))
    assert "AUTOGLM_DATA_DIR=/data" in env  # so `docker run IMAGE keys add NAME` writes where serve reads
    command = _command()
    assert command[command.index("--data-dir") + 1] == "/data"
    assert _keyword("VOLUME")[-1].exec_form() == ["/data"]


def _serve_parser() -> Any:
    import argparse

    from workbench.fronts.cli import build_parser

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    if "serve" not in commands.choices:
        pytest.skip("this checkout's autoglm has no serve command yet (branch gw-core)")
    return commands.choices["serve"]


@pytest.mark.parametrize("where", ["Dockerfile", "deployment.yaml", "gpu/deployment.yaml"])
def test_the_command_line_parses_with_the_real_autoglm_serve(where: str) -> None:
    serve = _serve_parser()
    if where == "Dockerfile":
        args = _command()[2:]
    else:
        args = _gateway(_documents(K8S / where)[0])["args"][1:]
    parsed = serve.parse_args(args)  # argparse exits (SystemExit 2) on a flag autoglm serve does not have
    assert parsed.host == "0.0.0.0" and parsed.port == 8000


@pytest.mark.slow
def test_the_pod_command_serves_and_passes_the_image_healthcheck(tiny_path: Path, tmp_path: Path) -> None:
    """The Deployment's command (the image's, plus gRPC) as a real child process, its container paths pointed at
    temporary directories and its host at loopback: the image's HEALTHCHECK program passes, a key made with
    `autoglm keys add` invokes the chain, and the gRPC port takes connections."""
    _serve_parser()
    import httpx

    from helpers import free_port

    models, config, data = tmp_path / "models", tmp_path / "config", tmp_path / "data"
    models.mkdir(), config.mkdir()
    (models / "tiny").symlink_to(tiny_path)
    shutil.copyfile(DEPLOY / "chain.yaml", config / "chain.yaml")
    port = str(free_port())
    grpc_port = next(p for p in iter(lambda: str(free_port()), None) if p != port)
    args = _gateway(_one("Deployment"))["args"]
    image_port, image_grpc_port = args[args.index("--port") + 1], args[args.index("--grpc-port") + 1]

    def local(word: str) -> str:
        word = word.replace("/models/", f"{models}/").replace("/config/", f"{config}/")
        return {"/data": str(data), "0.0.0.0": "127.0.0.1", image_port: port, image_grpc_port: grpc_port}.get(word, word)

    cli = [sys.executable, "-m", "workbench.fronts.cli"]
    import workbench

    # The child imports the workbench this test does (a checkout, or the installed package).
    here = str(Path(workbench.__file__).resolve().parents[1])
    env = {**os.environ, "AUTOGLM_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1", "PYTHONPATH": here}
    added = subprocess.run([*cli, "keys", "add", "ci", "--role", "runner"], env=env, capture_output=True, text=True,
                           check=True, timeout=120)
    [key] = re.findall(r"agw_\S+", added.stdout)
    [check] = _keyword("HEALTHCHECK")
    probe = [local(word) for word in check.exec_form()]
    probe[2] = probe[2].replace(f":{image_port}/", f":{port}/")
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([*cli, *[local(word) for word in args]], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the health check never passed"
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/chains/qa/invoke"
        refused = httpx.post(url, json={"inputs": {"question": "Why?"}}, timeout=60)
        assert refused.status_code == 401  # no key: no run
        answered = httpx.post(url, json={"inputs": {"question": "Why?"}}, headers={"authorization": f"Bearer {key}"},
                              timeout=60)
        assert answered.status_code == 200, answered.text
        assert answered.json()["status"] == "ok" and answered.json()["output"]
        socket.create_connection(("127.0.0.1", int(grpc_port)), timeout=10).close()  # the gRPC front listens
    finally:
        server.terminate()
        server.wait(30)
        log.close()
