#!/usr/bin/env bash
# Builds the kasmina OCI image without a Docker engine: `buildah from scratch`, the release
# binaries and exactly the shared libraries they link, a non-root user, saved as an OCI archive
# that `kind load image-archive`, `podman load` and `skopeo copy` accept.
#
#   scripts/image.sh [TAG]        (as root; `just image` runs it)
#
# Needs Debian's buildah (apt-get install buildah). Builds in vfs storage with chroot isolation,
# which work without a container runtime or user namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${1:-kasmina:$version}
out=${KASMINA_IMAGE_OUT:-target/image/kasmina-$version.oci.tar}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
command -v buildah >/dev/null || { echo "buildah is missing: apt-get install -y buildah" >&2; exit 1; }
bins=(target/release/kasmina target/release/kubectl-kasmina)
for b in "${bins[@]}"; do
  [ -x "$b" ] || { echo "$b is missing: cargo build --release" >&2; exit 1; }
done

root=$(mktemp -d)
ctr=""
cleanup() { [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1; rm -rf "$root"; }
trap cleanup EXIT

# The root filesystem: binaries, their libraries (and the loader) at the paths they were
# linked against, a passwd entry for the non-root user, a writable /tmp.
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/var/lib/kasmina"
chmod 1777 "$root/tmp"
install -m 0755 "${bins[@]}" "$root/usr/local/bin/"
for lib in $(ldd "${bins[@]}" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nkasmina:x:65532:65532:kasmina:/nonexistent:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nkasmina:x:65532:\n' > "$root/etc/group"
chown 65532:65532 "$root/var/lib/kasmina"

ctr=$(buildah from scratch)
buildah copy "$ctr" "$root" / >/dev/null
buildah config \
  --user 65532:65532 \
  --entrypoint '["/usr/local/bin/kasmina"]' \
  --cmd '--help' \
  --env PATH=/usr/local/bin \
  --port 8080 \
  --label org.opencontainers.image.title=kasmina \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.source=https://github.com/kasmina-dev/kasmina \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
ctr=""
mkdir -p "$(dirname "$out")"
rm -f "$out"
buildah push --quiet "$tag" "oci-archive:$out:$tag"
# containerd (kind load image-archive, ctr import) names an OCI image by the annotation
# io.containerd.image.name and reads org.opencontainers.image.ref.name as the tag only.
python3 - "$out" "$tag" <<'PY'
import io, json, sys, tarfile
path, tag = sys.argv[1], sys.argv[2]
name, _, version = tag.rpartition(":")
full = name if "/" in name else f"docker.io/library/{name}"
with tarfile.open(path) as tar:
    members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
out = []
for member, data in members:
    if member.name.lstrip("./") == "index.json":
        index = json.loads(data)
        for m in index["manifests"]:
            m.setdefault("annotations", {}).update({
                "io.containerd.image.name": f"{full}:{version}",
                "org.opencontainers.image.ref.name": version,
            })
        data = json.dumps(index).encode()
        member.size = len(data)
    out.append((member, data))
with tarfile.open(path, "w") as tar:
    for member, data in out:
        tar.addfile(member, io.BytesIO(data) if data is not None else None)
PY
echo "$tag -> $out ($(du -h "$out" | cut -f1))"
