"""compose.yaml and the Dockerfile: validated by a real compose parser, then checked for what the stack needs.

No Docker engine runs here, but Debian's ``docker-compose`` (1.29) parses and validates a compose file
without one (``.ci/run`` installs it). The end-to-end run of the same commands and environment as native
processes lives with the engine service's tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
HOTLORA_VAR = re.compile(r"\bHOTLORA_[A-Z0-9_]+\b")

# The variables the brief names for each service (flags --bootstrap, --model, ... of `hotlora engine`/`agent`).
ENGINE_VARS = {
    "HOTLORA_BOOTSTRAP",
    "HOTLORA_MODEL",
    "HOTLORA_TOPIC_PREFIX",
    "HOTLORA_PARTITIONS",
    "HOTLORA_CHECKPOINT_DIR",
}
AGENT_VARS = {"HOTLORA_BOOTSTRAP", "HOTLORA_TOPIC_PREFIX", "HOTLORA_MODEL"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {key: str(value) for key, value in raw.items()}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path), from short-syntax volume entries."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        out[target] = source
    return out


# ---------------------------------------------------------------- the real parser


def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose (the compose parser) is not installed; `apt-get install -y docker-compose` "
            "(Debian's 1.29) provides it, and .ci/run installs it where apt-get exists"
        )
    return exe


def run_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # --project-directory keeps relative paths (the build context) resolving against the repository root.
    cmd = [docker_compose(), "-f", str(path), "--project-directory", str(ROOT), *extra, "config", "-q"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"], ["--profile", "gpu"]], ids=["default", "cpu", "gpu"])
def test_compose_file_is_valid(profile: list[str]) -> None:
    result = run_config(COMPOSE_FILE, *profile)
    assert result.returncode == 0, result.stdout + result.stderr


def _break_retries(doc: dict[str, Any]) -> str:
    doc["services"]["kafka"]["healthcheck"]["retries"] = "many"
    return "retries"


def _break_condition(doc: dict[str, Any]) -> str:
    doc["services"]["engine"]["depends_on"]["kafka"]["condition"] = "service_happy"
    return "service_happy"


def _break_unknown_key(doc: dict[str, Any]) -> str:
    doc["services"]["agent"]["replicas_per_host"] = 8
    return "replicas_per_host"


def _break_volume_type(doc: dict[str, Any]) -> str:
    doc["services"]["engine"]["volumes"] = "checkpoints:/checkpoints"
    return "volumes"


@pytest.mark.parametrize("breaker", [_break_retries, _break_condition, _break_unknown_key, _break_volume_type])
def test_broken_copy_is_rejected(breaker: Any, tmp_path: Path) -> None:
    doc = compose()
    intact = tmp_path / "intact.yaml"
    intact.write_text(yaml.safe_dump(doc))
    ok = run_config(intact)
    assert ok.returncode == 0, "the re-serialised copy should still be valid: " + ok.stdout + ok.stderr
    culprit = breaker(doc)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(doc))
    result = run_config(broken)
    assert result.returncode != 0, f"{breaker.__name__} was accepted"
    assert culprit in result.stdout + result.stderr, "the error should name what is wrong: " + result.stderr


# ---------------------------------------------------------------- structure


def test_kafka_is_kraft_with_healthcheck_and_named_volume() -> None:
    doc = compose()
    kafka = doc["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    kafka_env = env(kafka)
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_CONTROLLER_QUORUM_VOTERS" in kafka_env and "CLUSTER_ID" in kafka_env
    assert not any("ZOOKEEPER" in key for key in kafka_env)
    test = kafka["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert re.search(r"/opt/kafka/bin/kafka-[a-z-]+\.sh", command), command
    log_dir = kafka_env["KAFKA_LOG_DIRS"]
    assert mounts(kafka)[log_dir] in doc["volumes"], "Kafka's log directory must be a named volume"
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]


def test_cpu_engine_waits_for_healthy_kafka_and_runs_on_cpu() -> None:
    engine = services()["engine-cpu"]
    assert engine["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "build" in engine and engine["profiles"] == ["cpu"]
    assert engine["command"][0] == "engine"
    engine_env = env(engine)
    assert engine_env.keys() >= ENGINE_VARS
    assert engine_env["HOTLORA_BOOTSTRAP"] == "kafka:9092"
    assert engine_env["HOTLORA_DEVICE"] == "cpu"
    int(engine_env["HOTLORA_PARTITIONS"])


def test_model_is_prepared_before_the_engines_start() -> None:
    svc = services()
    init = svc["model-init"]
    for engine in (svc["engine"], svc["engine-cpu"]):
        assert engine["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
        model = env(engine)["HOTLORA_MODEL"]
        assert model.startswith("/models/") and mounts(engine)["/models"] == mounts(init)["/models"]


def test_gpu_engines_scale_one_gpu_each() -> None:
    """``--profile gpu up --scale engine=2``: every replica sees every GPU and claims one (cuda:claim)
    through locks in a volume of their own; the rest of their settings equal the CPU engine's."""
    svc = services()
    gpu = svc["engine"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert all(d.get("count") == "all" for d in devices)
    gpu_env = env(gpu)
    assert gpu_env["HOTLORA_DEVICE"] == "cuda:claim"
    locks = gpu_env["HOTLORA_DEVICE_LOCK_DIR"]
    assert mounts(gpu)[locks] in compose()["volumes"] and mounts(gpu)[locks] != "checkpoints"
    assert gpu["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert gpu_env.keys() >= ENGINE_VARS
    for key in ENGINE_VARS:
        assert gpu_env[key] == env(svc["engine-cpu"])[key]
    assert mounts(gpu)["/checkpoints"] == mounts(svc["engine-cpu"])["/checkpoints"]


def test_agent_scales() -> None:
    agent = services()["agent"]
    assert agent["command"][0] == "agent"
    agent_env = env(agent)
    assert agent_env.keys() >= AGENT_VARS
    assert agent_env["HOTLORA_BOOTSTRAP"] == env(services()["engine"])["HOTLORA_BOOTSTRAP"]
    assert agent_env["HOTLORA_TOPIC_PREFIX"] == env(services()["engine"])["HOTLORA_TOPIC_PREFIX"]
    # Replicas need distinct adapter ids (their hostnames) and no fixed names or host ports.
    assert "HOTLORA_ADAPTER" not in agent_env
    comments = " ".join(line.strip() for line in COMPOSE_FILE.read_text().splitlines() if line.strip().startswith("#"))
    assert re.search(r"HOTLORA_ADAPTER[^.]*not set[^.]*hostname", comments), "say how agents get their ids"
    for key in ("container_name", "hostname", "ports"):
        assert key not in agent, key
    assert agent["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_checkpoint_volume_is_shared() -> None:
    doc = compose()
    svc = doc["services"]
    checkpoint_dir = env(svc["engine"])["HOTLORA_CHECKPOINT_DIR"]
    volume = mounts(svc["engine"])[checkpoint_dir]
    assert volume in doc["volumes"]
    assert volume in mounts(svc["agent"]).values()
    assert mounts(svc["engine-cpu"])[checkpoint_dir] == volume


def _names_the_code_reads() -> set[str]:
    from hotlora.engine.kafka.service_config import ServiceConfig, env_name

    names = {env_name(field.name) for field in dataclasses.fields(ServiceConfig)}
    for folder in ("hotlora", "engine", "agents"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(HOTLORA_VAR.findall(path.read_text()))
    return names


def test_every_hotlora_variable_is_one_the_code_reads() -> None:
    known = _names_the_code_reads()
    for name, service in services().items():
        unknown = {key for key in env(service) if key.startswith("HOTLORA_")} - known
        assert not unknown, f"{name} sets variables that nothing reads: {sorted(unknown)}"


def test_every_hotlora_variable_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    used = set(HOTLORA_VAR.findall(COMPOSE_FILE.read_text()))
    assert used, "compose.yaml sets no HOTLORA_* variables"
    missing = sorted(name for name in used if name not in readme)
    assert not missing, f"README.md does not document {missing}"
    assert "docker compose --profile cpu up --scale agent=8" in readme
    assert "docker compose --profile gpu up --scale engine=2" in readme


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_hotlora() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    entrypoints = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["hotlora"]


def test_dockerfile_installs_cpu_torch_then_the_project_as_non_root() -> None:
    instructions = dockerfile_instructions()
    runs = [rest for keyword, rest in instructions if keyword == "RUN"]
    torch_at = next(i for i, run in enumerate(runs) if "torch==" in run)
    project_at = next(i for i, run in enumerate(runs) if re.search(r"pip install \"?\.", run))
    assert torch_at < project_at
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    assert args["TORCH_VERSION"] == "2.13.0" and args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert args["HOTLORA_EXTRAS"] == '""', "the default (CPU) image carries no vLLM"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}


def test_dockerfile_copies_every_package_and_dockerignore_keeps_them() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = set(project["tool"]["setuptools"]["package-dir"].values())
    copied = {rest.split()[0] for keyword, rest in dockerfile_instructions() if keyword == "COPY"}
    assert folders <= copied, f"Dockerfile does not copy {sorted(folders - copied)}"
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not (folders | {"pyproject.toml", "README.md"}) & ignored
