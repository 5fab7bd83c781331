"""Extra networks for one request: LoRAs merged into the weights and restored, hypernetworks hooked
into the UNet's attention and unhooked, textual-inversion embeddings from the models folder, and
the ``Lora hashes`` / ``TI hashes`` A1111 records for them.

A1111 takes ``<lora:name:te:unet>`` tags (and their ``<lyco:...>`` alias) and
``<hypernet:name:strength>`` tags out of the positive prompt, applies the named networks for the
request, and finds embeddings by name in the prompt text. The per-model caches (module index,
networks read, embeddings read) live on the loaded model object, as its other caches do, so they
last as long as its engine.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidParameter
from ..models.hypernetwork import (Hypernetwork, HypernetworkRequest, attention_layers, hypernetworks_applied,
                                   input_width, load_hypernetwork, resolve_hypernetwork)
from ..models.lora import (LoraNetwork, LoraPatcher, LoraRequest, ModuleIndex, load_lora, lora_short_hash,
                           resolve_lora)
from ..models.optimize import weights_changed
from ..models.registry import FileCache, list_named_files
from ..params import GenerationParams
from ..prompts.embeddings import EMBEDDING_SUFFIXES, Embedding, read_changed
from ..prompts.parser import extract_extra_networks, prompt_schedule, split_and

#: The extra-network tag kind of a hypernetwork.
HYPERNET = "hypernet"


class ExtraNetworkWarning(UserWarning):
    """An extra-network tag or embedding file that is ignored."""


@dataclass
class NetworkState:
    """One loaded model's extra-network caches and the patcher holding its weight backups."""

    index: ModuleIndex | None = None
    #: LoRA and hypernetwork files read (LoraNetwork, Hypernetwork), each by path and the name it was asked by.
    loras: FileCache = field(default_factory=FileCache)
    patcher: LoraPatcher = field(default_factory=LoraPatcher)
    hypernetworks: FileCache = field(default_factory=FileCache)
    #: path → ((size, mtime), Embedding or None when the file could not be read)
    embeddings: dict[Path, tuple[tuple[int, int], Embedding | None]] = field(default_factory=dict)

    def module_index(self, model) -> ModuleIndex:
        if self.index is None:
            self.index = ModuleIndex(model)
        return self.index


def network_state(model) -> NetworkState:
    """The model's :class:`NetworkState`, created on first use."""
    state = getattr(model, "_networks", None)
    if state is None:
        state = NetworkState()
        try:
            model._networks = state
        except AttributeError:
            pass
    return state


def models_dir_of(model):
    """The engine's models folder (set on the model as ``models_dir``), else the default one."""
    from ..models.registry import ModelsDir, default_models_dir

    return getattr(model, "models_dir", None) or ModelsDir(default_models_dir())


# --------------------------------------------------------------------------- LoRA


def lora_requests(prompt: str) -> list[LoraRequest]:
    """The LoRAs the prompt's tags ask for, in order; kinds other than LoRAs and hypernetworks are
    ignored with a warning."""
    return network_requests(prompt)[0]


def network_requests(prompt: str) -> tuple[list[LoraRequest], list[HypernetworkRequest]]:
    """The LoRAs and the hypernetworks the prompt's tags ask for, each in prompt order; other tag
    kinds are ignored with a warning (as A1111 ignores kinds no extension handles)."""
    _, tags = extract_extra_networks(prompt)
    loras, hypernets, ignored = [], [], []
    for tag in tags:
        if tag.is_lora:
            loras.append(LoraRequest.from_args(tag.name, tag.positional, tag.named))
        elif tag.kind == HYPERNET:
            hypernets.append(HypernetworkRequest.from_args(tag.name, tag.positional))
        else:
            ignored.append(f"<{tag.kind}:{tag.name}>")
    if ignored:
        warnings.warn(f"extra networks not supported, ignored: {', '.join(ignored)}", ExtraNetworkWarning, stacklevel=3)
    return loras, hypernets


def load_requested(model, requests: Sequence[LoraRequest]) -> list[tuple[LoraNetwork, LoraRequest]]:
    """Resolve each request's file in the models folder and read it (cached per model)."""
    if not requests:
        return []
    state = network_state(model)
    folders = models_dir_of(model).folders("loras")
    index = state.module_index(model)
    return [(state.loras.get(resolve_lora(r.name, folders), lambda path: load_lora(path, index, name=r.name),
                             key=r.name), r) for r in requests]


def load_hypernetworks(model, requests: Sequence[HypernetworkRequest], others: Sequence = ()
                       ) -> list[tuple[Hypernetwork, float]]:
    """Each request's hypernetwork from the models folder (cached per model) with its strength.

    FLUX models have no UNet attention of the widths hypernetworks are made for: a tag is refused.
    A hypernetwork with no layer of the attention widths of the model or of ``others`` (the
    request's refiner or hires checkpoint, which run it too) changes nothing (as in A1111), with a
    warning.
    """
    if not requests:
        return []
    from .flux import is_flux

    if is_flux(model):
        raise InvalidParameter("prompt", requests[0].tag(), "no <hypernet:...> tags with a FLUX model "
                                                            "(hypernetworks are made for SD 1.x/2.x/SDXL UNets)")
    state = network_state(model)
    folders = models_dir_of(model).folders("hypernetworks")
    loaded = [(state.hypernetworks.get(resolve_hypernetwork(r.name, folders),
                                       lambda path: load_hypernetwork(path, name=r.name), key=r.name), r.strength)
              for r in requests]
    widths = {w for unet in [model.unet, *(other.unet for other in others)]
              for w in (input_width(layer.to_k) for layer in attention_layers(unet)) if w}
    for network, _ in loaded:
        if not widths & set(network.layers):
            models = "this model" if not others else "these models"
            warnings.warn(f"hypernetwork {network.name!r} changes nothing in {models}: it has layers for "
                          f"attention widths {list(network.widths)}, the model's are {sorted(widths)}",
                          ExtraNetworkWarning, stacklevel=3)
    return loaded


def lora_hashes(loaded: Sequence[tuple[LoraNetwork, LoraRequest]]) -> str | None:
    """A1111's ``Lora hashes`` value: ``name: hash`` per network as named in the prompt (``:`` and
    ``,`` removed from the name), each name once."""
    hashes: dict[str, str] = {}
    for network, request in loaded:
        short = lora_short_hash(network.path)
        if short:
            hashes[_infotext_name(request.name)] = short
    return ", ".join(f"{name}: {short}" for name, short in hashes.items()) or None


def _infotext_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


# --------------------------------------------------------------------------- embeddings


def available_embeddings(model) -> dict[str, Embedding]:
    """Every readable embedding in the models folder's ``embeddings/``, by file name.

    Files are read once and again only when they change; an unreadable one is skipped with a
    warning (A1111 reports and skips it too). Embeddings that do not fit the model's text
    encoders are left to :class:`~underpaint.prompts.encoder.PromptEncoder`, which skips them.
    """
    state = network_state(model)
    found: dict[str, Embedding] = {}
    seen: set[Path] = set()
    for entry in list_named_files(models_dir_of(model).folders("embeddings"), EMBEDDING_SUFFIXES):
        path = entry.path
        seen.add(path)
        embedding = _read_embedding(state, path)
        if embedding is not None:
            found.setdefault(embedding.name, embedding)
    for gone in set(state.embeddings) - seen:
        del state.embeddings[gone]
    return found


def embedding_paths(model) -> dict[str, Path]:
    """Name → file of the embeddings :func:`available_embeddings` returned (for their hashes)."""
    state = network_state(model)
    paths: dict[str, Path] = {}
    for path, (_, embedding) in state.embeddings.items():
        if embedding is not None:
            paths.setdefault(embedding.name, path)
    return paths


def _read_embedding(state: NetworkState, path: Path) -> Embedding | None:
    return read_changed(state.embeddings, path, on_error=lambda exc: warnings.warn(
        f"embedding skipped: {exc}", ExtraNetworkWarning, stacklevel=5))


def ti_hashes(encoder, paths: dict[str, Path], params: GenerationParams) -> str | None:
    """A1111's ``TI hashes``: ``name: sha256[:12]`` of each embedding the prompts use.

    A1111 adds the names of each encoding call in front of those already recorded, and it
    encodes the negative prompt first, then each ``AND`` part of the prompt; so the last part's
    embeddings come first and the negative prompt's last, a name repeated where two calls use it.
    """
    from ..models.hashes import file_sha256

    positive, _ = extract_extra_networks(params.prompt)
    calls = [params.negative_prompt] + [part for part, _ in split_and(positive)]
    entries: list[str] = []
    for text in calls:
        names: dict[str, None] = {}
        for _, scheduled in prompt_schedule(text, params.steps):
            for chunk in encoder.chunks(scheduled):
                names.update((slot.name, None) for slot in chunk.embeddings)
        entries[:0] = [f"{_infotext_name(n)}: {file_sha256(paths[n])[:12]}" for n in names if n in paths]
    return ", ".join(entries) or None


# --------------------------------------------------------------------------- one request


@dataclass(frozen=True)
class ActiveNetworks:
    """The extra networks of the request in progress and the infotext entries they add."""

    loras: tuple[LoraRequest, ...] = ()
    infotext: tuple[tuple[str, str], ...] = ()

    def with_infotext(self, params: GenerationParams) -> GenerationParams:
        """``params`` with ``Lora hashes`` / ``TI hashes`` added to its infotext entries."""
        if not self.infotext:
            return params
        return params.replace(extra_infotext=params.extra_infotext + self.infotext)


@contextmanager
def request_networks(model, params: GenerationParams, *, encoder=None, others: Sequence = ()
                     ) -> Iterator[ActiveNetworks]:
    """Merge the prompt's LoRAs into ``model`` and hook its hypernetworks into the attention of
    ``model`` and of ``others`` (the request's refiner or hires checkpoint, None where it has none)
    for the duration of the block.

    A1111 runs a hypernetwork in every attention layer of whichever model is sampling, so the
    second checkpoints run it too; LoRAs stay with the model (their module names are the model's).
    The original weights come back when the block ends, also on an error or an interrupt.
    ``encoder`` (a PromptEncoder with the model's embeddings) finds the embeddings in use for
    the ``TI hashes`` entry.
    """
    others = [other for other in others if other is not None and other is not model]
    lora_asks, hypernet_asks = network_requests(params.prompt) if params.extra_networks else ([], [])
    loaded = load_requested(model, lora_asks)
    hypernets = load_hypernetworks(model, hypernet_asks, others)
    entries = []
    if (value := lora_hashes(loaded)) is not None:
        entries.append(("Lora hashes", value))
    if encoder is not None and encoder.embeddings:
        if (value := ti_hashes(encoder, embedding_paths(model), params)) is not None:
            entries.append(("TI hashes", value))
    patcher = network_state(model).patcher
    try:
        patcher.apply(loaded)
        if patcher.active:
            weights_changed(model)
        with ExitStack() as hooks:
            for unet in [model.unet, *(other.unet for other in others)] if hypernets else ():
                hooks.enter_context(hypernetworks_applied(unet, hypernets))
            yield ActiveNetworks(tuple(r for _, r in loaded), tuple(entries))
    finally:
        merged = patcher.active
        patcher.restore()
        if merged:
            weights_changed(model)
