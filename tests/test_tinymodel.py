"""The locally built tiny models really load and generate with mlx_lm / mlx_vlm."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metal_guard import tinymodel
from metal_guard.tinymodel import (
    MARKER_NAME,
    build_tiny_lm,
    ensure_tiny_lm,
    is_tiny_model,
    read_marker,
    weight_bytes,
    write_tiny_image,
)

mlx_lm = pytest.importorskip("mlx_lm")


def _greedy(path: Path, prompt: str = "Hello world", max_tokens: int = 20) -> str:
    model, tok = mlx_lm.load(str(path))
    return mlx_lm.generate(model, tok, prompt=prompt, max_tokens=max_tokens)


# --------------------------------------------------------------------------- the LM


def test_lm_loads_generates_and_streams(tiny_model_path: Path) -> None:
    model, tok = mlx_lm.load(str(tiny_model_path))
    text = mlx_lm.generate(model, tok, prompt="Hello world", max_tokens=20)
    assert isinstance(text, str) and text

    responses = list(mlx_lm.stream_generate(model, tok, prompt="Hello world", max_tokens=20))
    assert len(responses) == 20
    assert responses[-1].generation_tokens == 20
    assert responses[-1].finish_reason == "length"  # stop tokens are never chosen
    assert "".join(r.text for r in responses) == text  # greedy: same path, same text


def test_lm_output_is_readable_ascii(tiny_model_path: Path) -> None:
    text = _greedy(tiny_model_path, prompt="Once upon a time", max_tokens=30)
    assert "\ufffd" not in text
    assert all(ch.isascii() and (ch.isprintable() or ch == "\n") for ch in text)


def test_greedy_output_is_deterministic_across_loads(tiny_model_path: Path) -> None:
    assert _greedy(tiny_model_path) == _greedy(tiny_model_path)


def test_same_seed_builds_identical_bytes_other_seed_differs(tmp_path: Path,
                                                             tiny_model_path: Path) -> None:
    a = build_tiny_lm(tmp_path / "a", seed=0)
    c = build_tiny_lm(tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(a, tiny_model_path, names, shallow=False)
    assert mismatch == [] and errors == []
    _, mismatch, _ = filecmp.cmpfiles(a, c, names, shallow=False)
    assert "model.safetensors" in mismatch
    assert "tokenizer.json" not in mismatch  # the tokenizer does not depend on the seed
    assert _greedy(a) == _greedy(tiny_model_path)
    assert _greedy(a) != _greedy(c)


def test_config_and_tokenizer_files(tiny_model_path: Path) -> None:
    config = json.loads((tiny_model_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64
    assert config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "model.safetensors"):
        assert (tiny_model_path / name).is_file(), name
    _, tok = mlx_lm.load(str(tiny_model_path))
    assert len(tok.get_vocab()) == config["vocab_size"]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert set(config["eos_token_id"]) <= set(tok.eos_token_ids)


def test_tokenizer_round_trips_any_text(tiny_model_path: Path) -> None:
    _, tok = mlx_lm.load(str(tiny_model_path))
    text = "Grüße, 世界! def f(x): return x ** 2  # 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text


def test_chat_template_applies(tiny_model_path: Path) -> None:
    _, tok = mlx_lm.load(str(tiny_model_path))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi there<|end|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids("<|assistant|>") in ids
    # OpenAI-style content parts render their text.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    assert "<|user|>\nHi there<|end|>" in tok.apply_chat_template(parts, tokenize=False)
    # And the chat prompt generates.
    out = mlx_lm.generate(*mlx_lm.load(str(tiny_model_path)), prompt=rendered, max_tokens=5)
    assert isinstance(out, str)


# --------------------------------------------------------------------------- the VLM


def test_vlm_loads_and_generates_with_an_image(tiny_vlm_path: Path, tiny_image_path: Path,
                                               tmp_path: Path) -> None:
    mlx_vlm = pytest.importorskip("mlx_vlm")
    from mlx_vlm.prompt_utils import apply_chat_template
    from PIL import Image

    model, processor = mlx_vlm.load(str(tiny_vlm_path))
    prompt = apply_chat_template(processor, model.config, "describe this image", num_images=1)
    result = mlx_vlm.generate(model, processor, prompt, image=[str(tiny_image_path)],
                              max_tokens=8)
    assert result.generation_tokens == 8 and result.finish_reason == "length"
    assert result.prompt_tokens >= 16  # (32 / 8)^2 image tokens plus the text

    # The image really reaches the model: another image changes the first-step logits.
    other = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(other)

    def first_logprobs(img: Path) -> list[float]:
        step = next(iter(mlx_vlm.stream_generate(model, processor, prompt, image=[str(img)],
                                                 max_tokens=1)))
        return step.logprobs.tolist()

    assert first_logprobs(tiny_image_path) == first_logprobs(tiny_image_path)
    assert first_logprobs(tiny_image_path) != first_logprobs(other)


def test_tiny_image_is_deterministic(tmp_path: Path, tiny_image_path: Path) -> None:
    from PIL import Image

    again = write_tiny_image(tmp_path / "again.png")
    assert again.read_bytes() == tiny_image_path.read_bytes()
    with Image.open(again) as img:
        assert img.size == (64, 64) and img.mode == "RGB"
    assert write_tiny_image(tmp_path / "s1.png", seed=1).read_bytes() != again.read_bytes()


# --------------------------------------------------------------------------- ensure / atomicity


def test_ensure_is_idempotent_and_rebuilds_on_change(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    ensure_tiny_lm(dest)
    marker = dest / MARKER_NAME
    stat = marker.stat()
    assert ensure_tiny_lm(dest) == dest.absolute()
    assert marker.stat().st_ino == stat.st_ino and marker.stat().st_mtime_ns == stat.st_mtime_ns

    old_weights = (dest / "model.safetensors").read_bytes()
    ensure_tiny_lm(dest, seed=3)  # a different spec replaces our own model
    assert read_marker(dest)["spec"]["seed"] == 3
    assert (dest / "model.safetensors").read_bytes() != old_weights

    # A damaged model of ours (older format, unreadable marker, missing file) is rebuilt.
    for damage in ('{"format_version": 0}', "{not json", None):
        ensure_tiny_lm(dest)
        if damage is None:
            (dest / "tokenizer.json").unlink()
        else:
            marker.write_text(damage)
        assert not is_tiny_model(dest)
        ensure_tiny_lm(dest)
        assert is_tiny_model(dest) and (dest / "model.safetensors").read_bytes() == old_weights
    assert [p.name for p in tmp_path.iterdir() if ".building-" in p.name or ".old-" in p.name] == []


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a metal-guard tiny model"):
        ensure_tiny_lm(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]
    # A model directory without our marker is someone else's model: left alone too.
    theirs = ensure_tiny_lm(tmp_path / "theirs")
    (theirs / MARKER_NAME).unlink()
    with pytest.raises(FileExistsError):
        build_tiny_lm(theirs, seed=1)
    assert (theirs / "config.json").is_file() and not is_tiny_model(theirs)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_lm(afile)
    assert afile.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_tiny_model(ensure_tiny_lm(empty))  # an empty directory is fine


def test_failed_build_keeps_the_existing_model(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dest = ensure_tiny_lm(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}

    def broken(out: Path, spec: dict) -> list[str]:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tinymodel, "_write_lm", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        build_tiny_lm(dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    dest = tmp_path / "shared"
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from metal_guard.tinymodel import ensure_tiny_lm
        print("RESULT", ensure_tiny_lm({str(dest)!r}))
    """)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert f"RESULT {dest}" in out
    assert sum(out.count("built tiny lm model") for out, _ in outputs) == 1
    assert is_tiny_model(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shared.lock", "shared"]
    model, tok = mlx_lm.load(str(dest))
    assert mlx_lm.generate(model, tok, prompt="hi", max_tokens=3)


# --------------------------------------------------------------------------- helpers / hygiene


def test_vocab_larger_than_the_tokenizer_is_padded_and_never_sampled(tmp_path: Path) -> None:
    path = build_tiny_lm(tmp_path / "wide", vocab_size=1200, hidden_size=32,
                         intermediate_size=64)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 1200
    model, tok = mlx_lm.load(str(path))
    assert model.model.embed_tokens.weight.shape == (1200, 32)
    known = len(tok.get_vocab())
    assert known < 1200
    tokens = [r.token for r in mlx_lm.stream_generate(model, tok, prompt="Hello", max_tokens=30)]
    assert len(tokens) == 30 and max(tokens) < known

def test_weight_bytes_is_the_sum_of_safetensors_sizes(tiny_model_path: Path,
                                                      tiny_vlm_path: Path,
                                                      tmp_path: Path) -> None:
    for path in (tiny_model_path, tiny_vlm_path):
        expected = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert weight_bytes(path) == expected == (path / "model.safetensors").stat().st_size
        assert 50_000 < weight_bytes(path) < 1_000_000  # sub-MB, but real
    (tmp_path / "a.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "b.safetensors").write_bytes(b"x" * 5)
    (tmp_path / "c.bin").write_bytes(b"x" * 100)
    assert weight_bytes(tmp_path) == 15
    assert weight_bytes(tmp_path / "missing") == 0


def test_bad_parameters_are_rejected_before_touching_disk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_tiny_lm(tmp_path / "x", hidden_size=65)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_lm(tmp_path / "x", vocab_size=100)
    with pytest.raises(TypeError, match="layers"):
        ensure_tiny_lm(tmp_path / "x", layers=3)
    assert list(tmp_path.iterdir()) == []


def test_importing_the_module_imports_no_ml_library() -> None:
    code = (
        "import sys, metal_guard.tinymodel\n"
        "heavy = ('mlx', 'mlx_lm', 'mlx_vlm', 'transformers', 'tokenizers', 'PIL')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_default_dir_is_in_the_isolated_cache(metalguard_home: Path) -> None:
    assert tinymodel.default_dir() == metalguard_home / "cache" / "tiny-models" / "lm"
    assert tinymodel.default_dir("vlm").name == "vlm"
    with pytest.raises(ValueError):
        tinymodel.default_dir("audio")


# --------------------------------------------------------------------------- conftest itself

_OUTER_ENV = {
    "METALGUARD_MODE": "observer", "METALGUARD_HOME": "/nonexistent/real-home",
    "METALGUARD_DIAGNOSTIC_REPORTS_DIRS": "/Library/Logs/DiagnosticReports",
    "MLX_LOCK_PATH": "/tmp/real.lock", "MLX_FORCE_WAIT_SEC": "1", "MLX_RECLAIM_COOLDOWN_SEC": "1",
    "MLX_SAFE_PYTHON_FORCE": "1", "HF_HUB_OFFLINE": "0",
}


def test_isolated_home_fixture(metalguard_home: Path) -> None:
    from metal_guard.settings import get_settings

    s = get_settings()
    assert s.home == metalguard_home and s.state_dir.is_relative_to(metalguard_home)
    assert metalguard_home.is_dir() and not any(metalguard_home.iterdir())
    assert all(d.is_dir() and not any(d.iterdir()) for d in s.report_dirs)
    assert s.mode == "defensive" and s.lock_path is None and s.safe_python_force is False
    assert s.force_wait_sec == 30.0 and s.reclaim_cooldown_sec == 8.0
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"


def test_isolated_home_clears_the_callers_environment(tmp_path: Path) -> None:
    """A child pytest using this conftest, started with real-looking settings in its env."""
    import importlib.util
    import shutil

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_env.py").write_text(textwrap.dedent("""
        import os
        from metal_guard.settings import get_settings

        def test_env(metalguard_home):
            s = get_settings()
            assert s.home == metalguard_home and s.mode == "defensive"
            assert s.lock_path is None and s.safe_python_force is False
            assert s.force_wait_sec == 30.0 and s.reclaim_cooldown_sec == 8.0
            assert [str(d) for d in s.report_dirs] != ["/Library/Logs/DiagnosticReports"]
            assert os.environ["HF_HUB_OFFLINE"] == "1"
            assert os.environ["METALGUARD_TEST_MODEL_CACHE"] == "/kept"
    """))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    if importlib.util.find_spec("metal_guard.pytest_plugin") is None:
        args[4:4] = ["-p", "no:metal_guard"]
    env = {**os.environ, **_OUTER_ENV, "METALGUARD_TEST_MODEL_CACHE": "/kept"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 passed" in out.stdout
