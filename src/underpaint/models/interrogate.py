"""A1111's "Interrogate CLIP": a prompt read from a picture, as a BLIP caption followed by the
best matches CLIP finds in word lists.

The caption model is Salesforce's BLIP captioner as A1111 keeps it
(``models/BLIP/model_base_caption_capfilt_large.pth``: the original repository's layout, the state
under ``"model"``, read with ``torch.load(weights_only=True)`` only), or a transformers BLIP
captioning folder (``config.json``, the weights, the tokenizer). It runs as transformers'
``BlipForConditionalGeneration``, the original weights renamed onto it (:func:`blip_state_dict`,
which checks every name and shape). The original layout carries no tokenizer: BERT's
``vocab.txt`` is taken from beside the file, else from the Hugging Face cache
(``bert-base-uncased``, where A1111 put it), and never downloaded. The picture is resized to the
model's size (384² for A1111's) with bicubic resampling and normalised with CLIP's mean and
deviation; the caption continues the text "a picture of " with greedy search (A1111's settings:
1 beam, at least 24 and at most 48 tokens), the prompt then cut off.

The word lists are the ``*.txt`` files of the ``interrogate`` folder (A1111 keeps them in its
install's ``interrogate/``), read in name order, at most 1500 lines each; a name with ``.topN.``
(``flavors.top3.txt``) gives that many matches, else one. Each is ranked by a CLIP model (a
transformers ``CLIPModel`` folder, or one ``.safetensors`` in its layout, in ``models/CLIP/``;
A1111 uses OpenAI's ViT-L/14): the picture (shortest side to the model's size, centre crop) and
every line are embedded, normalised, and the softmax of 100 × their cosine similarities over the
list is the score; the best are appended to the caption, ", " before each (``ranks``: as
``(text:score)`` with the score from 0 to 1, A1111's "include ranks of model tags"). Without word
lists or without a CLIP model the caption comes alone.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError, ModelNotFound

log = logging.getLogger(__name__)

#: A1111's caption settings (interrogate_clip_num_beams / min_length / max_length) and list limit.
NUM_BEAMS, MIN_LENGTH, MAX_LENGTH = 1, 24, 48
DICT_LIMIT = 1500
#: The text BLIP's captions continue, cut from the result.
CAPTION_PROMPT = "a picture of "
#: OpenAI CLIP's picture normalisation, which BLIP shares.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
#: Where A1111 (transformers) caches BERT's tokenizer, which the original BLIP layout needs.
BERT_REPOS = ("bert-base-uncased", "google-bert/bert-base-uncased")
_TOP = re.compile(r"\.top(\d+)\.")
_MODEL_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")


# --------------------------------------------------------------------------- BLIP captions


_VISION_NAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                 "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                 "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
_BLOCK_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _renamed(key: str) -> str | None:
    """The transformers name of an original BLIP captioner's tensor (None: not the captioner's)."""
    if key.startswith("text_decoder."):
        return None if key.endswith("position_ids") else key
    if not key.startswith("visual_encoder."):
        return None
    rest = key.removeprefix("visual_encoder.")
    if rest in _VISION_NAMES:
        return "vision_model." + _VISION_NAMES[rest]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if match and match.group(2) in _BLOCK_PARTS:
        return f"vision_model.encoder.layers.{match.group(1)}.{_BLOCK_PARTS[match.group(2)]}.{match.group(3)}"
    return None


def blip_config(state: dict[str, torch.Tensor], tokenizer):
    """The ``BlipConfig`` of an original-layout captioner, read from its tensors' shapes (heads of
    64 channels, as in BLIP's base and large models)."""
    from transformers import BlipConfig

    pos = state["visual_encoder.pos_embed"]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    width = pos.shape[-1]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise ModelError(f"BLIP: visual_encoder.pos_embed has {pos.shape[1]} positions, expected 1 + a square number")
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual_encoder.blocks."))
    words = state["text_decoder.bert.embeddings.word_embeddings.weight"]
    layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("text_decoder.bert.encoder.layer."))
    text_width = words.shape[1]
    vision = dict(hidden_size=width, intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=blocks, num_attention_heads=max(1, width // 64), image_size=grid * patch,
                  patch_size=patch, layer_norm_eps=1e-6)
    text = dict(vocab_size=words.shape[0], hidden_size=text_width, num_hidden_layers=layers,
                num_attention_heads=max(1, text_width // 64),
                intermediate_size=state["text_decoder.bert.encoder.layer.0.intermediate.dense.weight"].shape[0],
                max_position_embeddings=state["text_decoder.bert.embeddings.position_embeddings.weight"].shape[0],
                encoder_hidden_size=state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1],
                layer_norm_eps=1e-12, bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    return BlipConfig(vision_config=vision, text_config=text)


def blip_state_dict(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """The original captioner's tensors under ``model``'s names; a tensor the model lacks, one of a
    different shape, or one the model needs and the file lacks is an error naming it."""
    wanted = model.state_dict()
    out = {}
    for key, tensor in state.items():
        name = _renamed(key)
        if name is None:
            continue
        if name not in wanted:
            raise ModelError(f"BLIP: {key} has no place in the captioner (as {name})")
        if tuple(tensor.shape) != tuple(wanted[name].shape):
            raise ModelError(f"BLIP: {key} has shape {tuple(tensor.shape)}, expected {tuple(wanted[name].shape)}")
        out[name] = tensor
    tied = "text_decoder.cls.predictions.decoder.weight"
    if tied not in out and "text_decoder.bert.embeddings.word_embeddings.weight" in out:
        out[tied] = out["text_decoder.bert.embeddings.word_embeddings.weight"]
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise ModelError(f"BLIP: the file lacks {len(missing)} of the captioner's tensors, e.g. {missing[0]}")
    return out


def bert_vocab(beside: Path) -> Path:
    """BERT's ``vocab.txt`` for an original-layout BLIP file: beside it, else in the Hugging Face cache."""
    own = beside.parent / "vocab.txt"
    if own.is_file():
        return own
    try:
        from huggingface_hub import try_to_load_from_cache

        for repo in BERT_REPOS:
            found = try_to_load_from_cache(repo, "vocab.txt")
            if isinstance(found, str):
                return Path(found)
    except Exception as exc:  # an unreadable cache is the same as none
        log.debug("no BERT vocabulary in the Hugging Face cache: %s", exc)
    raise ModelNotFound(f"{beside.name} needs BERT's tokenizer: put bert-base-uncased's vocab.txt beside it in "
                        f"{beside.parent}", field="model")


@dataclass
class Captioner:
    """A BLIP captioner: ``caption(picture)``."""

    model: object
    tokenizer: object
    image_size: int

    @torch.inference_mode()
    def caption(self, image, *, num_beams: int = NUM_BEAMS, min_length: int = MIN_LENGTH,
                max_length: int = MAX_LENGTH) -> str:
        from PIL import Image

        device = next(self.model.parameters()).device
        picture = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        pixels = _normalised(picture, device)
        ids = self.tokenizer([CAPTION_PROMPT], return_tensors="pt").input_ids.to(device)
        out = self.model.generate(pixel_values=pixels, input_ids=ids, num_beams=num_beams, min_length=min_length,
                                  max_length=max_length, do_sample=False, repetition_penalty=1.0)
        text = self.tokenizer.decode(out[0], skip_special_tokens=True)
        return text[len(CAPTION_PROMPT):]  # the prompt's characters cut, as BLIP does


def _normalised(picture, device) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return ((array - mean) / std).unsqueeze(0).to(device)


def load_captioner(path: Path, device: str = "cpu") -> Captioner:
    """A BLIP captioner from an original-layout file or a transformers folder."""
    from transformers import BertTokenizer, BlipForConditionalGeneration

    if path.is_dir():
        try:
            model = BlipForConditionalGeneration.from_pretrained(path, local_files_only=True)
            tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a BLIP captioning folder ({exc.__class__.__name__}: {exc})") from None
        return Captioner(model.to(device).eval(), tokenizer, model.config.vision_config.image_size)
    from .header import load_torch_object, load_state_dict

    if path.suffix.lower() == ".safetensors":
        state = load_state_dict(path)
    else:
        obj = load_torch_object(path)
        state = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ModelError(f"{path}: holds a {type(state).__name__}, expected BLIP's state (a dict of tensors)")
        state = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "visual_encoder.pos_embed" not in state or "text_decoder.bert.embeddings.word_embeddings.weight" not in state:
        raise ModelError(f"{path}: not a BLIP captioner (no visual_encoder.pos_embed / text_decoder weights)")
    tokenizer = BertTokenizer(str(bert_vocab(path)))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    config = blip_config(state, tokenizer)
    model = BlipForConditionalGeneration(config)
    model.load_state_dict(blip_state_dict(state, model), strict=True)
    return Captioner(model.to(device).eval(), tokenizer, config.vision_config.image_size)


# --------------------------------------------------------------------------- CLIP rankings


@dataclass(frozen=True)
class Category:
    """One word list: its name (the file's, without ``.topN`` and ``.txt``), how many matches to take, its lines."""

    name: str
    top: int
    items: tuple[str, ...]


def categories(folder: Path | None, *, limit: int = DICT_LIMIT, skip: tuple[str, ...] = ()) -> list[Category]:
    """The word lists of ``folder`` in name order (none when it is None or missing)."""
    if folder is None or not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.txt")):
        match = _TOP.search(path.name)
        name = _TOP.sub(".", path.name).removesuffix(".txt")
        if name in skip:
            continue
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        items = tuple(line for line in lines if line)
        if limit > 0:
            items = items[:limit]
        if items:
            found.append(Category(name, int(match.group(1)) if match else 1, items))
    return found


@dataclass
class Ranker:
    """A CLIP model that ranks texts against a picture."""

    model: object
    tokenizer: object
    image_size: int

    @torch.inference_mode()
    def image_features(self, image) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        picture = image.convert("RGB")
        scale = size / min(picture.size)
        resized = picture.resize((max(size, round(picture.width * scale)), max(size, round(picture.height * scale))),
                                 Image.Resampling.BICUBIC)
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        pixels = _normalised(resized.crop((left, top, left + size, top + size)), self._device)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def rank(self, features: torch.Tensor, texts: tuple[str, ...], top: int) -> list[tuple[str, float]]:
        """The ``top`` best of ``texts`` with their scores (0-100), A1111's softmax over the list."""
        top = min(top, len(texts))
        text = self.text_features(list(texts))
        similarity = (100.0 * features.float() @ text.float().T).softmax(dim=-1).mean(dim=0)
        scores, order = similarity.cpu().topk(top)
        return [(texts[int(i)], float(s) * 100) for s, i in zip(scores, order)]

    @torch.inference_mode()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """The texts' CLIP features, L2-normalised (as ultralytics' YOLO-World classes are made)."""
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=77,
                             return_tensors="pt").input_ids.to(self._device)
        text = self.model.get_text_features(input_ids=ids)
        text = getattr(text, "pooler_output", text).float()
        return text / text.norm(dim=-1, keepdim=True)

    @property
    def _device(self):
        return next(self.model.parameters()).device


def load_ranker(path: Path, device: str = "cpu") -> Ranker:
    """A CLIP model from a transformers folder, or one ``.safetensors`` in its layout (config read from the shapes)."""
    from transformers import CLIPModel

    from .tokenizer import clip_tokenizer

    if path.is_dir():
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: not a CLIP model folder ({exc.__class__.__name__}: {exc})") from None
    else:
        from .header import load_state_dict

        state = load_state_dict(path)
        model = CLIPModel(clip_config(state, path))
        wanted = model.state_dict()
        state = {k: v for k, v in state.items() if k in wanted}
        missing = sorted(set(wanted) - set(state))
        if missing:
            raise ModelError(f"{path}: lacks {len(missing)} of CLIP's tensors, e.g. {missing[0]}")
        model.load_state_dict(state, strict=True)
    return Ranker(model.to(device).eval(), clip_tokenizer(), model.config.vision_config.image_size)


def clip_config(state: dict[str, torch.Tensor], path: Path):
    """A ``CLIPConfig`` for transformers-layout CLIP tensors (heads of 64 channels, quick GELU, as OpenAI's)."""
    from transformers import CLIPConfig

    try:
        cls = state["vision_model.embeddings.class_embedding"]
        patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
        words = state["text_model.embeddings.token_embedding.weight"]
        projection = state["visual_projection.weight"].shape[0]
    except KeyError as exc:
        raise ModelError(f"{path}: not a CLIP model in transformers' layout (no {exc.args[0]})") from None

    def layers(prefix: str) -> int:
        return 1 + max(int(k.split(".")[3]) for k in state if k.startswith(prefix))

    width, text_width = cls.shape[0], words.shape[1]
    vision = dict(hidden_size=width, num_hidden_layers=layers("vision_model.encoder.layers."),
                  num_attention_heads=max(1, width // 64), patch_size=patch,
                  image_size=math.isqrt(positions - 1) * patch,
                  intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    text = dict(vocab_size=words.shape[0], hidden_size=text_width, num_hidden_layers=layers("text_model.encoder.layers."),
                num_attention_heads=max(1, text_width // 64),
                max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
                intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


# --------------------------------------------------------------------------- finding and keeping the models


@dataclass(frozen=True)
class InterrogateFiles:
    """The files "Interrogate CLIP" uses: the captioner (required), the CLIP model and the word lists."""

    blip: Path
    clip: Path | None
    lists: Path | None


#: The names CLIP ViT-B/32 (the text encoder ultralytics gives YOLO-World's classes) goes by in the models
#: folder's CLIP/: ``underpaint download clip-vit-b32``'s folder, or a file of that name. Interrogate CLIP
#: ranks with the other CLIP model there (A1111's is ViT-L/14).
WORLD_CLIP_NAMES = ("clip-vit-base-patch32", "clip-vit-b-32", "vit-b-32")


def is_world_clip(path: Path) -> bool:
    return path.name.lower().removesuffix(".safetensors") in WORLD_CLIP_NAMES


def _candidates(folders) -> list[Path]:
    found = []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.is_dir() and (path / "config.json").is_file():
                found.append(path)
            elif path.is_file() and path.suffix.lower() in _MODEL_SUFFIXES:
                found.append(path)
    return found


def interrogate_files(models) -> InterrogateFiles:
    """What ``models`` (a :class:`~underpaint.models.registry.ModelsDir`) holds for it; no captioner
    is :class:`ModelNotFound` naming ``model`` and where the file goes."""
    blips = _candidates(models.folders("blip"))
    if not blips:
        raise ModelNotFound(f"Interrogate CLIP needs a BLIP captioner in {models.folder('blip')} (A1111's "
                            "model_base_caption_capfilt_large.pth, or a transformers BLIP captioning folder)",
                            field="model")
    clips = [path for path in _candidates(models.folders("clip")) if not is_world_clip(path)]
    lists = models.folders("interrogate")
    return InterrogateFiles(blips[0], clips[0] if clips else None, lists[0] if lists else None)


_lock = threading.Lock()
_kept: dict[tuple, object] = {}


def _kept_model(kind: str, path: Path, load):
    """The model of ``path`` loaded once (in main memory) and kept, one of each kind."""
    key = (kind, str(path), path.stat().st_mtime_ns)
    if key not in _kept:
        for old in [k for k in _kept if k[0] == kind]:
            del _kept[old]
        _kept[key] = load(path, "cpu")
    return _kept[key]


def interrogate(image, files: InterrogateFiles, *, device: str = "cpu", ranks: bool = False,
                num_beams: int = NUM_BEAMS, min_length: int = MIN_LENGTH, max_length: int = MAX_LENGTH,
                dict_limit: int = DICT_LIMIT, skip: tuple[str, ...] = ()) -> str:
    """The picture's caption, then each word list's best matches (see the module's text). The
    models run on ``device`` and go back to main memory afterwards, as A1111 sends them back unless
    told to keep them, so they never hold a GPU's memory between requests."""
    with _lock:
        captioner = _kept_model("blip", files.blip, load_captioner)
        try:
            captioner.model.to(device)
            text = captioner.caption(image, num_beams=num_beams, min_length=min_length, max_length=max_length)
        finally:
            captioner.model.to("cpu")
        lists = categories(files.lists, limit=dict_limit, skip=skip)
        if not lists or files.clip is None:
            return text
        ranker = _kept_model("clip", files.clip, load_ranker)
        try:
            ranker.model.to(device)
            features = ranker.image_features(image)
            for category in lists:
                for match, score in ranker.rank(features, category.items, category.top):
                    text += f", ({match}:{score / 100:.3f})" if ranks else f", {match}"
        finally:
            ranker.model.to("cpu")
        return text
