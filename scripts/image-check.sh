#!/usr/bin/env bash
# Checks the image `scripts/image.sh` built, inside it (buildah run, as its non-root user):
# `kasmina --version`; `kasmina serve` of a built artifact answering its health check and one
# OIP v2 infer request; and a build into a `file://` store folder that root owns (as the
# kubelet makes a hostPath folder), refused until the build Job's init container
# (`kasmina own-store`, as root) has given the folder to the image's user.
#
#   scripts/image-check.sh ARTIFACT_DIR MODEL_DIR [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
artifact=$(realpath "$1")
model=$(realpath "$2")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${3:-kasmina:$version}
port=${KASMINA_IMAGE_CHECK_PORT:-18097}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
digest="sha256:$(sha256sum "$artifact/manifest.json" | cut -d' ' -f1)"

ctr=$(buildah from --pull-never "$tag")
server=""
store=$(mktemp -d)
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null || true; buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$store"; }
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
kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true
server=""

echo "== a build into a root-owned file:// store (as the kubelet makes a hostPath folder)"
chown 0:0 "$store"
chmod 0755 "$store"
out=file:///store/ml/minilm/0123456789abcdef/
build() {
  buildah run -v "$store:/store" -v "$model:/model:ro" "$ctr" -- /usr/local/bin/kasmina build \
    --source file:///model --architecture bert --profile memoryMiB=256,cpuCores=2 \
    --name minilm --version 2.1.0 --out "$out" --replace
}
if refused=$(build 2>&1); then
  echo "the image's user wrote into a root-owned store: the check proves nothing" >&2; exit 1
fi
grep -qi "permission denied" <<<"$refused" || { echo "refused, but not for the folder's owner: $refused" >&2; exit 1; }
echo "refused as $user, as on a real node: $(grep -i -m1 "permission denied" <<<"$refused")"
# Root with CHOWN alone, as the init container: buildah's default capabilities but that one
# dropped (its `--cap-drop ALL --cap-add` drops the added one too).
drops=()
for c in DAC_OVERRIDE FOWNER FSETID KILL NET_BIND_SERVICE SETFCAP SETGID SETPCAP SETUID SYS_CHROOT AUDIT_WRITE MKNOD NET_RAW; do
  drops+=(--cap-drop "CAP_$c")
done
buildah run --user 0:0 "${drops[@]}" -v "$store:/store" "$ctr" -- \
  /usr/local/bin/kasmina own-store --owner 65532:65532 /store /store/ml /store/ml/minilm
build | tail -1
[ -f "$store/ml/minilm/0123456789abcdef/manifest.json" ] || { echo "no manifest in the store" >&2; exit 1; }
[ "$(stat -c %u "$store/ml/minilm/0123456789abcdef/manifest.json")" = 65532 ] || { echo "the artifact is not the image user's" >&2; exit 1; }
echo "built into the store as $user after own-store"
echo "image check passed: $tag"
