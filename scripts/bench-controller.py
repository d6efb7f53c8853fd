#!/usr/bin/env python3
"""The operator at scale on a real control plane (`just bench-controller`, as root).

Starts ../shared/k8s (Kubernetes 1.19) with one cordoned node, so every build Job's pod stays
Pending and nothing but the control plane and the operator does work; runs the release binary's
controller on this host against it; creates BENCH_EDS (1,000) EdgeDeployments at once from
BENCH_CLIENTS parallel `kubectl create`s; and prints

- the time from the last create until every EdgeDeployment has a status,
- the operator's CPU seconds for the burst and the steady window, and its peak RSS,
- its API requests by verb and resource over a BENCH_WINDOW_SECONDS (300) steady window after
  the burst, as the API server counts them (`apiserver_request_total`), minus a window of the
  same length with the operator stopped (the control plane's own requests),
- the SIGTERM → exit time at the end of the steady window.

Figures are this machine's, of this run: docs/benchmarks.md says how to read them.
"""

import collections
import json
import os
import re
import urllib.request
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.environ.get("KASMINA_K8S", os.path.join(ROOT, "..", "shared", "k8s"))
STATE = os.environ.get("KASMINA_K8S_DIR", "/tmp/kasmina-k8s")
BIN = os.path.join(ROOT, "target", "release", "kasmina")
N = int(os.environ.get("BENCH_EDS", "1000"))
WINDOW = int(os.environ.get("BENCH_WINDOW_SECONDS", "300"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "8"))
NS = "bench"
STATUS_DEADLINE = int(os.environ.get("BENCH_STATUS_DEADLINE", "600"))
READS = ("GET", "LIST", "WATCH")
WRITES = ("POST", "PUT", "PATCH", "DELETE", "CREATE", "UPDATE", "APPLY", "DELETECOLLECTION")


def sh(*args, check=True, stdin=None):
    out = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if check and out.returncode != 0:
        sys.exit(f"{' '.join(args)}: {out.stdout}{out.stderr}")
    return out.stdout


def kubectl(*args, **kw):
    return sh("kubectl", *args, **kw)


def request_counts():
    """apiserver_request_total summed by (verb, resource[/subresource])."""
    counts = collections.Counter()
    line_re = re.compile(r"^apiserver_request_total\{(.*)\} ([0-9.e+]+)$")
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        m = line_re.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        counts[(labels.get("verb", ""), resource)] += float(m.group(2))
    return counts


def proc_cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def manifest(i):
    return {
        "apiVersion": "kasmina.dev/v1alpha1",
        "kind": "EdgeDeployment",
        "metadata": {"name": f"model-{i:04d}", "namespace": NS},
        "spec": {
            "model": {
                "name": "minilm",
                "version": "1.0.0",
                "source": {"uri": "s3://models/minilm/"},
                "architecture": "bert",
            },
            "optimization": {"profile": {"memoryMiB": 256}, "quantization": "q8_0"},
            "replicas": 1,
        },
    }


def with_status():
    out = kubectl("get", "edgedeployments", "-n", NS, "-o",
                  "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}")
    return sum(1 for line in out.splitlines() if line.strip())


def start_cluster():
    sh(os.path.join(K8S, "down.sh"), check=False)
    sh(os.path.join(K8S, "down.sh"), "--purge", check=False)
    sh(os.path.join(K8S, "up.sh"), "--kasmina", BIN, "--node", "bench-1:region=eu-west-1:memory=4Gi:cpu=2")
    os.environ["KUBECONFIG"] = os.path.join(STATE, "kubeconfig")
    crds = sorted(os.path.join(ROOT, "crds", f) for f in os.listdir(os.path.join(ROOT, "crds")))
    sh(os.path.join(K8S, "install-crds.sh"), *crds)
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    # Builds stay Pending: the operator's work is all there is to measure.
    kubectl("cordon", "bench-1")
    kubectl("create", "namespace", NS)


def start_operator(log):
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn"))
    return subprocess.Popen(
        [BIN, "controller", "--leader-elect=false", "--metrics-addr", "127.0.0.1:18080",
         "--image", "kasmina:bench", "--artifact-store", "file:///var/lib/kasmina/bench-artifacts"],
        env=env, stdout=log, stderr=subprocess.STDOUT)


def create_all(tmp):
    files = []
    for c in range(CLIENTS):
        items = [manifest(i) for i in range(c, N, CLIENTS)]
        path = os.path.join(tmp, f"eds-{c}.json")
        with open(path, "w") as f:
            json.dump({"apiVersion": "v1", "kind": "List", "items": items}, f)
        files.append(path)
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(lambda p: kubectl("create", "-f", p), files))
    return started, time.monotonic()


def window_counts(seconds):
    before = request_counts()
    time.sleep(seconds)
    after = request_counts()
    return collections.Counter({k: after[k] - before.get(k, 0) for k in after})


def operator_counts():
    """The operator's own requests so far, by (verb, resource): kasmina_kube_api_requests."""
    counts = collections.Counter()
    with urllib.request.urlopen("http://127.0.0.1:18080/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        m = re.match(r'^kasmina_kube_api_requests_total\{(.*)\} ([0-9.e+]+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            counts[(labels.get("verb"), labels.get("resource"))] += float(m.group(2))
    return counts


def main():
    if os.geteuid() != 0:
        sys.exit("bench-controller starts a control plane: run it as root")
    start_cluster()
    tmp = tempfile.mkdtemp(prefix="kasmina-bench-")
    log_path = os.path.join(tmp, "operator.log")
    log = open(log_path, "w")
    op = start_operator(log)
    time.sleep(3)  # the operator's watches start before the burst
    first, last = create_all(tmp)
    print(f"created {N} EdgeDeployments with {CLIENTS} clients in {last - first:.1f} s")
    while True:
        done = with_status()
        if done >= N or time.monotonic() - last > STATUS_DEADLINE:
            break
        time.sleep(1)
    to_status = time.monotonic() - last
    burst_cpu = proc_cpu_seconds(op.pid)
    if done >= N:
        status_line = f"{to_status:.1f} s"
    else:
        # Measured anyway: the window then shows a burst that has not settled.
        status_line = f"not reached: {done} of {N} after {STATUS_DEADLINE} s"
    print(f"with status: {status_line} (operator CPU so far {burst_cpu:.1f} s)")
    time.sleep(30)  # requeues of the burst settle
    cpu_before = proc_cpu_seconds(op.pid)
    own_before = operator_counts()
    running = window_counts(WINDOW)
    own_after = operator_counts()
    own = {k: own_after[k] - own_before.get(k, 0) for k in own_after}
    window_cpu = proc_cpu_seconds(op.pid) - cpu_before
    peak = proc_peak_rss_mib(op.pid)
    term = time.monotonic()
    op.send_signal(signal.SIGTERM)
    try:
        op.wait(timeout=60)
        exit_s = time.monotonic() - term
    except subprocess.TimeoutExpired:
        op.kill()
        exit_s = float("inf")
    baseline = window_counts(WINDOW)

    minutes = WINDOW / 60
    rows = []
    for key in sorted(set(running) | set(baseline)):
        verb, resource = key
        net = running.get(key, 0) - baseline.get(key, 0)
        if running.get(key, 0) or baseline.get(key, 0):
            rows.append((verb, resource, running.get(key, 0), baseline.get(key, 0), net))
    # The operator's own count decides: the API server's counts also hold what the Job
    # controller and the scheduler still do about the burst's Jobs.
    reads = sum(n for (verb, _), n in own.items() if verb in ("get", "list"))
    watches = sum(n for (verb, _), n in own.items() if verb == "watch")
    writes = sum(n for (verb, _), n in own.items() if verb not in ("get", "list", "watch"))
    print()
    print(f"steady window {WINDOW} s, the operator's own requests (kasmina_kube_api_requests):")
    print(f"{'verb':<8} {'resource':<40} {'requests':>9}")
    for (verb, resource), n in sorted(own.items()):
        if n >= 1:
            print(f"{verb:<8} {resource:<40} {n:>9.0f}")
    print()
    print(f"steady window {WINDOW} s, all clients, operator running vs stopped (apiserver_request_total):")
    print(f"{'verb':<8} {'resource':<40} {'running':>9} {'stopped':>9} {'operator':>9}")
    for verb, resource, r, b, net in rows:
        if abs(net) >= 1:
            print(f"{verb:<8} {resource:<40} {r:>9.0f} {b:>9.0f} {net:>9.0f}")
    print()
    print(f"EdgeDeployments                     {N}")
    print(f"create → all with status            {status_line} (target ≤ 60 s)")
    print(f"operator peak RSS                   {peak:.1f} MiB (target ≤ 64 MiB)")
    print(f"operator CPU, burst / steady window {burst_cpu:.1f} s / {window_cpu:.1f} s")
    print(f"steady writes                       {writes:.0f} (target 0)")
    print(f"steady reads (GET+LIST) per EdgeDeployment per minute  "
          f"{reads / N / minutes:.3f} (target ≤ 0.1)")
    print(f"steady watch (re)starts             {watches:.0f}")
    print(f"SIGTERM → exit                      {exit_s:.1f} s (target ≤ 5 s)")
    failed = collections.Counter()
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        m = re.match(r'^apiserver_request_total\{(.*)\} ([0-9.e+]+)$', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels.get("code", "").startswith(("429", "5")):
                failed[(labels.get("verb"), labels.get("resource"), labels["code"])] += float(m.group(2))
    for (verb, resource, code), n in failed.most_common(5):
        print(f"answered {code} during the run     {verb} {resource}: {n:.0f}")
    print(f"operator log: {log_path}")
    if os.environ.get("BENCH_KEEP") != "1":
        sh(os.path.join(K8S, "down.sh"), check=False)


if __name__ == "__main__":
    main()
