#!/usr/bin/env bash
# Checks the image `scripts/image.sh` built, inside it (buildah run, as its non-root user):
# `kasmina --version`, then `kasmina serve` of a built artifact answering its health check
# and one OIP v2 infer request.
#
#   scripts/image-check.sh ARTIFACT_DIR [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
artifact=$(realpath "$1")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${2:-kasmina:$version}
port=${KASMINA_IMAGE_CHECK_PORT:-18097}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"

ctr=$(buildah from --pull-never "$tag")
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; buildah rm "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT

user=$(buildah inspect --format '{{.OCIv1.Config.User}}' "$ctr")
[ "$user" = "65532:65532" ] || { echo "the image runs as '$user', not the non-root 65532" >&2; exit 1; }
echo "== kasmina --version (in the image, as $user)"
buildah run "$ctr" -- /usr/local/bin/kasmina --version
echo "== kasmina serve (in the image) health and infer"
buildah run --network host -v "$artifact:/artifact:ro" "$ctr" -- \
  /usr/local/bin/kasmina serve --artifact /artifact --expect-digest "$digest" \
  --host 127.0.0.1 --port "$port" &
server=$!
for _ in $(seq 200); do
  curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "kasmina serve exited in the image" >&2; exit 1; }
  sleep 0.1
done
curl -sf "http://127.0.0.1:$port/v2/health/ready" >/dev/null
echo "ready"
curl -sf "http://127.0.0.1:$port/v2/models/minilm/infer" -H 'Content-Type: application/json' \
  -d '{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","data":["inside the image"]}]}' |
  python3 -c 'import json,sys; o=json.load(sys.stdin)["outputs"][0]; print("infer:", o["name"], o["shape"])'
echo "image check passed: $tag"
