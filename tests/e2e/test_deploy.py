"""deploy/: what can be proven without a cluster or a Docker engine.

Kustomize renders every overlay and the core objects validate against the Kubernetes schemas;
custom resources (KEDA, Prometheus Operator) are checked against what they point at; the alerting
rules pass promtool; the Dockerfiles pass hadolint and install the way the README says; every
metric the Grafana dashboard queries is exported by a live gateway and worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import tomllib
import yaml

from worker.config import Config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "k8s" / "overlays").iterdir() if p.is_dir())
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} not found (make test installs it)"
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs])
    return found[0]


def test_overlays_exist():
    assert {"cpu", "gpu", "gpu-tp2", "gpu-ray-pp"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, tmp_path):
    docs = render(overlay)
    core = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    r = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pod_fits_its_config(overlay, monkeypatch):
    docs = render(overlay)
    worker = _one(docs, "Deployment", "inference-worker")
    cm = _one(docs, "ConfigMap", "inference-worker-config")
    raw = tomllib.loads(cm["data"]["config.toml"])
    monkeypatch.setenv("INFERENCE_WORKER_QUEUE_TOKEN", "t")
    cfg = Config.model_validate(raw)  # the shipped config is valid edition 1
    pod = worker["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]
    assert port == cfg.monitoring.metrics_port
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + cfg.drain_timeout_seconds + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in c["env"]}
    token_file = env["INFERENCE_WORKER_QUEUE_TOKEN_FILE"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[os.path.dirname(token_file)] == "tokens"
    assert mounts["/etc/inference-worker"] == "config"
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if overlay.startswith("gpu") and overlay != "gpu-ray-pp":
        assert (
            int(gpus) == cfg.generator.tensor_parallel_size * cfg.generator.pipeline_parallel_size
        )
    if overlay == "gpu-ray-pp":
        assert cfg.generator.engine_args["distributed_executor_backend"] == "ray"
        assert cfg.generator.pipeline_parallel_size > 1 and "RAY_ADDRESS" in env
    pdb = _one(docs, "PodDisruptionBudget", "inference-worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_point_at_real_objects(overlay):
    docs = render(overlay)
    worker = _one(docs, "Deployment", "inference-worker")
    cm = _one(docs, "ConfigMap", "inference-worker-config")
    models = tomllib.loads(cm["data"]["config.toml"])["queue"]["models"]
    so = _one(docs, "ScaledObject", "inference-worker")
    assert so["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    trig = so["spec"]["triggers"][0]
    assert trig["type"] == "prometheus"
    named = set(re.findall(r'model="([^"]+)"', trig["metadata"]["query"]))
    assert named and named <= set(models), (named, set(models))
    gateway = _one(docs, "Deployment", "inference-gateway")
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {f"--model={m}" for m in models} <= set(args)  # scale from zero: requests can queue
    pm = _one(docs, "PodMonitor", "inference-worker")
    assert (
        pm["spec"]["selector"]["matchLabels"].items()
        <= worker["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    sm = _one(docs, "ServiceMonitor", "inference-gateway")
    svc = _one(docs, "Service", "inference-gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_replicas_share_a_persistent_redis(overlay):
    """components/redis: 2+ gateway replicas rolled one by one, a PDB, readiness on the store,
    the queue URL and password file pointing at the Redis StatefulSet (AOF on), whose Service
    selects it; batch files on one ReadWriteMany volume; the KEDA query takes ``max`` over
    replicas (store-wide gauges)."""
    docs = render(overlay)
    gw = _one(docs, "Deployment", "inference-gateway")
    spec = gw["spec"]
    assert spec["replicas"] >= 2 and spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    redis = _one(docs, "StatefulSet", "inference-redis")
    rsvc = _one(docs, "Service", "inference-redis")
    assert env["GATEWAY_QUEUE_URL"] == f"redis://{rsvc['metadata']['name']}:6379/0"
    assert (
        rsvc["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    secret_vol = mounts[str(Path(env["GATEWAY_QUEUE_PASSWORD_FILE"]).parent)]
    vols = {v["name"]: v for v in pod["volumes"]}
    secret = _one(docs, "Secret", "inference-redis")
    assert vols[secret_vol]["secret"]["secretName"] == secret["metadata"]["name"]
    assert "password" in secret["stringData"]
    args = " ".join(redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "requirepass" in args
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    # batch jobs' files: one ReadWriteMany volume for every replica, at GATEWAY_FILES_DIR
    files = vols[mounts[env["GATEWAY_FILES_DIR"]]]
    assert set(files) == {"name", "persistentVolumeClaim"}  # the base's emptyDir replaced
    pvc = _one(docs, "PersistentVolumeClaim", files["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pdb = _one(docs, "PodDisruptionBudget", "inference-gateway")
    assert pdb["spec"]["minAvailable"] >= 1
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= spec["template"]["metadata"]["labels"].items()
    )
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > 30  # the gateway's default --drain-timeout
    query = _one(docs, "ScaledObject", "inference-worker")["spec"]["triggers"][0]["metadata"]
    assert "sum(inference_gateway" not in query["query"] and "max(" in query["query"]


def test_alerting_rules_pass_promtool():
    r = subprocess.run(
        [_tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint_and_install_as_the_readme_says(dockerfile):
    path = DEPLOY / "docker" / dockerfile
    r = subprocess.run([_tool("hadolint"), str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = path.read_text()
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    # the runtime user cannot change the code: root's, not writable by others, never chowned
    assert "chown" not in text and text.count("chmod -R go-w /app") == text.count("USER 10001")
    if dockerfile == "Dockerfile":
        assert (
            "scripts/setup.sh cpu,model" in text
            and "scripts/setup.sh" in (REPO / "Makefile").read_text()
        )
        assert "AS gateway" in text and "AS worker-cpu" in text
    else:
        assert 'pip install -e ".[gpu]"' in readme and '-e ".[gpu]"' in text
    assert 'ENTRYPOINT ["inference-worker"]' in text or "inference-gateway" in text


def _families(text: str) -> set[str]:
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            out.add(line.split()[2])
    return out


def _base(name: str) -> str:
    return re.sub(r"_(bucket|sum|count|total|created|info)$", "", name)


def test_dashboard_queries_only_exported_metrics(gateway, embed_worker, client):
    client.embeddings.create(model="all-minilm-l6-v2", input=["warm the metrics up"])
    exported = {
        _base(n)
        for url in (gateway.url, embed_worker.url)
        for n in _families(httpx.get(url + "/metrics").text)
    }
    dash = json.loads((DEPLOY / "grafana" / "inference-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    used = {m for e in exprs for m in re.findall(r"\b(?:inference_[a-z_]+|vllm_[a-z_]+)", e)}
    missing = sorted(m for m in used if _base(m) not in exported)
    assert not missing, missing
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    rule_metrics = {
        m
        for g in rules["groups"]
        for r in g["rules"]
        for m in re.findall(r"\binference_[a-z_]+", r["expr"])
    }
    assert not sorted(m for m in rule_metrics if _base(m) not in exported)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateways_internal_listener_serves_workers_probes_and_prometheus(overlay):
    """docs/security.md: the gateway's workers, probes and Prometheus use its internal
    listener (``--internal-port``), which a NetworkPolicy opens only to the workers (and a
    monitoring namespace); the client port stays the Service's ``http``."""
    docs = render(overlay)
    gw = _one(docs, "Deployment", "inference-gateway")
    c = gw["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert f"--internal-port={ports['internal']}" in c["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "internal"
    svc = _one(docs, "Service", "inference-gateway")
    by_name = {p["name"]: p for p in svc["spec"]["ports"]}
    assert by_name["internal"]["targetPort"] == "internal" and by_name["http"]["port"] == 8000
    cm = _one(docs, "ConfigMap", "inference-worker-config")
    url = tomllib.loads(cm["data"]["config.toml"])["queue"]["url"]
    assert url == f"http://{svc['metadata']['name']}:{by_name['internal']['port']}"
    annotations = gw["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["internal"])
    policy = _one(docs, "NetworkPolicy", "inference-gateway")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        gw["spec"]["template"]["metadata"]["labels"].items()
    )
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    assert rules[8000] is None  # clients: open
    worker = _one(docs, "Deployment", "inference-worker")
    sources = [
        s["podSelector"]["matchLabels"] for s in rules[ports["internal"]] if "podSelector" in s
    ]
    assert any(
        m.items() <= worker["spec"]["template"]["metadata"]["labels"].items() for m in sources
    )
    sm = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert all(e["port"] == "internal" for m in sm for e in m["spec"]["endpoints"])
