#!/usr/bin/env bash
# Fetches ComfyUI's official front end for `fluxlora serve`.
#
#   scripts/get-frontend.sh [DIR]
#
# Downloads the pinned PyPI wheel comfyui-frontend-package with pip and unpacks
# its static folder (comfyui_frontend_package/static/) into DIR, leaving out the
# *.js.map source maps (not needed at run time; most of the wheel's size).
# DIR defaults to fluxlora-data/frontend, the front end `fluxlora serve` finds
# without --comfy-frontend when run from the same directory with the default
# data dir. Does nothing when DIR already holds this version (DIR/.version).
# The tree is unpacked beside DIR and renamed into place, so DIR is never left
# half written. Needs python3 with pip, or with venv (Debian: python3-venv),
# and network access to PyPI; PYTHON names another interpreter.
set -euo pipefail

version=1.58.1
package=comfyui-frontend-package
dir=${1:-fluxlora-data/frontend}
dir=${dir%/}
python=${PYTHON:-python3}

if [[ -f "$dir/index.html" && "$(cat "$dir/.version" 2>/dev/null)" == "$version" ]]; then
    echo "$dir already holds $package $version" >&2
    exit 0
fi

parent=$(dirname "$dir")
mkdir -p "$parent"
work=$(mktemp -d "$parent/.frontend.XXXXXX")
trap 'rm -rf "$work"' EXIT

# pip, from the interpreter itself or else from a throwaway venv.
if ! "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m venv "$work/venv"
    python="$work/venv/bin/python"
fi
echo "downloading $package $version" >&2
"$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --dest "$work/wheel" "$package==$version"

"$python" - "$work/wheel" "$work/static" "$version" <<'EOF'
import os
import sys
import zipfile

wheel_dir, out, version = sys.argv[1:]
(wheel,) = [f for f in os.listdir(wheel_dir) if f.endswith(".whl")]
prefix = "comfyui_frontend_package/static/"
count = 0
with zipfile.ZipFile(os.path.join(wheel_dir, wheel)) as archive:
    for info in archive.infolist():
        name = info.filename
        if not name.startswith(prefix) or info.is_dir() or name.endswith(".js.map"):
            continue
        rel = os.path.normpath(name[len(prefix):])
        if rel.startswith("..") or os.path.isabs(rel):
            sys.exit(f"unsafe path in {wheel}: {name}")
        target = os.path.join(out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with archive.open(info) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        count += 1
if not os.path.isfile(os.path.join(out, "index.html")):
    sys.exit(f"{wheel} has no {prefix}index.html")
with open(os.path.join(out, ".version"), "w") as f:
    f.write(version + "\n")
print(f"unpacked {count} files from {wheel}", file=sys.stderr)
EOF

# Swap the new tree in; an older one is moved aside first, then removed.
if [[ -e "$dir" ]]; then
    mv "$dir" "$work/old"
fi
mv "$work/static" "$dir"
echo "$package $version is in $dir" >&2
