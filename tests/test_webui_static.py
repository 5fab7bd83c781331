"""The UI's static files, checked without a browser: everything they reference exists, nothing is fetched
from outside the server, and every module import names something the imported module exports."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from underpaint.webui import static_dir

STATIC = static_dir()
SCRIPTS = sorted(STATIC.glob("*.js"))
INDEX = STATIC / "index.html"

IMPORT = re.compile(r"""^\s*import\s*\{([^}]*)\}\s*from\s*["'](\.[^"']+)["']""", re.MULTILINE)
EXPORT = re.compile(r"^export\s+(?:async\s+)?(?:function\*?|class|const|let)\s+([A-Za-z_$][\w$]*)", re.MULTILINE)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.references: list[str] = []
        self.inputs: list[dict] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "input":
            self.inputs.append(attrs)
        for name in ("src", "href"):
            if attrs.get(name) and tag in ("script", "link", "img"):
                self.references.append(attrs[name])


def parsed_index() -> _Collector:
    collector = _Collector()
    collector.feed(INDEX.read_text(encoding="utf-8"))
    return collector


def test_static_dir_holds_the_page_and_its_modules():
    assert STATIC.is_dir() and INDEX.is_file()
    assert {"app.js", "api.js", "maskcanvas.js", "style.css"} <= {p.name for p in STATIC.iterdir()}


def test_page_references_only_local_files():
    for ref in parsed_index().references:
        if ref.startswith("data:"):
            continue
        assert not re.match(r"^(?:[a-z]+:)?//", ref), f"index.html loads {ref} from elsewhere"
        assert (STATIC / ref).is_file(), f"index.html references missing {ref}"


@pytest.mark.parametrize("path", [*SCRIPTS, STATIC / "style.css", INDEX], ids=lambda p: p.name)
def test_nothing_is_fetched_from_another_origin(path):
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", text, re.IGNORECASE), \
        f"{path.name} mentions an external URL; the UI must work offline"
    assert "@import" not in text and "fonts.googleapis" not in text


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_every_import_is_exported_by_its_module(path):
    for names, target in IMPORT.findall(path.read_text(encoding="utf-8")):
        module = (path.parent / target).resolve()
        assert module.is_file(), f"{path.name} imports missing {target}"
        exported = set(EXPORT.findall(module.read_text(encoding="utf-8")))
        for name in (n.strip().split(" as ")[0] for n in names.split(",") if n.strip()):
            assert name in exported, f"{path.name} imports {name} from {target}, which does not export it"


def test_ids_used_by_scripts_exist_in_the_page():
    ids = parsed_index().ids
    used = set()
    for path in SCRIPTS:
        text = path.read_text(encoding="utf-8")
        used |= set(re.findall(r"""\$\(\s*["']#([\w-]+)["']""", text))
        used |= set(re.findall(r"""getElementById\(\s*["']([\w-]+)["']""", text))
    missing = sorted(used - ids)
    assert not missing, f"scripts look up ids that index.html does not have: {missing}"


def test_controls_start_at_a1111s_defaults():
    """The page opens at A1111's defaults, which the package's own parameters hold (and the CLI uses):
    20 steps, denoising strength 0.75, CFG 7, ... Each slider's number box starts at its slider's value."""
    from underpaint.params import (
        MASKED_CONTENT, GenerationParams, HiresOptions, InpaintOptions, SDUpscaleOptions, XYZPlotOptions,
    )

    params, hires, inpaint, sd_upscale = GenerationParams(), HiresOptions(), InpaintOptions(), SDUpscaleOptions()
    xyz = XYZPlotOptions()
    expected = {
        "steps": params.steps, "cfg_scale": params.cfg_scale, "denoising_strength": params.strength,
        "seed": params.seed, "n_iter": params.n_iter, "batch_size": params.batch_size,
        "mask_blur": inpaint.mask_blur_x, "inpaint_full_res_padding": inpaint.full_res_padding,
        "hr_scale": hires.scale, "hr_second_pass_steps": hires.steps, "hr_denoising_strength": hires.strength,
        "hr_resize_x": hires.resize_x, "hr_resize_y": hires.resize_y, "width": 512, "height": 512,
        "sd_upscale_overlap": sd_upscale.overlap, "sd_upscale_scale": sd_upscale.scale,
        "xyz_margin_size": xyz.margin_size,
    }
    inputs = parsed_index().inputs
    by_id = {i["id"]: i for i in inputs if i.get("id")}
    boxes = {i["data-sync"]: i for i in inputs if i.get("data-sync")}
    for name, value in expected.items():
        assert float(by_id[name]["value"]) == value, f"{name} starts at {by_id[name]['value']}, A1111's default is {value}"
        if name in boxes:
            assert float(boxes[name]["value"]) == value, f"{name}'s number box starts at {boxes[name]['value']}"
    for name in ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds"):
        assert ("checked" in by_id[f"xyz_{name}"]) == getattr(xyz, name), f"X/Y/Z plot's {name} starts wrong"
    checked = {i["name"]: i["value"] for i in inputs if i.get("type") == "radio" and "checked" in i}
    assert checked["inpainting_fill"] == str(MASKED_CONTENT.index(inpaint.masked_content))
    assert checked["resize_mode"] == str(params.resize_mode)
