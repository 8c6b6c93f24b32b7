#!/usr/bin/env bash
# device_wheels.sh: fetch into .whl/ (the repository root) the wheels that bench/gpu_check.py uses and the
# GPU machine lacks, for Python 3.12 on x86-64 Linux. Run it on a machine that reaches PyPI; the GPU
# machine reaches no registry, so bench/device_run.sh installs these offline from .whl/.
#
#     bash bench/device_wheels.sh          # again at any time: a wheel already there is kept
#
#   bitsandbytes 0.50.2   AdamW8bit, the engine stages' optimizer (without it they fall back to torch AdamW).
#                         43 MB as published; repacked here with only the CUDA 13 and CPU libraries
#                         (the GPU machine's torch is built for CUDA 13.0, and bitsandbytes loads the
#                         library that matches torch.version.cuda): about 7 MB.
#   liger-kernel 0.8.5    the Liger fused linear cross-entropy anchor of stage b
#   cut-cross-entropy 25.1.1  Apple's cut-cross-entropy anchor of stage b
# Their own dependencies (torch, triton, numpy, packaging) are on the GPU machine already.
# .whl/ is git-ignored: the device tool carries it only when the call names it (carry: [".whl"]).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=$ROOT/.whl
PYTHON=${PYTHON:-python3}
# One version of each: the offline install stops at two. Change a pin here, and the old wheel goes.
PINS=(bitsandbytes==0.50.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
# The GPU machine's Python; manylinux_2_24 because that is bitsandbytes 0.50.2's tag (pip matches N exactly).
PIP_FLAGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Libraries of bitsandbytes that the GPU machine never loads.
BNB_DROP='bitsandbytes/libbitsandbytes_(cuda1[12][0-9]|rocm[0-9]+|xpu[0-9]+)\.so$'
LIMIT_MB=16  # the working tree that travels is capped at 64 MiB in all

mkdir -p "$WHEELS"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/earkit-wheels.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

wheel_name() {  # distribution name as a wheel file spells it: liger-kernel -> liger_kernel
  echo "${1//-/_}"
}

for pin in "${PINS[@]}"; do
  name=${pin%%==*}
  version=${pin##*==}
  prefix=$(wheel_name "$name")
  have=$(find "$WHEELS" -maxdepth 1 -name "${prefix}-${version}-*.whl" | head -1)
  if [ -n "$have" ]; then
    echo "kept    $(basename "$have")"
    continue
  fi
  find "$WHEELS" -maxdepth 1 -name "${prefix}-*.whl" -print -delete | sed 's/^/removed /'
  "$PYTHON" -m pip download -q "${PIP_FLAGS[@]}" -d "$SCRATCH" "$pin"
  fetched=$(find "$SCRATCH" -maxdepth 1 -name "${prefix}-${version}-*.whl" | head -1)
  if [ -z "$fetched" ]; then
    echo "pip download gave no wheel for $pin" >&2
    exit 1
  fi
  if [ "$name" = bitsandbytes ]; then
    # Repack without the libraries it would never load, with a RECORD that matches what remains
    # (pip checks it). Same file name: the tags still hold.
    "$PYTHON" - "$fetched" "$WHEELS/$(basename "$fetched")" "$BNB_DROP" <<'EOF'
import base64, hashlib, re, sys, zipfile

source, target, pattern = sys.argv[1:]
drop = re.compile(pattern)
with zipfile.ZipFile(source) as zin:
    names = [n for n in zin.namelist() if not drop.search(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for n in names:
            if n == record:
                continue
            data = zin.read(n)
            zout.writestr(zin.getinfo(n), data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{n},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        zout.writestr(record, "\n".join(lines) + "\n")
print(f"slimmed {source.rsplit('/', 1)[-1]}: kept {len(names)} of {len(zin.namelist())} files")
EOF
  else
    mv "$fetched" "$WHEELS/"
  fi
  echo "fetched $(basename "$fetched")"
done

ls -l "$WHEELS"
total_kb=$(du -sk "$WHEELS" | cut -f1)
echo "total: $(( total_kb / 1024 )) MB in $WHEELS (limit here ${LIMIT_MB} MB of the 64 MiB that travel)"
if (( total_kb > LIMIT_MB * 1024 )); then
  echo "too big to travel with the working tree: check the pins and the slimming" >&2
  exit 1
fi
