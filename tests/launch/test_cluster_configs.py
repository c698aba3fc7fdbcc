"""Static checks of the cluster configs shipped with raydiff: cluster.yaml (Ray cluster
launcher, AWS) and deploy/kuberay/rayjob.yaml (KubeRay RayJob).

Nothing here starts a cluster or talks to AWS/Kubernetes: cluster.yaml goes through
Ray's own schema (the private `fillout_defaults` + `validate_config` that `ray up` uses;
the raw YAML fails without fill-out), the RayJob's runtime_env through Ray's
`RuntimeEnv` validation, and both are checked against pyproject.toml's pins.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import socket
import sys
import typing
from pathlib import Path

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pyproject allows 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "deploy" / "kuberay" / "rayjob.yaml"

# Subcommands the raydiff CLI has (raydiff/launch/cli.py: `raydiff train CONFIG [--set k=v ...]`).
CLI_SUBCOMMANDS = {"train"}


# ----------------------------------------------------------------------------- helpers


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pyproject_deps() -> dict[str, Requirement]:
    reqs = (Requirement(r) for r in _pyproject()["project"]["dependencies"])
    return {r.name.lower(): r for r in reqs}


def _requirements_in(commands: list[str]) -> list[Requirement]:
    """Requirement strings found as shell words in `commands` (e.g. the quoted args of pip install)."""
    found = []
    for cmd in commands:
        for word in shlex.split(cmd, comments=False):
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?\s*(==|>=|<=|~=|<|>|!=|@)", word):
                continue
            try:
                found.append(Requirement(word))
            except InvalidRequirement:
                pass
    return found


def _check_pins_match_pyproject(reqs: list[Requirement], where: str) -> None:
    deps = _pyproject_deps()
    by_name = {r.name.lower(): r for r in reqs}

    ray_pin = deps["ray"]
    ray = by_name.get("ray")
    assert ray is not None, f"{where} does not install ray"
    assert str(ray.specifier) == str(ray_pin.specifier), (
        f"{where} pins {ray}, pyproject.toml pins {ray_pin}"
    )
    assert set(ray.extras) >= set(ray_pin.extras), (
        f"{where} installs ray extras {sorted(ray.extras)}, pyproject.toml needs {sorted(ray_pin.extras)}"
    )

    # Every other exact pin of a raydiff dependency must be allowed by pyproject.toml.
    for name, req in by_name.items():
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if name in deps and exact:
            assert deps[name].specifier.contains(exact[0], prereleases=True), (
                f"{where} pins {req}, outside pyproject.toml's {deps[name]}"
            )
    assert "raydiff" in by_name, f"{where} does not install raydiff (needed for the `raydiff` console script)"


def _valid_auth_modes() -> set[str]:
    # Ray 2.60: RAY_AUTH_MODE is read by the C++ config; the values are the
    # ray._raylet.AuthenticationMode members, spelled in lower case
    # (ray/_private/authentication/authentication_utils.py:get_authentication_mode_name).
    from ray._private.authentication.authentication_utils import get_authentication_mode_name
    from ray._raylet import AuthenticationMode

    names = {
        get_authentication_mode_name(getattr(AuthenticationMode, m))
        for m in dir(AuthenticationMode)
        if m.isupper()
    }
    assert names >= {"disabled", "token"}, names
    return names


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if the code under test tries to reach AWS (or anything else)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------ (a) cluster.yaml


@pytest.fixture(scope="module")
def cluster_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _validate_cluster(raw: dict) -> dict:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cfg = fillout_defaults(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_passes_ray_schema_offline(cluster_raw, no_network):
    cfg = _validate_cluster(cluster_raw)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["cluster_name"] == "raydiff"


def test_cluster_yaml_survives_ray_up_preparation_offline(cluster_raw, no_network):
    # prepare_config is what `ray up` runs before it touches the cloud (defaults,
    # setup-command merging, docker checks, per-type min/max workers).
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cluster_raw))
    validate_config(cfg)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["max_workers"] == 0


@pytest.mark.parametrize(
    "mutation",
    ["worker_max_worker_typo", "top_level_max_worker_typo", "unknown_head_type", "negative_resource"],
)
def test_cluster_yaml_validation_can_fail(cluster_raw, mutation, no_network):
    """A broken copy must be rejected, so the schema test above is not vacuous."""
    bad = copy.deepcopy(cluster_raw)
    head_type = bad["head_node_type"]
    worker_type = next(t for t in bad["available_node_types"] if t != head_type)
    if mutation == "worker_max_worker_typo":
        node = bad["available_node_types"][worker_type]
        node["max_worker"] = node.pop("max_workers")
    elif mutation == "top_level_max_worker_typo":
        bad["max_worker"] = bad.pop("max_workers")
    elif mutation == "unknown_head_type":
        bad["head_node_type"] = "no_such_node_type"
    elif mutation == "negative_resource":
        bad["available_node_types"][worker_type]["resources"]["GPU"] = -1

    import jsonschema

    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _validate_cluster(bad)


def test_cluster_head_takes_no_training_work(cluster_raw):
    head = cluster_raw["available_node_types"][cluster_raw["head_node_type"]]
    resources = head["resources"]
    assert resources.get("CPU") == 0, "the head must advertise CPU: 0 so no training worker lands there"
    assert resources.get("GPU", 0) == 0
    for cmd in cluster_raw["head_start_ray_commands"]:
        m = re.search(r"--num-cpus[= ](\S+)", cmd)
        if m:
            assert float(m.group(1)) == 0, cmd


def test_cluster_has_gpu_worker_type(cluster_raw):
    head_type = cluster_raw["head_node_type"]
    gpu_types = {
        name: t
        for name, t in cluster_raw["available_node_types"].items()
        if name != head_type and t.get("resources", {}).get("GPU", 0) > 0
    }
    assert gpu_types, "no worker node type offers GPUs"
    for name, t in gpu_types.items():
        assert t.get("min_workers", 0) == 0, f"{name}: GPU nodes should scale from zero"
        assert 1 <= t["max_workers"] <= cluster_raw["max_workers"], name
        # rank 0 uploads checkpoints from a GPU node: it needs its own S3 credentials
        assert "IamInstanceProfile" in t["node_config"], f"{name}: no instance profile for S3 checkpoints"


def test_cluster_node_types_set_an_ami(cluster_raw):
    # Without ImageId, Ray 2.60 falls back to an Ubuntu 18.04 DLAMI too old for torch 2.13.
    for name, t in cluster_raw["available_node_types"].items():
        ami = str(t["node_config"].get("ImageId", "")).lower()
        assert ami not in ("", "latest_dlami"), f"{name}: set node_config.ImageId"


def test_cluster_setup_commands_pin_pyproject_stack(cluster_raw):
    commands = [
        *cluster_raw.get("setup_commands", []),
        *cluster_raw.get("head_setup_commands", []),
        *cluster_raw.get("worker_setup_commands", []),
    ]
    _check_pins_match_pyproject(_requirements_in(commands), "cluster.yaml setup_commands")


def test_cluster_auth_mode_is_the_same_everywhere(cluster_raw):
    valid = _valid_auth_modes()
    modes: dict[str, str] = {}
    for section in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster_raw[section] if "ray start" in c]
        assert starts, f"{section} never runs `ray start`"
        for cmd in starts:
            m = re.search(r"RAY_AUTH_MODE=(\w+)", cmd)
            assert m, f"{section}: `ray start` without an explicit RAY_AUTH_MODE: {cmd!r}"
            modes[f"{section}: {cmd}"] = m.group(1)
    # Interactive shells on the nodes (ray exec / ray attach) should agree too.
    for cmd in cluster_raw.get("setup_commands", []):
        for m in re.finditer(r"RAY_AUTH_MODE=(\w+)", cmd):
            modes[f"setup_commands: {cmd}"] = m.group(1)

    assert set(modes.values()) <= valid, modes
    assert len(set(modes.values())) == 1, f"RAY_AUTH_MODE differs between places: {modes}"

    if next(iter(modes.values())) == "token":
        # Every node needs the same token: Ray looks in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
        # then ~/.ray/auth_token; this config ships the latter via file_mounts.
        mounts = cluster_raw.get("file_mounts") or {}
        token_paths = {"~/.ray/auth_token"}
        for section in ("head_start_ray_commands", "worker_start_ray_commands"):
            for cmd in cluster_raw[section]:
                token_paths |= set(re.findall(r"RAY_AUTH_TOKEN_PATH=(\S+?);?(?:\s|$)", cmd))
        assert token_paths & set(mounts), (
            "token mode needs the token on every node: mount ~/.ray/auth_token "
            "(or the RAY_AUTH_TOKEN_PATH file) in file_mounts"
        )


# ------------------------------------------------------------- (b) KubeRay RayJob


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_YAML.read_text())


def _entrypoint(rayjob) -> list[str]:
    return shlex.split(rayjob["spec"]["entrypoint"])


def _entrypoint_config_and_overrides(rayjob) -> tuple[str, list[str]]:
    words = _entrypoint(rayjob)[2:]
    overrides, positional = [], []
    it = iter(words)
    for w in it:
        if w == "--set":
            overrides.append(next(it))
        elif w.startswith("--set="):
            overrides.append(w.split("=", 1)[1])
        elif not w.startswith("-"):
            positional.append(w)
    assert len(positional) == 1, f"expected one config path in the entrypoint, got {positional}"
    return positional[0], overrides


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get(k, {}).get("nvidia.com/gpu", 0)) for k in ("requests", "limits"))


def test_rayjob_kind_and_lifecycle(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


def test_rayjob_entrypoint_is_a_raydiff_console_script(rayjob):
    words = _entrypoint(rayjob)
    scripts = _pyproject()["project"]["scripts"]
    assert words[0] in scripts, f"{words[0]!r} is not a [project.scripts] entry ({sorted(scripts)})"
    assert words[1] in CLI_SUBCOMMANDS, f"unknown raydiff subcommand {words[1]!r}"


@pytest.mark.skipif(
    importlib.util.find_spec("raydiff.launch.cli") is None, reason="raydiff.launch.cli not written yet"
)
def test_rayjob_entrypoint_subcommand_exists_in_cli(rayjob, monkeypatch, capsys):
    words = _entrypoint(rayjob)
    module, _, func = _pyproject()["project"]["scripts"][words[0]].partition(":")
    main = getattr(__import__(module, fromlist=[func]), func)
    # Console scripts call main() with no arguments; it reads sys.argv.
    monkeypatch.setattr(sys, "argv", [words[0], words[1], "--help"])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), f"`{words[0]} {words[1]} --help` exited with {e.code}"
    assert "--set" in capsys.readouterr().out


def test_rayjob_entrypoint_config_exists(rayjob):
    config, _ = _entrypoint_config_and_overrides(rayjob)
    assert (REPO / config).is_file(), f"the RayJob runs {config}, which is not in the repo"


def _section_model(annotation):
    from pydantic import BaseModel

    for a in (annotation, *typing.get_args(annotation)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def test_rayjob_entrypoint_overrides_are_config_keys(rayjob):
    from raydiff.config import RaydiffConfig

    config, overrides = _entrypoint_config_and_overrides(rayjob)
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        assert sep, item
        model = RaydiffConfig
        *parents, leaf = key.split(".")
        for part in parents:
            assert part in model.model_fields, f"--set {key}: no section {part!r}"
            model = _section_model(model.model_fields[part].annotation)
            assert model is not None, f"--set {key}: {part!r} is not a section"
        assert leaf in model.model_fields, f"--set {key}: no key {leaf!r}"
        values[key] = yaml.safe_load(value)

    # Workers on other pods cannot see a path on the head: storage must be shared.
    assert str(values.get("ray.storage_path", "")).startswith("s3://"), values

    gpus_available = sum(
        int(g.get("maxReplicas", g.get("replicas", 1))) * max(_gpus(c) for c in _containers(g))
        for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    if (REPO / config).is_file():
        from raydiff.config import load_config

        cfg = load_config(REPO / config, overrides)
        assert cfg.ray.storage_path.startswith("s3://")
        gpus_needed = cfg.ray.num_workers * cfg.ray.gpus_per_worker if cfg.ray.use_gpu else 0
    else:
        from raydiff.config import RayConfig

        gpus_needed = values.get("ray.num_workers", 0) * RayConfig().gpus_per_worker
    assert gpus_needed <= gpus_available, f"run needs {gpus_needed} GPUs, worker groups offer {gpus_available}"


def test_rayjob_head_has_no_gpus_and_takes_no_work(rayjob):
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    params = head.get("rayStartParams", {})
    assert params.get("num-cpus") == "0", "head rayStartParams needs num-cpus: \"0\" (a string)"
    assert params.get("num-gpus", "0") == "0"
    assert all(_gpus(c) == 0 for c in _containers(head))


def test_rayjob_worker_group_requests_gpus(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(_gpus(c) >= 1 for g in groups for c in _containers(g)), "no worker group requests nvidia.com/gpu"
    for g in groups:
        for c in _containers(g):
            res = c.get("resources", {})
            if _gpus(c):
                # extended resources must have requests == limits
                assert res["limits"]["nvidia.com/gpu"] == res.get("requests", res["limits"])["nvidia.com/gpu"]


def test_rayjob_images_match_ray_pin(rayjob):
    ray_pin = _pyproject_deps()["ray"]
    pinned = next(s.version for s in ray_pin.specifier if s.operator == "==")
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for g in groups:
        for c in _containers(g):
            m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-(cpu|gpu|cu\d+))?", c["image"])
            assert m, f"unexpected image tag {c['image']!r} (Ray's format: VERSION-pyXY-{{cpu|gpu|cuXXX}})"
            assert m.group(1) == pinned, c["image"]


def test_rayjob_runtime_env_is_valid_and_pins_match(rayjob, no_network):
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    env = RuntimeEnv(**raw)  # Ray's own validation of the runtime_env fields
    # Nothing local exists inside the cluster: working_dir must be a remote package.
    assert re.match(r"^(https?|s3|gs)://.+\.zip$", env["working_dir"]), env["working_dir"]
    _check_pins_match_pyproject([Requirement(p) for p in env["pip"]["packages"]], "RayJob runtimeEnv pip")


def test_rayjob_auth_and_credentials(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster.get("authOptions", {}).get("mode") in _valid_auth_modes()
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in _containers(g):
            env = {e["name"]: e for e in c.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert key in env, f"{c['name']}: no {key} (S3 checkpoints need credentials on every pod)"
                assert "value" not in env[key] and "secretKeyRef" in env[key].get("valueFrom", {}), (
                    f"{c['name']}: {key} must come from a Secret, not a literal"
                )
