#!/usr/bin/env bash
# Prepare what tools/device_check.sh needs on a device machine that cannot reach a package index:
# wheels of the packages its image lacks (into .whl/) and the Scientific data (into .devdata/).
# Both folders are git-ignored through .git/info/exclude; carry them: carry [".whl", ".devdata"].
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >>.git/info/exclude
mkdir -p .whl .devdata
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# pure-Python packages the device image lacks (deepspeed ships no wheel: build one, ops off)
DS_BUILD_OPS=0 python3 -m pip wheel --no-deps -q -w .whl deepspeed hjson webdataset braceexpand diffusers py-cpuinfo
python3 -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl msgpack
cp -r ../shared/data/amazon/Scientific .devdata/
# the bundled all-MiniLM-L6-v2 (88 MB in fp32) in fp16, so that everything fits the 64 MiB carry
python3 - <<'PY'
from transformers import AutoModel, AutoTokenizer
from megarec.tokenizer.encoders import default_encoder_path
src = default_encoder_path()
AutoModel.from_pretrained(src, dtype="float16").save_pretrained(".devdata/minilm")
AutoTokenizer.from_pretrained(src).save_pretrained(".devdata/minilm")
PY
du -sh .whl .devdata
