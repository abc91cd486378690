"""The sampling API: one sampler registry and one default, sampler objects and SamplingOptions, models complete
when built (clip range, typed U-Net arguments, unchanged weights layout) and the import layers."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_diffusion_sampling import LATENT, labels, tiny_model

import medlsdm
from medlsdm import config
from medlsdm.autoencoder.normalize import LatentNormalizer
from medlsdm.config import LDMConfig, load_config
from medlsdm.diffusion import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    LatentDiffusion,
    NoiseSchedule,
    Sampler,
    SamplingOptions,
    SemanticUNet,
    make_sampler,
)
from medlsdm.errors import UserError
from medlsdm.pipeline import SynthesisPipeline, build_diffusion

PACKAGE = Path(medlsdm.__file__).parent
SMALL = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
             semantic_channels=4, num_timesteps=20, sampling_steps=4)


def randomised(model: LatentDiffusion) -> LatentDiffusion:
    """Non-zero output convolutions, so the network's output (and hence guidance) matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


# ---- one registry --------------------------------------------------------------------------------
def test_registry_names_equal_the_configs_sampler_names():
    names = getattr(config, "SAMPLERS", None)
    if names is None:
        pytest.skip("medlsdm.config.SAMPLERS does not exist (yet)")
    assert tuple(SAMPLERS) == tuple(names)


def test_registry_maps_each_name_to_its_sampler_class():
    assert SAMPLERS == {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm++": DPMSolverPPSampler}
    sched = NoiseSchedule(30)
    for name, cls in SAMPLERS.items():
        assert issubclass(cls, Sampler) and cls.name == name
        sampler = make_sampler(name, sched, steps=7)
        assert type(sampler) is cls
        assert len(sampler.timesteps()) == (30 if name == "ddpm" else 7)
    with pytest.raises(UserError, match="unknown sampler 'euler'"):
        make_sampler("euler", sched)
    with pytest.raises(UserError, match="unknown sampler"):
        SamplingOptions("euler")


# ---- one default ---------------------------------------------------------------------------------
def test_there_is_exactly_one_default_sampler_and_step_count():
    cfg = LDMConfig()
    assert (DEFAULT_SAMPLER, DEFAULT_STEPS) == (cfg.sampler, cfg.sampling_steps)
    assert SamplingOptions().sampler == DEFAULT_SAMPLER and SamplingOptions().steps is None
    sched = NoiseSchedule(1000)
    assert DDIMSampler(sched).steps == DPMSolverPPSampler(sched).steps == DEFAULT_STEPS
    assert make_sampler("ddim", sched).steps == make_sampler("dpm++", sched).steps == DEFAULT_STEPS
    assert DDIMSampler(NoiseSchedule(10)).steps == 10  # at most T
    assert inspect.signature(LatentDiffusion.make_sampler).parameters["sampler"].default == DEFAULT_SAMPLER
    # every other sampler / steps parameter defers (None) to these
    for fn in (make_sampler, LatentDiffusion.make_sampler, Sampler.create, DDIMSampler.create,
               DPMSolverPPSampler.create, DDIMSampler.__init__, DPMSolverPPSampler.__init__,
               SynthesisPipeline.generate, SynthesisPipeline.sampling_options):
        params = inspect.signature(fn).parameters
        assert params["steps"].default is None, fn
        if "sampler" in params:
            assert params["sampler"].default in (None, DEFAULT_SAMPLER, inspect.Parameter.empty), fn
    # and the literals live in the config only: no other default of a sampler or step-count parameter or field
    ldm = next(n for n in ast.parse((PACKAGE / "config.py").read_text()).body
               if isinstance(n, ast.ClassDef) and n.name == "LDMConfig")
    assert [name for name, _ in _literal_defaults(ldm)] == ["sampler", "sampling_steps"]
    others = [(str(p.relative_to(PACKAGE)), *d) for p in sorted(PACKAGE.rglob("*.py")) if p.name != "config.py"
              for d in _literal_defaults(ast.parse(p.read_text()))]
    assert others == []


def _literal_defaults(tree: ast.AST) -> list[tuple[str, object]]:
    """(name, value) of every function parameter or class field in ``tree`` named like a sampler choice
    (``*sampler*``, ``steps``, ``sampling_steps``) whose default is a literal."""
    def wanted(name: str) -> bool:
        return "sampler" in name or name in ("steps", "sampling_steps")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args
            pairs = list(zip(args[len(args) - len(node.args.defaults):], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            found += [(a.arg, d.value) for a, d in pairs
                      if wanted(a.arg) and isinstance(d, ast.Constant) and d.value is not None]
        elif isinstance(node, ast.ClassDef):
            found += [(f.target.id, f.value.value) for f in node.body
                      if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name) and wanted(f.target.id)
                      and isinstance(f.value, ast.Constant) and f.value.value is not None]
    return found


def test_pipeline_defaults_are_the_configs():
    cfg = load_config("tiny", {"ldm": {**SMALL, "method": "pixel3d", "sampler": "ddim", "sampling_steps": 3,
                                       "guidance_scale": 1.5}, "data": {"shape": [4, 8, 8]}})
    pipe = SynthesisPipeline(None, build_diffusion(cfg), None, cfg)
    opts = pipe.sampling_options()
    assert (opts.sampler, opts.steps, opts.guidance_scale) == ("ddim", 3, 1.5)
    assert (opts.cache, opts.precision, opts.compile) == (cfg.ldm.spade_cache, cfg.ldm.sample_precision,
                                                          cfg.ldm.sample_compile)
    assert (opts.window, opts.overlap) == (pipe.window, pipe.overlap)
    assert pipe.sampling_options("dpm++").steps == 3  # a named sampler takes the config's steps
    assert pipe.sampling_options(DDIMSampler(pipe.diffusion.schedule, 5)).steps is None  # an object brings its own


# ---- sampler objects -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,steps", [("ddim", 4), ("dpm++", 5), ("ddpm", None)])
def test_a_sampler_object_gives_the_same_latents_as_its_name(name, steps):
    model = randomised(tiny_model(num_timesteps=10))
    lab = labels()

    def run(*options, **fields):
        return model.sample(lab, *options, guidance_scale=1.5, generator=torch.Generator().manual_seed(3),
                            progress=False, **fields)

    by_name = run(name, steps)
    kwargs = {} if name == "ddpm" else {"steps": steps}
    explicit = SAMPLERS[name](model.schedule, **kwargs, objective=model.objective, clip=model.clip_value)
    assert torch.equal(run(explicit), by_name)
    assert torch.equal(run(sampler=model.make_sampler(name, steps)), by_name)
    assert torch.equal(run(SamplingOptions(name, steps)), by_name)
    assert by_name.shape == (2, 8, *LATENT)


def test_pipeline_takes_a_sampler_object_like_a_name():
    """diffusers-style: ``pipe(label, sampler=DDIMSampler(schedule, steps=3))`` ==
    ``pipe(label, sampler="ddim", steps=3)``."""
    torch.manual_seed(0)
    cfg = load_config("tiny", {"ldm": {**SMALL, "method": "pixel3d", "objective": "eps", "guidance_scale": 1.5},
                               "data": {"shape": [4, 8, 8]}})
    pipe = SynthesisPipeline(None, randomised(build_diffusion(cfg)).eval(), None, cfg)
    label = torch.randint(0, cfg.data.num_classes, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    by_name = pipe(label, n=2, seed=5, sampler="ddim", steps=3)
    by_object = pipe(label, n=2, seed=5, sampler=DDIMSampler(pipe.diffusion.schedule, steps=3))
    assert all(torch.equal(a.array, b.array) for a, b in zip(by_name, by_object))
    assert not torch.equal(by_name[0].array, by_name[1].array)
    dpm = pipe(label, seed=5, sampler=DPMSolverPPSampler(pipe.diffusion.schedule, steps=3))[0]
    assert torch.equal(dpm.array, pipe(label, seed=5, sampler="dpm++", steps=3)[0].array)
    with pytest.raises(UserError, match="set by the sampler object"):
        pipe(label, sampler=DDIMSampler(pipe.diffusion.schedule, steps=3), steps=4)


def test_a_sampler_object_of_another_model_is_refused():
    model = tiny_model(num_timesteps=10)  # eps, clip 1.0
    lab = labels()
    for wrong in (DDIMSampler(NoiseSchedule(10), 3, objective="v"), DDIMSampler(NoiseSchedule(10), 3, clip=None),
                  DDIMSampler(NoiseSchedule(12), 3), DDIMSampler(NoiseSchedule(10, "linear_beta"), 3)):
        with pytest.raises(UserError, match="sampler DDIMSampler"):
            model.sample(lab, wrong, progress=False)
    assert model.make_sampler(DDIMSampler(NoiseSchedule(10), 3)).steps == 3  # an equal schedule is fine


# ---- SamplingOptions -----------------------------------------------------------------------------
def test_sampling_options_group_and_check_the_settings():
    opts = SamplingOptions("ddim", 4, 1.5, 0.5, window=2)
    assert SamplingOptions.of("ddim", 4, 1.5, 0.5, window=2) == opts
    assert SamplingOptions.of(opts) is opts
    assert SamplingOptions.of(opts, steps=6) == dataclasses.replace(opts, steps=6)
    assert SamplingOptions.of() == SamplingOptions()
    assert opts.sampler_name == "ddim" and SamplingOptions(DDPMSampler(NoiseSchedule(5))).sampler_name == "ddpm"
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.steps = 3
    with pytest.raises(UserError, match="precision"):
        SamplingOptions(precision="fp16")
    with pytest.raises(UserError, match="window_batch"):
        SamplingOptions(window_batch=0)
    with pytest.raises(UserError, match="set by the sampler object"):
        SamplingOptions(DDIMSampler(NoiseSchedule(10), 3), eta=0.5)
    with pytest.raises(TypeError):
        SamplingOptions(3)
    ldm = LDMConfig(sampler="ddim", sampling_steps=7, guidance_scale=2.0, window_batch=2, spade_cache=False,
                    sample_precision="bf16", sample_compile=True)
    assert SamplingOptions.from_config(ldm, window=3) == SamplingOptions("ddim", 7, 2.0, window=3, window_batch=2,
                                                                         cache=False, precision="bf16", compile=True)


# ---- models complete when built ------------------------------------------------------------------
def test_clip_value_is_a_constructor_argument_kept_by_views():
    model = LatentDiffusion.from_config(LDMConfig(**SMALL), num_classes=3, image_down=(2, 2, 2), clip_value=2.5)
    assert model.clip_value == 2.5
    assert model.view(model.unet).clip_value == 2.5 and model.make_sampler("ddim", 3).clip == 2.5
    assert LatentDiffusion.from_config(LDMConfig(**SMALL, clip_sample=False), 3, (2, 2, 2)).make_sampler().clip is None
    with pytest.raises(ValueError, match="clip_value"):
        LatentDiffusion(model.unet, model.schedule, clip_value=0.0)


def test_build_diffusion_clips_at_the_normalizers_range_and_the_pipeline_never_changes_it():
    cfg = load_config("tiny", {"ldm": SMALL})
    norm = LatentNormalizer(-2.0, 3.0, "standardize", mean=[0.5] * 8, std=[0.5] * 8)
    diffusion = build_diffusion(cfg, norm)
    assert diffusion.clip_value == norm.clip == pytest.approx(5.0)
    assert build_diffusion(cfg).clip_value == 1.0
    pipe = SynthesisPipeline(torch.nn.Identity(), diffusion, norm, cfg)
    assert pipe.diffusion is diffusion and diffusion.clip_value == norm.clip
    with pytest.raises(ValueError, match="build_diffusion"):
        SynthesisPipeline(torch.nn.Identity(), build_diffusion(cfg), norm, cfg)
    with pytest.raises(UserError, match="clip"):  # a default-clip sampler object would cut these latents
        diffusion.make_sampler(DDIMSampler(diffusion.schedule, 3, objective=diffusion.objective))


# Measured with the constructors before SemanticUNet took typed arguments (commit 6b1942b, SemanticUNet(cfg, ...)):
# parameter count, state-dict entries, sha256 of "key:shape" lines, and the sum of all entries after
# torch.manual_seed(0). Existing weights load only if these stay the same.
BEFORE = {
    "lsdm": (2735176, 203, "0ac7a35205d1e0c9d2463bb24552d89e915a31241360c6ccfd9b3fa4c162e71f", 697.4426718271992),
    "slice2d": (1895937, 144, "8e574343882766fdd45c13eb7df28d3524fa0ad7c916ef8fdf0bc2478149a80e", 1574.0834549735914),
    "pixel3d": (1895937, 144, "8e574343882766fdd45c13eb7df28d3524fa0ad7c916ef8fdf0bc2478149a80e", 1574.0834549735914),
}


@pytest.mark.parametrize("method", list(BEFORE))
def test_tiny_models_keep_their_parameter_count_and_state_dict_keys(method):
    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, ldm=dataclasses.replace(cfg.ldm, method=method))
    torch.manual_seed(0)
    model = build_diffusion(cfg)
    state = model.state_dict()
    count, entries, keys, total = BEFORE[method]
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(state) == entries
    assert hashlib.sha256("\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest() == keys
    assert float(sum(v.double().sum() for v in state.values())) == pytest.approx(total, rel=1e-9)


def test_semantic_unet_takes_typed_arguments_and_from_config_maps_the_config_onto_them():
    ldm = load_config("tiny").ldm
    torch.manual_seed(0)
    typed = SemanticUNet(in_channels=8, num_classes=6, image_down=(4, 4, 4), model_channels=ldm.model_channels,
                         channel_mult=ldm.channel_mult, num_res_blocks=ldm.num_res_blocks,
                         attention_levels=ldm.attention_levels, num_heads=ldm.num_heads,
                         semantic_channels=ldm.semantic_channels)
    torch.manual_seed(0)
    mapped = SemanticUNet.from_config(ldm, in_channels=8, num_classes=6, image_down=(4, 4, 4))
    a, b = typed.state_dict(), mapped.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert "cfg" not in inspect.signature(SemanticUNet).parameters


# ---- import layers -------------------------------------------------------------------------------
def test_resolve_device_lives_in_a_leaf_module():
    from medlsdm.devices import resolve_device
    from medlsdm.training import distributed

    assert distributed.resolve_device is resolve_device
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    tree = ast.parse((PACKAGE / "devices.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("medlsdm")} == {"medlsdm.errors"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return out | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_diffusion_pipeline_and_evaluation_never_import_training():
    files = [*(PACKAGE / "diffusion").rglob("*.py"), PACKAGE / "pipeline.py", *(PACKAGE / "evaluation").rglob("*.py")]
    bad = {str(p.relative_to(PACKAGE)): m for p in files for m in _imports(p) if m.startswith("medlsdm.training")}
    assert bad == {}
    code = ("import sys, medlsdm.pipeline, medlsdm.evaluation.evaluate, medlsdm.evaluation.studies; "
            "print(sorted(m for m in sys.modules if m.startswith('medlsdm.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
