#!/usr/bin/env bash
# The GPU check (issue 18, part 3): one script, synthetic data only (the lent machine has no network), under 10 min.
#   bash benchmarks/gpu_check.sh [OUT]        # OUT defaults to $OUT (the device tool's folder) or /tmp/gpu_check
#   SMOKE=1 bash benchmarks/gpu_check.sh      # the same steps at toy sizes on the CPU: checks the script itself
# Steps: (1) the CUDA tests; (2) training / attack / evaluation throughput of a ResNet-50 at 256x128
# (benchmarks/gpu_throughput.py: attacks against the bf16 forward+backward floor, evaluation and re-ranking at MSMT17
# scale); (3) a market_seed-shaped bench on synthetic data, stopped after a few minutes (how far it gets is the
# figure). Everything printed goes to OUT/gpu_check.log too; record the figures with the card in benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
log="$out/gpu_check.log"
py="${PYTHON:-python}"
smoke="${SMOKE:-0}"
exec > >(tee -a "$log") 2>&1
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "environment"
"$py" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
if [ "$smoke" = 1 ]; then dev=cpu; size=(--smoke); else dev=cuda; size=(); fi

step "1. CUDA tests (skipped without a GPU)"
timeout 180 "$py" -m pytest -q -rs -k "cuda" tests/ || echo "CUDA tests: exit $?"

step "2. throughput: training, attacks vs the bf16 floor, evaluation + re-ranking at MSMT17 scale"
timeout 240 "$py" benchmarks/gpu_throughput.py --device "$dev" "${size[@]}" || echo "gpu_throughput: exit $?"

step "3. market_seed-shaped bench on synthetic data (a few minutes)"
ids=150; h=256; w=128; budget=150
if [ "$smoke" = 1 ]; then ids=8; h=64; w=32; budget=60; fi
"$py" -m advreid synth --out "$out/synth" --ids "$ids" --cams 6 --height "$h" --width "$w" --seed 0 --overwrite \
  > "$out/synth.log" || echo "synth: exit $?"
"$py" - "$out" "$dev" "$smoke" <<'PY'
import sys, yaml
from advreid.experiments.grid import load_bench_config
out, dev, smoke = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
cfg = load_bench_config("market_seed")
cfg["name"], cfg["device"] = "market_seed_synthetic", dev
for d in cfg["datasets"].values():
    d.update(name="market1501", root=f"{out}/synth")
short = ["train.epochs=2", "sched.milestones=[1]", "sched.warmup_epochs=0", "model.pretrained=false"]
if smoke:
    short += ["model.name=cnn4", "data.height=64", "data.width=32", "sampler.p=4", "sampler.k=2"]
for m in cfg["models"].values():
    m["overrides"] = [*(m.get("overrides") or []), *short]
cfg["settings"].update(max_images=200 if not smoke else 8, num_workers=4 if not smoke else 0)
yaml.safe_dump(cfg, open(f"{out}/market_seed_synthetic.yaml", "w"), sort_keys=False)
PY
timeout "$budget" "$py" -m advreid bench "$out/market_seed_synthetic.yaml" --out "$out/bench" --overwrite \
  > "$out/bench.log" 2>&1
echo "bench exit $? after at most ${budget}s; cells finished: $(ls "$out/bench/cells" 2>/dev/null | grep '\.json$' | grep -vc '\.per_query\.json$')"
tail -n 5 "$out/bench.log"
step "done"
