"""ControlNet units' hires-fix option (A1111's ``hr_option``): which pass of a hires. fix run a unit runs in.

The pictures are checked against references made without the option: a "Both" unit with the
ControlNet taken away from one pass (the pass's ``_run_batch`` gets no control), so that "Low res
only" must equal "the second pass without the unit" and "High res only" "the first pass without
the unit", and forward hooks on the ControlNets record which pass (by the map's size) called them.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_server_support import png_b64
from tiny_controlnet import ready_map, write_controlnet
from underpaint.errors import InvalidParameter
from underpaint.params import GenerationParams, HiresOptions
from underpaint.pipeline import generate as generate_mod
from underpaint.pipeline.control import (HR_BOTH, HR_HIGH_RES_ONLY, HR_LOW_RES_ONLY, ControlUnit, control_infotext,
                                         unit_infotext)

HIRES = HiresOptions(scale=1.5, steps=3, strength=0.6)  # 3 steps at 64x64, then 3 at 96x96


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two tiny SD1 ControlNets with different weights, so each unit's calls can be told apart."""
    folder = tmp_path_factory.mktemp("cn")
    return (write_controlnet(folder / "control_tiny_a_canny.safetensors", "sd1", seed=11),
            write_controlnet(folder / "control_tiny_b_canny.safetensors", "sd1", seed=12))


@pytest.fixture(scope="module")
def control_map():
    return ready_map()


def _unit(net, control_map, option=HR_BOTH, **fields):
    return ControlUnit(image=control_map, module="none", model=str(net), hr_option=option, **fields)


def _generate(engine, units, *, hires=HIRES):
    return engine.generate(GenerationParams(prompt="a castle", steps=3, sampler="Euler", seed=9, width=64, height=64,
                                            control_units=tuple(units), hires=hires))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)


class _Recorder:
    """Hooks on the engine's own ControlNets: for each net, the size of the hint of every call."""

    def __init__(self, engine, paths):
        from underpaint.models.controlnet import ControlNetCache
        from underpaint.pipeline.control import control_resources

        control_resources(engine.model)  # the annotator context, so that the engine keeps the cache set below
        self.engine, self.cache = engine, ControlNetCache()
        self.calls: dict[str, list[tuple[int, int]]] = {str(p): [] for p in paths}
        self.handles = []
        for path in paths:
            net = self.cache.get(path, device=engine.model.device, dtype=engine.model.dtype)
            record = self.calls[str(path)]
            hook = lambda mod, args, kwargs, out, record=record: record.append(  # noqa: E731
                tuple(kwargs["controlnet_cond"].shape[-2:]))
            self.handles.append(net.module.register_forward_hook(hook, with_kwargs=True))

    def __enter__(self):
        self.previous = getattr(self.engine.model, "_controlnets", None)
        self.engine.model._controlnets = self.cache
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.engine.model._controlnets = self.previous


@pytest.fixture
def drop_control(monkeypatch):
    """``drop_control("first")`` / ``("second")``: from then on, that pass of a hires. fix run samples
    without ControlNet, whatever the units say (the first pass is the call that keeps its latents)."""
    original = generate_mod._run_batch

    def drop(which: str) -> None:
        def run_batch(*args, **kwargs):
            first = kwargs.get("keep_latents", False)
            if (which == "first") == first:
                if len(args) > 7:
                    args = (*args[:7], None, *args[8:])
                else:
                    kwargs["control"] = None
            return original(*args, **kwargs)

        monkeypatch.setattr(generate_mod, "_run_batch", run_batch)

    return drop


# --- the option -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "kept"), [
    ("Both", HR_BOTH), ("Low res only", HR_LOW_RES_ONLY), ("High res only", HR_HIGH_RES_ONLY),
    ("low RES only", HR_LOW_RES_ONLY), (" high res only ", HR_HIGH_RES_ONLY),
    # the extension's enum as its Python clients send it (HiResFixOption.from_value reads these) and its indexes
    ("HiResFixOption.BOTH", HR_BOTH), ("HiResFixOption.LOW_RES_ONLY", HR_LOW_RES_ONLY),
    ("HiResFixOption.HIGH_RES_ONLY", HR_HIGH_RES_ONLY), (0, HR_BOTH), (1, HR_LOW_RES_ONLY), (2, HR_HIGH_RES_ONLY),
])
def test_option_spellings(sent, kept):
    assert ControlUnit(hr_option=sent).hr_option == kept


def test_default_and_passes():
    assert ControlUnit().hr_option == HR_BOTH
    passes = {o: (ControlUnit(hr_option=o).in_first_pass, ControlUnit(hr_option=o).in_second_pass)
              for o in (HR_BOTH, HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY)}
    assert passes == {HR_BOTH: (True, True), HR_LOW_RES_ONLY: (True, False), HR_HIGH_RES_ONLY: (False, True)}


@pytest.mark.parametrize("value", ["Low res", "high", "", "HiResFixOption.MEDIUM", 3, -1, True, 1.0, None])
def test_other_values_are_refused_naming_the_field(value):
    with pytest.raises(InvalidParameter) as exc:
        ControlUnit(hr_option=value)
    assert exc.value.field == "hr_option"
    assert "'Low res only'" in exc.value.expected and "'High res only'" in exc.value.expected


# --- the passes -------------------------------------------------------------------------------------------------


def test_low_res_only_is_the_run_whose_second_pass_has_no_unit(sd1_engine, nets, control_map, drop_control):
    with _Recorder(sd1_engine, nets[:1]) as rec:
        low = _generate(sd1_engine, [_unit(nets[0], control_map, HR_LOW_RES_ONLY)])
    both = _generate(sd1_engine, [_unit(nets[0], control_map)])
    plain = _generate(sd1_engine, [])
    drop_control("second")
    reference = _generate(sd1_engine, [_unit(nets[0], control_map)])
    assert low.images[0].size == (96, 96)
    assert low.images[0].tobytes() == reference.images[0].tobytes()
    # 3 first-pass steps (one batched call each), all at the first pass's size; none in the second pass
    assert rec.calls[str(nets[0])] == [(64, 64)] * 3
    # the unit did something in the first pass, and the second pass would have added to it
    assert np.abs(_pixels(low) - _pixels(plain)).max() > 2
    assert np.abs(_pixels(low) - _pixels(both)).max() > 0


def test_high_res_only_is_the_run_whose_first_pass_has_no_unit(sd1_engine, nets, control_map, drop_control):
    with _Recorder(sd1_engine, nets[:1]) as rec:
        high = _generate(sd1_engine, [_unit(nets[0], control_map, HR_HIGH_RES_ONLY)])
    both = _generate(sd1_engine, [_unit(nets[0], control_map)])
    plain = _generate(sd1_engine, [])
    drop_control("first")
    reference = _generate(sd1_engine, [_unit(nets[0], control_map)])
    # every unit is "High res only": the first pass runs without ControlNet, the request still runs
    assert high.images[0].size == (96, 96)
    assert high.images[0].tobytes() == reference.images[0].tobytes()
    # the second pass runs its 3 hires steps (A1111 stretches the schedule for the strength), at its own size
    assert rec.calls[str(nets[0])] == [(96, 96)] * 3
    assert np.abs(_pixels(high) - _pixels(plain)).max() > 0
    assert np.abs(_pixels(high) - _pixels(both)).max() > 2


def test_units_with_different_options_each_run_in_their_passes(sd1_engine, nets, control_map):
    units = [_unit(nets[0], control_map, HR_LOW_RES_ONLY), _unit(nets[1], control_map, HR_HIGH_RES_ONLY)]
    with _Recorder(sd1_engine, nets) as rec:
        _generate(sd1_engine, units)
    assert rec.calls == {str(nets[0]): [(64, 64)] * 3, str(nets[1]): [(96, 96)] * 3}
    with _Recorder(sd1_engine, nets) as rec:
        _generate(sd1_engine, [_unit(nets[0], control_map), _unit(nets[1], control_map, HR_LOW_RES_ONLY)])
    assert rec.calls == {str(nets[0]): [(64, 64)] * 3 + [(96, 96)] * 3, str(nets[1]): [(64, 64)] * 3}


def test_without_hires_fix_every_unit_runs_whatever_its_option(sd1_engine, nets, control_map):
    pictures = {}
    for option in (HR_BOTH, HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY):
        with _Recorder(sd1_engine, nets[:1]) as rec:
            pictures[option] = _generate(sd1_engine, [_unit(nets[0], control_map, option)], hires=None)
        assert rec.calls[str(nets[0])] == [(64, 64)] * 3, option
    plain = _generate(sd1_engine, [], hires=None)
    assert np.abs(_pixels(pictures[HR_BOTH]) - _pixels(plain)).max() > 2
    for option in (HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY):
        assert pictures[option].images[0].tobytes() == pictures[HR_BOTH].images[0].tobytes(), option


# --- infotext ---------------------------------------------------------------------------------------------------


def test_infotext_writes_the_option_after_the_control_mode_as_the_extension():
    text = unit_infotext(ControlUnit(module="none", weight=0.5, hr_option="low res only"), "c [3]")
    assert text == ("Module: none, Model: c [3], Weight: 0.5, Resize Mode: Crop and Resize, Guidance Start: 0.0, "
                    "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Low res only")
    assert unit_infotext(ControlUnit(module="none"), "c [3]").endswith("Control Mode: Balanced, Hr Option: Both")


def _unit_fields(entry: str) -> dict[str, str]:
    """A unit's infotext entry (``Key: value, Key: value``) as a dict, as the extension reads it back."""
    return dict(pair.split(": ", 1) for pair in entry.split(", "))


@pytest.mark.parametrize("option", [HR_BOTH, HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY])
def test_infotext_round_trip(sd1_engine, nets, control_map, option):
    """The generated picture's infotext, read back by the infotext reader, gives the unit's option again."""
    from underpaint.imageio.infotext import parse_infotext

    result = _generate(sd1_engine, [_unit(nets[0], control_map), _unit(nets[0], control_map, option)])
    params = parse_infotext(result.infotexts[0]).params
    restored = [ControlUnit(hr_option=_unit_fields(params[f"ControlNet {i}"])["Hr Option"]).hr_option for i in (0, 1)]
    assert restored == [HR_BOTH, option]
    (_, entry), = control_infotext([ControlUnit(hr_option=option)], ["m"])
    assert _unit_fields(entry)["Hr Option"] == option


# --- the API and the command line -------------------------------------------------------------------------------



def _request(client, units):
    return client.post("/sdapi/v1/txt2img", json={"steps": 2, "width": 64, "height": 64, "enable_hr": True,
                                                  "alwayson_scripts": {"controlnet": {"args": units}}})


def test_api_takes_the_three_options(api, control_map):
    client, backend = api
    image = png_b64(control_map)
    units = [{"module": "none", "image": image, "hr_option": sent}
             for sent in ("Both", "Low res only", "High res only", "HiResFixOption.LOW_RES_ONLY", None)]
    units.append({"module": "none", "image": image})  # the extension's default
    r = _request(client, units)
    assert r.status_code == 200, r.text
    kept = [u.hr_option for u in backend.params[-1].control_units]
    assert kept == [HR_BOTH, HR_LOW_RES_ONLY, HR_HIGH_RES_ONLY, HR_LOW_RES_ONLY, HR_BOTH, HR_BOTH]


@pytest.mark.parametrize("value", ["Hires only", 5, ""])
def test_api_refuses_another_option_naming_the_field(api, control_map, value):
    client, backend = api
    r = _request(client, [{"module": "none", "image": png_b64(control_map)},
                          {"module": "none", "image": png_b64(control_map), "hr_option": value}])
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "alwayson_scripts.controlnet.args[1].hr_option", body
    assert "Low res only" in body["detail"]
    assert backend.params == []


def test_cli_flag_sets_the_unit_before_it(capsys):
    import argparse

    from underpaint.cli.control import add_control_arguments, control_units_from_args

    parser = argparse.ArgumentParser(prog="t")
    add_control_arguments(parser)
    args = parser.parse_args(["--control", "canny", "--control-hr-option", "low res only",
                              "--control", "depth", "--control", "none", "--control-hr-option", "High res only"])
    units = control_units_from_args(args)
    assert [u.hr_option for u in units] == [HR_LOW_RES_ONLY, HR_BOTH, HR_HIGH_RES_ONLY]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--control", "canny", "--control-hr-option", "first"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--control-hr-option: got 'first'" in err and "'Low res only'" in err, err
