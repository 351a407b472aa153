"""Tiny, randomly initialised models built locally — for the test suite and ``metal-guard demo``.

Nothing is downloaded. :func:`build_tiny_lm` writes a llama-style model directory that
``mlx_lm.load`` / ``mlx_lm.generate`` / ``mlx_lm.stream_generate`` run on for real (on CPU in
well under a second), with a byte-level BPE tokenizer trained here on a small built-in corpus and
a simple chat template. :func:`build_tiny_vlm` writes a tiny PaliGemma that ``mlx_vlm.load`` /
``mlx_vlm.generate`` run on with an image. :func:`write_tiny_image` writes a small PNG.

Builds are

* **deterministic** for a seed (same bytes for the same seed and library versions);
* **atomic**: everything is written into a temporary sibling directory, a marker file is written
  last, and the directory is renamed into place under a file lock — a reader never sees half a
  model and two concurrent builders never corrupt each other;
* **idempotent** through :func:`ensure_tiny_lm` / :func:`ensure_tiny_vlm`, which return at once
  when a complete model with the same parameters is already there.

A directory that exists at ``dest`` but is not a metal-guard tiny model is never overwritten
(:class:`FileExistsError`).

Documented exception to "only ``backend.py`` imports ``mlx.core``": this builder has to create
arrays and save weights, so the build functions import ``mlx.core``, ``mlx_lm`` / ``mlx_vlm``,
``tokenizers`` and ``transformers`` *inside the functions*. Importing this module imports none
of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metal_guard import storage

if TYPE_CHECKING:
    from metal_guard.settings import Settings

log = logging.getLogger("metal_guard.tinymodel")

__all__ = [
    "MARKER_NAME", "build_tiny_lm", "build_tiny_vlm", "default_dir", "ensure_tiny_lm",
    "ensure_tiny_vlm",
    "is_tiny_model", "read_marker", "weight_bytes", "write_tiny_image",
]

#: Written last into a finished model directory; its presence means "complete".
MARKER_NAME = ".metal_guard_tiny_model.json"
#: Bump when the layout of a built model changes, so old caches get rebuilt.
FORMAT_VERSION = 1
#: How long a builder waits for another process building the same directory.
BUILD_LOCK_TIMEOUT_SEC = 600.0

LM_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|end|>")
VLM_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")

#: A simple chat template: ``<s><|user|>\nHi<|end|>\n<|assistant|>\n``. Content may be a string
#: or a list of OpenAI-style parts (only the text parts are rendered).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

#: The tokenizers' training text: package data, original prose, ASCII only.
CORPUS_RESOURCE = "data/tiny_corpus.txt"


# --------------------------------------------------------------------------- small helpers


def default_dir(kind: str = "lm", settings: Settings | None = None) -> Path:
    """Where ``metal-guard demo`` keeps its tiny model: ``<cache_dir>/tiny-models/<kind>``."""
    if kind not in ("lm", "vlm"):
        raise ValueError("kind must be 'lm' or 'vlm'")
    if settings is None:
        from metal_guard.settings import get_settings

        settings = get_settings()
    return settings.cache_dir / "tiny-models" / kind


def weight_bytes(path: Path | str) -> int:
    """Bytes of model weights on disk: the sum of ``*.safetensors`` file sizes in ``path``."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors") if f.is_file())


def read_marker(path: Path | str) -> dict[str, Any] | None:
    """The completion marker of a tiny-model directory, or ``None`` when absent/unreadable."""
    try:
        data = json.loads((Path(path) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_tiny_model(path: Path | str, spec: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a complete tiny model (matching ``spec`` when given)."""
    marker = read_marker(path)
    if marker is None or marker.get("format_version") != FORMAT_VERSION:
        return False
    if not all((Path(path) / name).is_file() for name in marker.get("files", [])):
        return False
    return spec is None or marker.get("spec") == spec


def _write_json(path: Path, obj: Any) -> None:
    # Plain files inside a staging directory (published atomically as a whole); sorted keys
    # keep builds byte-for-byte reproducible.
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``dest``; removed unless it was published."""
    storage.ensure_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(dest: Path) -> None:
    """Raise ``FileExistsError`` unless ``dest`` is absent, empty, or a tiny model of ours."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise FileExistsError(f"{dest} exists and is not a directory; refusing to replace it")
    if dest.is_dir():
        ours = (dest / MARKER_NAME).exists()  # even if unreadable or from an older format
        if not ours and any(dest.iterdir()):
            raise FileExistsError(
                f"{dest} exists and is not a metal-guard tiny model (no {MARKER_NAME}); "
                "refusing to overwrite it — choose another directory or remove it yourself"
            )


def _make_private(tree: Path) -> None:
    """Files 0600 and directories 0700 under ``tree`` (tokenizer and weight writers use the
    umask, which would leave 0644 files)."""
    for root, dirs, files in os.walk(tree):
        for name in dirs:
            os.chmod(os.path.join(root, name), storage.DIR_MODE, follow_symlinks=False)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, storage.FILE_MODE)
    os.chmod(tree, storage.DIR_MODE)


def _sweep_leftovers(dest: Path) -> None:
    """Remove staging (``.<name>.building-*``) and replaced (``.<name>.old-*``) directories a
    killed builder left next to ``dest``. Called under the build lock, so none is in use."""
    prefixes = (f".{dest.name}.building-", f".{dest.name}.old-")
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefixes) and entry.is_dir(follow_symlinks=False):
            log.info("removing a tiny-model build left over by a killed builder: %s", entry.path)
            shutil.rmtree(entry.path, ignore_errors=True)


def _publish(tmp: Path, dest: Path) -> None:
    """Rename a finished staging directory to ``dest`` (caller holds the build lock)."""
    _check_replaceable(dest)
    if dest.is_dir():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    storage._fsync_dir(dest.parent)


def _build_into(
    dest: Path | str,
    kind: str,
    spec: dict[str, Any],
    writer: Callable[[Path, dict[str, Any]], list[str]],
    *,
    reuse: bool,
) -> Path:
    dest = Path(dest).expanduser().absolute()
    if reuse and is_tiny_model(dest, spec):
        return dest
    storage.ensure_dir(dest.parent)
    # The lock file is a hidden sibling: ``.<name>.lock`` next to ``<name>``.
    with storage.locked(dest.with_name(f".{dest.name}"), timeout=BUILD_LOCK_TIMEOUT_SEC):
        if reuse and is_tiny_model(dest, spec):  # built by someone else while we waited
            return dest
        _check_replaceable(dest)  # fail before spending time on a build
        _sweep_leftovers(dest)
        with _staging(dest) as tmp:
            files = writer(tmp, spec)
            marker = {"format_version": FORMAT_VERSION, "kind": kind, "spec": spec,
                      "files": sorted(files)}
            _write_json(tmp / MARKER_NAME, marker)  # last: its presence means "complete"
            _make_private(tmp)
            _publish(tmp, dest)
    log.info("built tiny %s model at %s (%d weight bytes)", kind, dest, weight_bytes(dest))
    return dest


def _train_bpe(vocab_size: int, special_tokens: tuple[str, ...], bos: str | None) -> Any:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, offline)."""
    from importlib.resources import files

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = files("metal_guard").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")
    tok.train_from_iterator(text.splitlines() * 4, trainer=trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _save_hf_tokenizer(tok: Any, out: Path, **kwargs: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # Make AutoTokenizer load exactly this tokenizer, not the model type's default class.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if kwargs.get("chat_template"):
        # Also inline (older transformers read it only from here; newer use chat_template.jinja).
        config["chat_template"] = kwargs["chat_template"]
    _write_json(config_path, config)
    special = {k: v for k, v in kwargs.items() if k.endswith("_token")}
    special["additional_special_tokens"] = list(kwargs.get("additional_special_tokens", []))
    _write_json(out / "special_tokens_map.json", special)


def _quiet_embeddings(embed: Any, tok: Any, specials: tuple[str, ...]) -> None:
    """Zero the embedding rows of special, unknown and not-printable-ASCII tokens.

    With tied embeddings those tokens' logits are then exactly 0 while the best of the other
    few hundred random logits is positive, so greedy decoding of the random model emits
    readable text, never a stop token, and runs to ``max_tokens`` (what tests want).
    """
    import mlx.core as mx

    vocab_size, known = embed.weight.shape[0], tok.get_vocab_size()
    special_ids = {tok.token_to_id(t) for t in specials}
    mask = [1.0] * vocab_size
    for tid in range(vocab_size):
        # Rows past the tokenizer (a padded vocabulary) decode to nothing: masked too.
        text = tok.decode([tid], skip_special_tokens=False) if tid < known else ""
        printable = text.isascii() and (text.isprintable() or text in ("\n", " "))
        if tid in special_ids or not text or not printable:
            mask[tid] = 0.0
    embed.weight = embed.weight * mx.array(mask, dtype=embed.weight.dtype)[:, None]


def _save_weights(model: Any, path: Path, *, seed: int, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    target = getattr(mx, dtype)
    params = {k: v.astype(target) for k, v in sorted(params.items())}
    mx.eval(params)
    mx.save_safetensors(str(path), params, metadata={"format": "mlx", "seed": str(seed)})


# --------------------------------------------------------------------------- the LM


def _lm_spec(**spec: Any) -> dict[str, Any]:
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    if spec["hidden_size"] % heads or heads % kv_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and "
                         "num_attention_heads by num_key_value_heads")
    _check_vocab(spec["vocab_size"], LM_SPECIAL_TOKENS)
    if spec["dtype"] not in ("float32", "float16", "bfloat16"):
        raise ValueError("dtype must be float32, float16 or bfloat16")
    return spec


def _check_vocab(vocab_size: int, specials: tuple[str, ...]) -> None:
    minimum = 256 + len(specials) + 8
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} "
                         "(256 byte tokens + special tokens + a few merges)")


def _write_lm(out: Path, spec: dict[str, Any]) -> list[str]:
    import mlx.core as mx
    from mlx_lm.models import llama

    tok = _train_bpe(spec["vocab_size"], LM_SPECIAL_TOKENS, bos="<s>")
    ids = {t: tok.token_to_id(t) for t in LM_SPECIAL_TOKENS}
    vocab_size = spec["vocab_size"]
    _save_hf_tokenizer(
        tok, out, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        chat_template=CHAT_TEMPLATE, model_max_length=spec["max_position_embeddings"],
    )
    eos_ids = [ids["</s>"], ids["<|end|>"]]
    hidden, heads = spec["hidden_size"], spec["num_attention_heads"]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": spec["num_key_value_heads"],
        "head_dim": hidden // heads, "intermediate_size": spec["intermediate_size"],
        "max_position_embeddings": spec["max_position_embeddings"], "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": spec["dtype"],
        "bos_token_id": ids["<s>"], "eos_token_id": eos_ids, "pad_token_id": ids["<pad>"],
    }
    args = llama.ModelArgs.from_dict(config)
    mx.random.seed(spec["seed"])
    model = llama.Model(args)
    _quiet_embeddings(model.model.embed_tokens, tok, LM_SPECIAL_TOKENS)
    _save_weights(model, out / "model.safetensors", seed=spec["seed"], dtype=spec["dtype"])
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": ids["<s>"], "eos_token_id": eos_ids, "pad_token_id": ids["<pad>"],
        "do_sample": False,
    })
    return sorted(p.name for p in out.iterdir() if p.is_file())


def build_tiny_lm(
    dest: Path | str,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    reuse: bool = False,
) -> Path:
    """Build a tiny random llama model at ``dest``; return its absolute path.

    With ``reuse=False`` an existing tiny model at ``dest`` is rebuilt; with ``reuse=True``
    (what :func:`ensure_tiny_lm` does) it is kept when its parameters match. Any other
    non-empty directory is refused with ``FileExistsError``. ``vocab_size`` is the embedding
    size; the trained tokenizer has ``min(vocab_size, ~790)`` tokens (the corpus is small), and
    the rows past it are never sampled.
    """
    spec = _lm_spec(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                    num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                    num_key_value_heads=num_key_value_heads, intermediate_size=intermediate_size,
                    max_position_embeddings=max_position_embeddings, dtype=dtype)
    return _build_into(dest, "lm", spec, _write_lm, reuse=reuse)


def ensure_tiny_lm(dest: Path | str, **params: Any) -> Path:
    """:func:`build_tiny_lm` with ``reuse=True``: returns at once when already built."""
    return build_tiny_lm(dest, reuse=True, **params)


# --------------------------------------------------------------------------- the VLM


def _vlm_spec(**spec: Any) -> dict[str, Any]:
    hidden, patch = spec["hidden_size"], spec["patch_size"]
    if spec["image_size"] % patch or hidden % 4 or hidden < patch:
        raise ValueError("image_size must divide by patch_size; hidden_size must divide by 4 "
                         "and be >= patch_size")
    _check_vocab(spec["vocab_size"], VLM_SPECIAL_TOKENS)
    return spec


def _write_vlm(out: Path, spec: dict[str, Any]) -> list[str]:
    import mlx.core as mx
    from mlx_vlm.models import paligemma

    tok = _train_bpe(spec["vocab_size"], VLM_SPECIAL_TOKENS, bos=None)
    ids = {t: tok.token_to_id(t) for t in VLM_SPECIAL_TOKENS}
    vocab_size = spec["vocab_size"]
    _save_hf_tokenizer(
        tok, out, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"], model_max_length=512,
    )
    hidden, image, patch = spec["hidden_size"], spec["image_size"], spec["patch_size"]
    num_image_tokens = (image // patch) ** 2
    # What SiglipImageProcessor(size=..., image_seq_length=...).save_pretrained() writes,
    # spelled out so the build needs no image-processor class (and prints no torchvision note).
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor", "processor_class": "PaliGemmaProcessor",
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": image, "width": image},
        "image_seq_length": num_image_tokens,
    })
    config: dict[str, Any] = {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "vocab_size": vocab_size, "hidden_size": hidden, "projection_dim": hidden,
        "image_token_index": ids["<image>"], "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"],
        "text_config": {
            "model_type": "gemma", "hidden_size": hidden, "num_hidden_layers": 2,
            "intermediate_size": 2 * hidden, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": hidden // 4, "vocab_size": vocab_size,
            "num_image_tokens": num_image_tokens, "max_position_embeddings": 512,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": hidden, "num_hidden_layers": 2,
            "intermediate_size": 2 * hidden, "num_attention_heads": 4, "image_size": image,
            "patch_size": patch, "projection_dim": hidden,
        },
    }
    model_config = paligemma.ModelConfig.from_dict(json.loads(json.dumps(config)))
    mx.random.seed(spec["seed"])
    model = paligemma.Model(model_config)
    _quiet_embeddings(model.language_model.model.embed_tokens, tok, VLM_SPECIAL_TOKENS)
    _save_weights(model, out / "model.safetensors", seed=spec["seed"], dtype="float32")
    _write_json(out / "config.json", config)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def build_tiny_vlm(
    dest: Path | str,
    *,
    seed: int = 0,
    vocab_size: int = 320,
    hidden_size: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    reuse: bool = False,
) -> Path:
    """Build a tiny random PaliGemma for ``mlx_vlm`` at ``dest``; return its absolute path.

    ``(image_size / patch_size)**2`` image tokens per prompt (16 by default); one image per
    prompt. ``reuse`` and refusal rules as in :func:`build_tiny_lm`.
    """
    spec = _vlm_spec(seed=seed, vocab_size=vocab_size, hidden_size=hidden_size,
                     image_size=image_size, patch_size=patch_size)
    return _build_into(dest, "vlm", spec, _write_vlm, reuse=reuse)


def ensure_tiny_vlm(dest: Path | str, **params: Any) -> Path:
    """:func:`build_tiny_vlm` with ``reuse=True``: returns at once when already built."""
    return build_tiny_vlm(dest, reuse=True, **params)


# --------------------------------------------------------------------------- the image


def write_tiny_image(dest: Path | str, *, size: int = 64, seed: int = 0) -> Path:
    """Write a small deterministic RGB PNG (coloured quadrants + noise) to ``dest``."""
    import random

    from PIL import Image

    dest = Path(dest)
    storage.ensure_dir(dest.parent)
    rng = random.Random(seed)
    colours = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 210, 50)]  # quadrants
    half = size // 2
    data = []
    for y in range(size):
        for x in range(size):
            n = rng.randint(-20, 20)
            data.append(tuple(max(0, min(255, c + n))
                              for c in colours[(y >= half) * 2 + (x >= half)]))
    img = Image.new("RGB", (size, size))
    img.putdata(data)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.chmod(tmp, storage.FILE_MODE)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return dest
