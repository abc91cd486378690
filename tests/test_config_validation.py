"""A config is typed and validated when it is loaded: a typo or an impossible value stops with one line naming the
key (a UserError), before any work starts; ``parse_overrides`` turns ``--set KEY=VALUE`` items into overrides
that are validated like a file."""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml

from medlsdm import config
from medlsdm.config import (
    SAMPLERS,
    DataConfig,
    LDMConfig,
    SegConfig,
    TrainConfig,
    VQGANConfig,
    config_from_dict,
    load_config,
    parse_overrides,
)
from medlsdm.errors import UserError

SECTIONS = {"data": DataConfig, "vqgan": VQGANConfig, "ldm": LDMConfig, "train_vqgan": TrainConfig,
            "train_ldm": TrainConfig, "seg": SegConfig}


def load_error(overrides: dict) -> str:
    """The message of the UserError that loading the tiny preset with ``overrides`` raises (one line)."""
    with pytest.raises(UserError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config")
    return message


def nested(key: str, value) -> dict:
    """``"ldm.sampler", "ddim"`` -> ``{"ldm": {"sampler": "ddim"}}``."""
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


# ---------------------------------------------------------------------------------------------- presets still load
def test_presets_and_the_micro_config_load(micro_config):
    tiny, paper, micro = load_config("tiny"), load_config("paper"), load_config(micro_config)
    assert (tiny.ldm.sampler, tiny.ldm.objective, tiny.data.shape) == ("dpm++", "v", (16, 64, 64))
    assert (paper.ldm.objective, paper.data.shape, paper.vqgan.n_codes) == ("eps", (32, 256, 256), 16384)
    assert (micro.ldm.num_timesteps, micro.ldm.sampling_steps, micro.train_ldm.val_every) == (50, 4, 2)
    for cfg in (tiny, paper, micro):  # strict scalar types survive a save / load round trip
        assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------- enumerated strings are choices
EXPECTED_CHOICES = {
    "data.modality", "data.resize_mode", "vqgan.codebook_update", "vqgan.upsample", "vqgan.perceptual_backbone",
    "vqgan.gan_loss", "vqgan.feature_match_reduction", "ldm.method", "ldm.depth_positions", "ldm.schedule",
    "ldm.objective", "ldm.loss", "ldm.latent_norm", "ldm.sampler", "ldm.sample_precision", "train_vqgan.precision",
    "train_ldm.precision", "seg.input_window", "seg.crop_balance", "seg.lr_schedule",
}


def literal_fields() -> dict[str, tuple[str, ...]]:
    out = {}
    for section, cls in SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                out[f"{section}.{name}"] = typing.get_args(tp)
    return out


def test_every_enumerated_setting_is_a_checked_choice():
    assert set(literal_fields()) == EXPECTED_CHOICES


@pytest.mark.parametrize("key", sorted(EXPECTED_CHOICES))
def test_a_wrong_choice_names_the_key_the_choices_and_the_nearest(key):
    choices = literal_fields()[key]
    message = load_error(nested(key, choices[-1].upper() + "x"))  # a near miss of the last choice
    assert key in message and ", ".join(choices) in message
    assert f"(did you mean '{choices[-1]}'?)" in message


@pytest.mark.parametrize("key, value, nearest", [
    ("ldm.sampler", "dpm", "dpm++"),
    ("ldm.sampler", "DDIM", "ddim"),
    ("data.modality", "CT", "ct"),
    ("ldm.schedule", "cosin", "cosine"),
    ("ldm.method", "slice3d", "slice2d"),
    ("vqgan.perceptual_backbone", "vgg", "vgg16"),
    ("ldm.latent_norm", "standardise", "standardize"),
])
def test_typo_suggestion(key, value, nearest):
    message = load_error(nested(key, value))
    assert key in message and repr(value) in message and f"(did you mean '{nearest}'?)" in message


def test_the_sampler_message_and_constant():
    assert SAMPLERS == ("ddpm", "ddim", "dpm++")
    assert load_error({"ldm": {"sampler": "dpm"}}) == (
        "config: unknown ldm.sampler 'dpm': must be one of ddpm, ddim, dpm++ (did you mean 'dpm++'?)")


def test_a_dataclass_built_in_code_is_checked_too():
    with pytest.raises(UserError, match=r"ldm\.sampler 'dpm'.*did you mean 'dpm\+\+'"):
        LDMConfig(sampler="dpm")
    with pytest.raises(UserError, match=r"'ldm\.window_overlap' must be in \[0, 1\)"):
        dataclasses.replace(load_config("tiny").ldm, window_overlap=1.0)  # as SynthesisPipeline.configure does


def test_the_choices_are_those_the_code_accepts():
    """Each Literal matches the module that consumes the setting, so no supported value is refused."""
    import torch
    from monai.networks.schedulers import NoiseSchedules

    from medlsdm.autoencoder.normalize import KINDS
    from medlsdm.autoencoder.quantizer import VectorQuantizer
    from medlsdm.data.phantom import MODALITIES
    from medlsdm.diffusion import samplers
    from medlsdm.diffusion.blocks import DEPTH_POSITIONS
    from medlsdm.diffusion.model import LOSSES
    from medlsdm.diffusion.schedule import OBJECTIVES
    from medlsdm.training.engine import use_bf16

    got = literal_fields()
    assert set(got["ldm.schedule"]) == set(NoiseSchedules.names)
    assert set(got["ldm.objective"]) == set(OBJECTIVES)
    assert set(got["ldm.loss"]) == set(LOSSES)
    assert set(got["ldm.latent_norm"]) == set(KINDS)
    assert set(got["ldm.depth_positions"]) == set(DEPTH_POSITIONS)
    assert set(got["ldm.sampler"]) == set(samplers.SAMPLERS) == set(SAMPLERS)
    assert set(got["data.modality"]) == set(MODALITIES)
    for update in got["vqgan.codebook_update"]:
        VectorQuantizer(4, 2, update=update)
    for precision in got["train_ldm.precision"]:
        use_bf16(precision, torch.device("cpu"))
    assert got["vqgan.upsample"] == config.VQGAN_UPSAMPLE and got["ldm.method"] == config.LDM_METHODS
    assert got["vqgan.feature_match_reduction"] == config.FEATURE_MATCH_REDUCTIONS


# ------------------------------------------------------------------------------------------- strict scalar types
@pytest.mark.parametrize("key, value, rule", [
    ("vqgan.decoder_tanh", "false", "true or false"),  # was bool("false") = True
    ("ldm.clip_sample", 0, "true or false"),
    ("train_ldm.batch_size", 2.9, "an integer"),  # was int(2.9) = 2
    ("train_ldm.max_steps", True, "an integer"),  # a bool is not an int
    ("train_ldm.log_every", "10", "an integer"),
    ("train_ldm.lr", "fast", "a number"),  # was kept as the string 'fast'
    ("train_ldm.lr", True, "a number"),
    ("ldm.guidance_scale", [2.5], "a number"),
    ("ldm.guidance_scale", "2.5", "a number"),  # a quoted number is a string (only 1e-4-style floats are read)
    ("data.orientation", 5, "a string"),  # was str(5)
    ("name", 3, "a string"),
    ("train_ldm.keep_best", 1, "a string"),
    ("data.label_remap", [1, 2], "a mapping"),  # was an AttributeError
    ("data.label_names", "background", "a list"),  # was split into letters
])
def test_scalars_are_strict(key, value, rule):
    message = load_error(nested(key, value))
    assert f"'{key}' must be {rule}" in message and f"got {value!r}" in message


@pytest.mark.parametrize("key, value, item, rule", [
    ("data.label_names", ["background", 1, 2, 3, 4, 5], "[1]", "a string, got 1"),
    ("data.shape", [16, 64.5, 64], "[1]", "an integer, got 64.5"),  # was int(64.5) = 64
    ("vqgan.downsample", [4, 4, "4"], "[2]", "an integer, got '4'"),
    ("ldm.channel_mult", [1, True], "[1]", "an integer, got True"),
    ("data.label_remap", {0: 0, 255: "1"}, "[255]", "an integer, got '1'"),
    ("data.label_remap", {0: 0, "x": 1}, " key 'x'", "an integer, got 'x'"),
])
def test_list_and_mapping_items_are_strict_and_named(key, value, item, rule):
    assert f"'{key}{item}' must be {rule}" in load_error(nested(key, value))


def test_yaml_1_2_floats_are_numbers():
    """PyYAML reads 1e-4 (no dot) as a string; a float setting takes it as the number it is."""
    cfg = load_config("tiny", {"train_ldm": {"lr": "1e-4"}, "ldm": {"guidance_scale": "25E-1"}})
    assert cfg.train_ldm.lr == 1e-4 and isinstance(cfg.train_ldm.lr, float) and cfg.ldm.guidance_scale == 2.5


# ---------------------------------------------------------------------------------------------------- ranges
RANGES = [
    # data
    ("data.shape", [0, 64, 64]), ("data.spacing", [0.0, 2.0, 2.0]), ("data.spacing", [3.0, -2.0, 2.0]),
    ("data.num_classes", 1), ("data.num_classes", 0), ("data.num_workers", -1),
    ("data.ct_window", [-1000.0, float("inf")]), ("data.ct_display_window", [float("-inf"), 240.0]),
    ("data.orientation", "RRS"), ("data.orientation", "RASL"), ("data.label_names", ["background", "body"]),
    ("data.label_remap", {0: 0, 255: 6}),
    # vqgan
    ("vqgan.channels", 0), ("vqgan.downsample", [0, 4, 4]), ("vqgan.downsample", [3, 4, 4]),
    ("vqgan.embedding_dim", 0), ("vqgan.n_codes", 0), ("vqgan.num_res_blocks", -1), ("vqgan.commitment_beta", -0.1),
    ("vqgan.ema_decay", 1.0), ("vqgan.ema_decay", -0.1), ("vqgan.dead_code_threshold", -1.0),
    ("vqgan.quantize_chunk", 0), ("vqgan.l1_weight", -1.0), ("vqgan.perceptual_weight", -1.0),
    ("vqgan.perceptual_slices", -1), ("vqgan.disc_channels", 0), ("vqgan.disc_layers", -1),
    ("vqgan.disc_start_step", -1), ("vqgan.image_gan_weight", -1.0), ("vqgan.volume_gan_weight", -1.0),
    ("vqgan.feature_match_weight", -1.0), ("vqgan.adaptive_weight_max", -1.0),
    # ldm
    ("ldm.slices_per_volume", -1), ("ldm.model_channels", 0), ("ldm.channel_mult", []),
    ("ldm.channel_mult", [1, 0]), ("ldm.num_res_blocks", -1), ("ldm.attention_levels", [2]),
    ("ldm.attention_levels", [-1]), ("ldm.num_heads", 0), ("ldm.num_heads", 3), ("ldm.semantic_channels", 0),
    ("ldm.dropout", 1.5), ("ldm.dropout", -0.1), ("ldm.num_timesteps", 1), ("ldm.num_timesteps", 0),
    ("ldm.class_weight_power", -1.0), ("ldm.cond_drop_prob", 1.1), ("ldm.guidance_scale", -1.0),
    ("ldm.guidance_scale", float("nan")), ("ldm.ema_decay", 1.0), ("ldm.sampling_steps", 0),
    ("ldm.sampling_steps", 1001), ("ldm.window_overlap", 1.0), ("ldm.window_overlap", -0.5),
    ("ldm.window_batch", 0),
    # train (both stages)
    ("train_ldm.lr", 0.0), ("train_ldm.lr", -3e-4), ("train_ldm.lr", float("inf")), ("train_vqgan.lr", float("nan")),
    ("train_ldm.betas", [0.9, 1.0]), ("train_ldm.betas", [-0.1, 0.999]), ("train_ldm.batch_size", 0),
    ("train_ldm.grad_accum", 0), ("train_ldm.max_steps", 0), ("train_ldm.log_every", 0),
    ("train_ldm.val_every", 0), ("train_ldm.ckpt_every", 0), ("train_vqgan.val_every", 0),
    ("train_vqgan.ckpt_every", 0), ("train_vqgan.log_every", -5), ("train_ldm.grad_clip", -1.0),
    ("train_ldm.val_fraction", 1.0), ("train_ldm.val_fraction", -0.1), ("train_ldm.preview_steps", -1),
    # seg
    ("seg.channels", [8]), ("seg.channels", [8, 0, 32]), ("seg.num_res_units", -1), ("seg.patch", [16, 0, 32]),
    ("seg.batch_size", 0), ("seg.lr", 0.0), ("seg.epochs", -1), ("seg.steps", -1),
    ("seg.pos_fraction", 1.5), ("seg.sw_batch_size", 0), ("seg.sw_overlap", 1.0),
    # top level
    ("seed", -1),
]


@pytest.mark.parametrize("key, value", RANGES)
def test_impossible_values_stop_at_load(key, value):
    message = load_error(nested(key, value))
    assert key in message


def test_zero_epochs_need_a_fixed_number_of_steps():
    assert "'seg.epochs' must be >= 1 when seg.steps is 0" in load_error({"seg": {"epochs": 0, "steps": 0}})


def test_the_section_of_a_training_stage_is_named():
    assert "'train_ldm.val_every' must be >= 1, got 0" in load_error({"train_ldm": {"val_every": 0}})
    assert "'train_vqgan.val_every' must be >= 1, got 0" in load_error({"train_vqgan": {"val_every": 0}})


def test_bounds_keep_what_the_code_supports():
    """Edge values the code handles (0 = off / all, the ends of closed ranges) still load."""
    cfg = load_config("tiny", {
        "vqgan": {"perceptual_slices": 0, "num_res_blocks": 0, "disc_layers": 0, "dead_code_threshold": 0.0,
                  "ema_decay": 0.0, "downsample": [1, 2, 4]},
        "ldm": {"slices_per_volume": 0, "dropout": 1.0, "cond_drop_prob": 1.0, "window_overlap": 0.0,
                "guidance_scale": 0.0, "num_timesteps": 2, "sampling_steps": 2, "attention_levels": []},
        "train_ldm": {"grad_clip": 0.0, "val_fraction": 0.0, "preview_steps": 0},
        "seg": {"epochs": 0, "steps": 5, "pos_fraction": 0.0},
        "data": {"orientation": "PIL"},
    })
    assert cfg.ldm.sampling_steps == 2 and cfg.seg.epochs == 0
    # DDPM always runs all T steps: sampling_steps above T only matters for ddim / dpm++
    assert load_config("tiny", {"ldm": {"sampler": "ddpm", "num_timesteps": 10}}).ldm.sampling_steps == 25


def test_label_names_follow_num_classes():
    assert load_config("tiny", {"data": {"num_classes": 3}}).data.label_names == ["class_0", "class_1", "class_2"]
    named = load_config("tiny", {"data": {"num_classes": 3, "label_names": ["bg", "breast", "tumour"]}})
    assert named.data.label_names == ["bg", "breast", "tumour"]
    assert "data.label_names" in load_error({"data": {"num_classes": 3, "label_names": ["bg", "breast"]}})


# ---------------------------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("overrides, expected", [
    ({"ldm": {"samplr": "ddim"}}, "config: unknown key 'samplr' in 'ldm' (did you mean 'sampler'?)"),
    ({"train_ldm": {"max_step": 5}}, "config: unknown key 'max_step' in 'train_ldm' (did you mean 'max_steps'?)"),
    ({"ldn": {}}, "config: unknown key 'ldn' at the top level (did you mean 'ldm'?)"),
    ({"data": {"zzz": 1}}, "config: unknown key 'zzz' in 'data'"),
    ({"base": "tny"}, "config: unknown base 'tny': must be one of tiny, paper (did you mean 'tiny'?)"),
])
def test_an_unknown_key_names_the_nearest_valid_one(overrides, expected):
    assert load_error(overrides) == expected


# --------------------------------------------------------------------------------------------- parse_overrides
def test_parse_overrides_builds_the_nested_dict():
    items = ["ldm.sampler=ddim", "train_ldm.lr=1e-4", "data.shape=[16,64,64]", "data.spacing=null",
             "data.label_remap={0: 0, 255: 1}", "ldm.guidance_scale = 2.0", "seed=3", "ldm.sampler=dpm++"]
    assert parse_overrides(items) == {
        "ldm": {"sampler": "dpm++", "guidance_scale": 2.0},  # the later item for a key wins
        "train_ldm": {"lr": "1e-4"},
        "data": {"shape": [16, 64, 64], "spacing": None, "label_remap": {0: 0, 255: 1}},
        "seed": 3,
    }


def test_parse_overrides_round_trip():
    """Every setting of a config written as KEY=VALUE and parsed back rebuilds the same config."""
    cfg = load_config("tiny", parse_overrides(["ldm.sampler=ddim", "train_ldm.lr=1e-4", "data.shape=[16,64,64]"]))
    assert (cfg.ldm.sampler, cfg.train_ldm.lr, cfg.data.shape) == ("ddim", 1e-4, (16, 64, 64))

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "label_remap":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}={json.dumps(v)}"  # JSON is YAML

    paper = load_config("paper")
    assert config_from_dict(parse_overrides(list(leaves(paper.to_dict())))) == paper


@pytest.mark.parametrize("item", ["ldm.sampler", "=ddim", "ldm..sampler=ddim", "ldm.=ddim", ".sampler=ddim",
                                  "ldm.sampler=[1, 2"])
def test_a_malformed_override_is_one_line_naming_it(item):
    with pytest.raises(UserError) as info:
        parse_overrides([item])
    assert repr(item) in str(info.value) and "\n" not in str(info.value)


def test_overrides_are_validated_like_a_file():
    assert "(did you mean 'dpm++'?)" in load_error(parse_overrides(["ldm.sampler=dpm"]))
    assert "'train_ldm.val_every' must be >= 1" in load_error(parse_overrides(["train_ldm.val_every=0"]))
    assert "'vqgan.decoder_tanh' must be true or false" in load_error(parse_overrides(["vqgan.decoder_tanh='no'"]))
    assert "unknown key 'samplr' in 'ldm'" in load_error(parse_overrides(["ldm.samplr=ddim"]))
