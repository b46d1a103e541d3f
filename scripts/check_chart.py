"""Checks the Helm chart offline, with Helm's own library (helm-python-sdk, Helm 4) and
kubernetes-validate: lints it strictly, renders it for the default values and for
helm/sdlm/ci/*.yaml, validates every object against Kubernetes 1.30's schemas (strict: no unknown
fields), and asserts what the chart promises: workers request a GPU in the GPU values, every
probe of an sdlm service is gRPC health, network policies fence the components, no container
lacks resource requests, and every metric the alerts, the dashboard and KEDA use is one the
services export. Run by scripts/check-helm.sh; exits non-zero with a list of failures.
"""

import json
import pathlib
import re
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "sdlm"
KUBE = "1.30.0"
# Kinds whose schemas are not Kubernetes' own (KEDA, Prometheus Operator): checked by hand below.
CUSTOM = {"ScaledObject", "ServiceMonitor"}

failures = []


def check(ok, what):
    if not ok:
        failures.append(what)
    return ok


def render(values_file):
    values = helm.values_from_yaml(values_file.read_text()) if values_file else None
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name="sdlm", namespace="sdlm", is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = path
                objects.append(doc)
    return objects


def find(objects, kind, name):
    return next((o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name), None)


def containers(obj):
    spec = obj["spec"]["template"]["spec"]
    return spec.get("containers", []) + spec.get("initContainers", [])


def exported_metrics():
    source = (ROOT / "services/runtime/src/metrics.rs").read_text()
    block = source[source.index("METRIC_NAMES") : source.index("];")]
    return set(re.findall(r'"(sdlm_[a-z_]+)"', block))


def used_metrics(text):
    names = set(re.findall(r"\bsdlm_[a-z_]+", text))
    # Histogram series are name_bucket/_sum/_count.
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def check_values_set(label, objects, gpu, keda, policies, service_monitor):
    for o in objects:
        template = o.pop("_template")
        where = f"{label}: {o['kind']} {o['metadata']['name']} ({template})"
        if o["kind"] in CUSTOM:
            check("spec" in o and o["metadata"].get("labels"), f"{where}: no spec or labels")
            continue
        try:
            kubernetes_validate.validate(o, KUBE, strict=True)
        except kubernetes_validate.ValidationError as e:
            check(False, f"{where}: invalid for Kubernetes {KUBE}: {e.message} at {list(e.path)}")
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in containers(o):
                req = c.get("resources", {}).get("requests", {})
                check("cpu" in req and "memory" in req, f"{where}: container {c['name']} lacks cpu/memory requests")
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    worker = find(objects, "StatefulSet", "sdlm-worker")
    if check(worker is not None, f"{label}: no worker StatefulSet"):
        res = worker["spec"]["template"]["spec"]["containers"][0]["resources"]
        has_gpu = "nvidia.com/gpu" in res.get("requests", {}) and "nvidia.com/gpu" in res.get("limits", {})
        check(has_gpu == gpu, f"{label}: worker GPU request is {has_gpu}, expected {gpu}")
        if gpu:
            spec = worker["spec"]["template"]["spec"]
            check(spec.get("tolerations") and spec.get("nodeSelector"), f"{label}: GPU workers without tolerations/nodeSelector")
            check("cuda" in spec["containers"][0]["image"], f"{label}: GPU workers not on the CUDA image")
        device = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0].get("env", [])}.get("SDLM_DEVICE")
        check(device == ("cuda" if gpu else "cpu"), f"{label}: worker SDLM_DEVICE is {device!r}, expected {'cuda' if gpu else 'cpu'}")
    for kind, name in [("Deployment", "sdlm-gateway"), ("Deployment", "sdlm-scheduler"), ("StatefulSet", "sdlm-worker")]:
        obj = find(objects, kind, name)
        if not check(obj is not None, f"{label}: no {kind} {name}"):
            continue
        c = obj["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check("grpc" in c.get(probe, {}), f"{label}: {name} {probe} is not gRPC health")
        if name == "sdlm-gateway":
            ready = c.get("readinessProbe", {}).get("grpc", {}).get("service")
            check(ready == "sdlm.v1.Generation", f"{label}: gateway readiness does not wait for a scheduler leader")
    for component in ("gateway", "scheduler", "worker"):
        check(("PodDisruptionBudget", f"sdlm-{component}") in names, f"{label}: no PDB for {component}")
    etcd = find(objects, "StatefulSet", "sdlm-etcd")
    if check(etcd is not None, f"{label}: no bundled etcd"):
        args = " ".join(etcd["spec"]["template"]["spec"]["containers"][0]["args"])
        members = re.search(r"--initial-cluster=(\S+)", args).group(1).split(",")
        check(len(members) == etcd["spec"]["replicas"], f"{label}: etcd initial cluster {members} vs replicas")
    sched = find(objects, "Deployment", "sdlm-scheduler")
    check(sched and sched["spec"]["replicas"] >= (2 if label != "cpu-dev" else 1), f"{label}: scheduler replicas")
    for kind, name in [("Service", "sdlm-scheduler"), ("Service", "sdlm-worker")]:
        svc = find(objects, kind, name)
        check(svc and svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{label}: {name} is exposed outside the cluster")
    netpols = {o["metadata"]["name"]: o for o in objects if o["kind"] == "NetworkPolicy"}
    if policies:
        for n in ("sdlm-default-deny", "sdlm-gateway", "sdlm-scheduler", "sdlm-worker", "sdlm-etcd"):
            check(n in netpols, f"{label}: no NetworkPolicy {n}")
        if "sdlm-worker" in netpols:
            grpc = [r for r in netpols["sdlm-worker"]["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
            sources = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in grpc for f in r.get("from", [])]
            check(sources == ["scheduler"], f"{label}: workers' gRPC is open to {sources or 'everyone'}")
        if "sdlm-scheduler" in netpols:
            grpc = [r for r in netpols["sdlm-scheduler"]["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"])]
            sources = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for r in grpc for f in r.get("from", [])]
            check(sources == ["gateway"], f"{label}: the scheduler's gRPC is open to {sources or 'everyone'}")
    else:
        check(not netpols, f"{label}: network policies rendered although disabled")
    scaled = find(objects, "ScaledObject", "sdlm-worker")
    check((scaled is not None) == keda, f"{label}: KEDA ScaledObject present is {scaled is not None}, expected {keda}")
    if scaled:
        check(scaled["spec"]["scaleTargetRef"]["kind"] == "StatefulSet", f"{label}: KEDA does not scale the workers")
        check(worker is not None and "replicas" not in worker["spec"], f"{label}: worker replicas fixed while KEDA scales them")
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        check("sdlm_queue_depth" in query, f"{label}: KEDA query does not use the queue depth")
    check((find(objects, "ServiceMonitor", "sdlm") is not None) == service_monitor, f"{label}: ServiceMonitor")
    return [o for o in objects if o["kind"] == "ScaledObject"]


def main():
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{KUBE}")
    for m in report.get("messages", []):
        check(m["severity"] < 2, f"lint: {m['path']}: {m['error']}")
    for e in report.get("errors", []):
        check(False, f"lint: {e}")
    sets = [
        ("default", None, dict(gpu=False, keda=False, policies=True, service_monitor=False)),
        ("cpu-dev", CHART / "ci/cpu-dev-values.yaml", dict(gpu=False, keda=False, policies=False, service_monitor=False)),
        ("gpu-prod", CHART / "ci/gpu-prod-values.yaml", dict(gpu=True, keda=True, policies=True, service_monitor=True)),
    ]
    counts = {}
    keda_queries = ""
    for label, values, expect in sets:
        objects = render(values)
        counts[label] = len(objects)
        for s in check_values_set(label, objects, **expect):
            keda_queries += s["spec"]["triggers"][0]["metadata"]["query"]
    # API keys from the chart's own Secret, mounted by the gateway.
    chart = helm.Chart.load(str(CHART))
    out = chart.render({"apiKeys": {"enabled": True, "keys": ["k" * 32]}}, name="sdlm", namespace="sdlm")
    objs = [d for t in out.values() for d in yaml.safe_load_all(t) if d]
    secret = find(objs, "Secret", "sdlm-api-keys")
    gateway = find(objs, "Deployment", "sdlm-gateway")
    check(secret is not None and "k" * 32 in secret["stringData"]["api-keys"], "api keys: no Secret with the key")
    env = {e["name"]: e.get("value") for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    check(env.get("SDLM_API_KEYS") == "/etc/sdlm/api-keys/api-keys", "api keys: the gateway is not given the file")
    # A CPU worker's matmul precision reaches it and a GPU worker's dtype reaches that one; each
    # gets only its own (the CPU refuses a narrow dtype, and the precision is a CPU setting).
    for gpu, want, want_dtype in [(False, "bf16", None), (True, None, "bf16")]:
        values = {"worker": {"matmulPrecision": "bf16", "gpu": {"enabled": gpu, "dtype": "bf16"}}}
        out = chart.render(values, name="sdlm", namespace="sdlm")
        objs = [d for t in out.values() for d in yaml.safe_load_all(t) if d]
        worker = find(objs, "StatefulSet", "sdlm-worker")
        env = {e["name"]: e.get("value") for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
        check(env.get("SDLM_MATMUL_PRECISION") == want, f"matmul precision (gpu {gpu}): {env.get('SDLM_MATMUL_PRECISION')}")
        check(env.get("SDLM_DTYPE") == want_dtype, f"dtype (gpu {gpu}): {env.get('SDLM_DTYPE')}")
    try:
        chart.render({"worker": {"gpu": {"enabled": True, "dtype": "fp8"}}}, name="sdlm", namespace="sdlm")
        check(False, "schema: worker.gpu.dtype fp8 was accepted")
    except helm.HelmError as e:
        check("dtype" in str(e), f"schema: the error does not name the field: {e}")
    try:
        chart.render({"worker": {"matmulPrecision": "fp8"}}, name="sdlm", namespace="sdlm")
        check(False, "schema: worker.matmulPrecision fp8 was accepted")
    except helm.HelmError as e:
        check("matmulPrecision" in str(e), f"schema: the error does not name the field: {e}")
    # Out-of-range values are refused by values.schema.json, naming the field.
    try:
        chart.render({"worker": {"maxBatchTokens": 0}}, name="sdlm", namespace="sdlm")
        check(False, "schema: worker.maxBatchTokens 0 was accepted")
    except helm.HelmError as e:
        check("maxBatchTokens" in str(e), f"schema: the error does not name the field: {e}")
    # Every metric the alerts, the dashboard and KEDA use is exported.
    exported = exported_metrics()
    check(len(exported) >= 13, f"found only {len(exported)} exported metric names")
    alerts = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    dashboard = (ROOT / "deploy/grafana/sdlm-dashboard.json").read_text()
    json.loads(dashboard)
    for source, text in [("alerts", alerts), ("dashboard", dashboard), ("KEDA", keda_queries)]:
        unknown = used_metrics(text) - exported
        check(not unknown, f"{source} uses metrics nobody exports: {sorted(unknown)}")
    rules = yaml.safe_load(alerts)["groups"][0]["rules"]
    check({r["alert"] for r in rules} >= {"SdlmWorkerDown", "SdlmQueueGrowing", "SdlmErrorRate", "SdlmKvCacheNearlyFull"}, "alerts: missing rules")
    print(f"chart: rendered {counts}, validated against Kubernetes {KUBE} (strict); custom kinds checked by hand: {sorted(CUSTOM)}")
    if failures:
        print(f"{len(failures)} failures:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
