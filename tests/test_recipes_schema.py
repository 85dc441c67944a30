"""The structured-config schema of the recipes (trp.recipes.schema): every packaged config
composes, the YAML files agree with their dataclasses, bad configs fail naming the key."""

from __future__ import annotations

import dataclasses
import re
from importlib.resources import files
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trp.recipes import ConfigError, compose
from trp.recipes import schema as S

CONFIGS = Path(str(files("trp.configs")))


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A directory that looks like a save_pretrained output (what the schema checks)."""
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _required(group: str, option: str, tmp_path: Path) -> list[str]:
    """The overrides an option needs to be valid (its required keys)."""
    if (group, option) == ("model", "hf_vlm"):
        (tmp_path / "config.json").write_text("{}")
        return [f"model.pretrained_dir={tmp_path}"]
    if option in ("refcoco", "refcoco_vrt"):
        return [f"data.root={tmp_path}"]
    if option == "coco":
        return [f"data.annotation_file={tmp_path}/a.json", f"data.image_dir={tmp_path}"]
    return []


def _schema_dict(cls: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cls), resolve=False)


@pytest.mark.parametrize("group", ["model", "data", "trainer", "recipe"])
def test_every_packaged_option_composes_and_validates(group: str, tmp_path: Path) -> None:
    options = _options(group)
    assert options, f"no {group} configs found in {CONFIGS}"
    for option in options:
        cfg = compose([f"{group}={option}", *_required(group, option, tmp_path)])
        assert cfg[group] is not None
        S.validate(cfg)  # compose validated already; a second pass is a no-op
    assert {"tiny_vlm", "tiny_vlm_deformable", "hf_vlm"} <= set(_options("model"))
    assert {"cpu", "ddp_cpu", "gpu", "fsdp", "deepspeed"} <= set(_options("trainer"))


def test_root_configs_compose_with_their_schemas() -> None:
    train = compose()
    assert OmegaConf.get_type(train) is S.TrainConfig
    assert OmegaConf.get_type(train.model) is S.TinyVLMConfig
    assert OmegaConf.get_type(train.data) is S.ShapesDataConfig
    assert OmegaConf.get_type(train.trainer) is S.TrainerConfig
    assert OmegaConf.get_type(train.recipe) is S.RecipeConfig
    evaluate = compose(config_name="evaluate")
    assert OmegaConf.get_type(evaluate) is S.EvaluateConfig
    assert evaluate.checkpoint is None and evaluate.run_name.startswith("eval-")


@pytest.mark.parametrize(
    ("path", "cls"),
    [
        ("model/tiny_vlm.yaml", S.TinyVLMConfig),
        ("model/tiny_vlm_deformable.yaml", S.TinyVLMDeformableConfig),
        ("model/hf_vlm.yaml", S.HFVLMConfig),
        ("data/shapes.yaml", S.ShapesDataConfig),
        ("data/refcoco.yaml", S.RefCOCODataConfig),
        ("data/coco.yaml", S.CocoDataConfig),
        ("trainer/cpu.yaml", S.TrainerConfig),
        ("trainer/deepspeed.yaml", S.DeepSpeedTrainerConfig),
    ],
)
def test_yaml_files_state_exactly_their_schema(path: str, cls: type) -> None:
    """Users read the YAML files: each lists every key of its dataclass with its default
    (deepspeed's GPU settings excepted), so the two cannot drift apart."""
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / path), resolve=False)
    defaults = raw.pop("defaults")
    assert defaults[-1] == "_self_" and any(d.endswith("_schema") for d in defaults)
    want = _schema_dict(cls)
    if cls is S.DeepSpeedTrainerConfig:
        want.update(accelerator="gpu", precision="bf16-mixed", strategy=raw["strategy"])
    assert raw == want


def test_train_yaml_sections_are_the_schema_defaults() -> None:
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "train.yaml"), resolve=False)
    want = _schema_dict(S.TrainConfig)
    for key in ("model", "data", "trainer", "recipe"):
        want.pop(key)
    raw.pop("defaults")
    raw.pop("hydra")
    assert raw == want


def test_default_recipe_numbers_are_unchanged() -> None:
    """The values the measured default recipe ran with (docs/recipes.md, final make demo)."""
    cfg = compose()
    assert cfg.loss.box_region_target == "mask"
    assert (cfg.loss.patch_class, cfg.loss.patch_class_foreground) == (4.0, 4.0)
    optim = (cfg.optim.lr, cfg.optim.min_lr_ratio, list(cfg.optim.betas))
    assert optim == (1e-3, 0.05, [0.9, 0.98])
    m = cfg.model
    assert (m.contextual_vrt, m.detach_queries, m.vrt_query_shift, m.prototype_zero_init) == (
        True,
        True,
        0,
        False,
    )
    assert (m.fine_channels, m.vision.conv_stem, m.heads.box.extent_scale) == (32, True, 4)
    assert cfg.recipe.prompt_first is True
    assert compose(["recipe=shapes_trp"]).recipe.prompt_first is False
    assert compose(["recipe=shapes_trp"]).optim.lr == 5e-4


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["+model.pretrained_dir=/x"], r"model\.pretrained_dir: unknown key .*model=hf_vlm"),
        (["+data.task=keypoints"], r"data\.task: unknown key"),
        (["+optim.momentum=0.9"], r"optim\.momentum: unknown key"),
        (["+seeds=1"], r"seeds: unknown key"),
        (["+model.heads.box.d_modle=3"], r"model\.heads\.box\.d_modle: BoxHead .* takes no"),
        (["+model.heads.box.in_dim=3"], r"model\.heads\.box\.in_dim is derived"),
        (["+model.heads.keypoints.impl=light"], r"model\.heads\.keypoints: no head for unit"),
        (["model.heads.box.d_model=abc"], r"model\.heads\.box\.d_model must be of type int"),
        (["model.heads.box.region=2"], r"model\.heads\.box\.region must be of type bool"),
        (["model.heads.box.impl=spline"], r"model\.heads\.box\.impl must be one of"),
        (["model.vision.embed_dim=99"], r"model\.vision\.embed_dim=99 .* model\.vision\.num_"),
        (["model.language.num_kv_heads=3"], r"model\.language\.num_heads=4 must be a multiple"),
        (["model.language.image_attention=full"], r"model\.language\.image_attention must be"),
        (["model.language.pretrained_dir=/x"], r"model\.language\.pretrained_dir: .*hf_vlm"),
        (["model.vision.weights=/no/such.safetensors"], r"model\.vision\.weights=.*no such file"),
        (["model.tokenizer.dir=/no/such/dir"], r"model\.tokenizer\.dir=.*no such directory"),
        (["model.vision.conv_stem=false", "model.vision.stem_downsample=2"], r"stem_downsample"),
        (["model.fine_channels=0"], r"model\.vision\.conv_stem needs a stem"),
        (["model.route=every"], r"model\.route must be one of"),
        (["optim.betas=[0.9]"], r"optim\.betas must be two numbers"),
        (["optim.min_lr_ratio=2"], r"optim\.min_lr_ratio must lie in"),
        (["loss.patch_class=-1"], r"loss\.patch_class must be a number >= 0"),
        (["eval.mask_threshold=1.5"], r"eval\.mask_threshold must lie in"),
        (["data.seed=1"], r"data\.seed and data\.eval_seed must differ"),
        (["data.kind_weights=[1,0]"], r"data\.kind_weights must be 3 weights"),
        (["data.min_shapes=6"], r"data\.min_shapes=6"),
        (["data.name=coco"], r"data\.name must be 'shapes'"),
        (["data=coco"], r"data\.annotation_file"),
        (["data=refcoco", "data.root=/r", "data.eval_split=train"], r"data\.eval_split must be"),
        (["trainer.strategy=sharded"], r"trainer\.strategy must be one of"),
        (["trainer.accelerator=tpu7"], r"trainer\.accelerator must be one of"),
        (["trainer.process_group_backend=tcp"], r"trainer\.process_group_backend must be"),
        (["trainer.devices=0"], r"trainer\.devices must be a positive int"),
        (["trainer.gradient_clip_val=0"], r"trainer\.gradient_clip_val must be a positive"),
        (["trainer=deepspeed", "trainer.zero_stage=4"], r"trainer\.zero_stage must be one of"),
        (
            ["trainer=deepspeed", "trainer.zero_stage=3", "trainer.strategy=deepspeed_stage_2"],
            r"trainer\.strategy='deepspeed_stage_2' disagrees with trainer\.zero_stage=3",
        ),
        (["recipe.num_vrt=0"], r"recipe\.num_vrt must be a positive int"),
        (["threads=0"], r"threads must be a positive int"),
        (["model=hf_vlm"], r"model\.pretrained_dir is required"),
        (["model=hf_vlm", "model.pretrained_dir=/no/such/vlm"], r"model\.pretrained_dir=.*no such"),
        (["model=hf_vlm", "model.pretrained_dir=."], r"model\.pretrained_dir=\. has no config"),
    ],
)
def test_bad_configs_fail_at_compose_naming_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.vision.depth=four", "model.vision.depth"),  # wrong type
        ("optim.lr=fast", "optim.lr"),
        ("trainer.enable_progress_bar=maybe", "trainer.enable_progress_bar"),
        ("data.kind_weights=[a,b,c]", "data.kind_weights"),
        ("model.lr=1", "model.lr"),  # unknown key without +: Hydra refuses it
    ],
)
def test_hydra_rejects_wrong_types_and_unknown_keys_naming_them(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose([override])
    chain = f"{err.value} {err.value.__cause__}"
    assert key in chain or key.split(".")[-1] in chain


def test_hf_vlm_schema(hf_dir: Path) -> None:
    cfg = compose(["model=hf_vlm", f"model.pretrained_dir={hf_dir}"])
    m = cfg.model
    assert OmegaConf.get_type(m) is S.HFVLMConfig
    assert m.prototype_zero_init is True and m.torch_dtype == "float32"
    assert list(m.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert dict(m.freeze) == {"vision": True, "projector": False, "language": False}
    assert "vision" not in m and "language" not in m  # the tiny VLM's keys are not there
    on = compose(
        [
            "model=hf_vlm",
            f"model.pretrained_dir={hf_dir}",
            "model.lora.enabled=true",
            "model.lora.target_modules=[q_proj,v_proj]",
            "model.torch_dtype=bfloat16",
            "model.gradient_checkpointing=true",
        ]
    ).model
    assert on.lora.enabled and list(on.lora.target_modules) == ["q_proj", "v_proj"]
    bad = {
        "model.torch_dtype=float16": r"model\.torch_dtype must be one of",
        "model.lora.r=0": r"model\.lora\.r must be a positive int",
        "model.lora.dropout=1.0": r"model\.lora\.dropout must lie in",
        "+model.freeze.heads=true": r"model\.freeze\.heads: unknown key",
        "+model.vision.depth=2": r"model\.vision: unknown key",
    }
    for override, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            compose(["model=hf_vlm", f"model.pretrained_dir={hf_dir}", override])
    with pytest.raises(ConfigError, match=r"model\.lora\.enabled with model\.freeze\.language"):
        compose(
            [
                "model=hf_vlm",
                f"model.pretrained_dir={hf_dir}",
                "model.lora.enabled=true",
                "model.freeze.language=true",
            ]
        )


def test_distributed_trainer_configs_use_lightning_strategy_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    fsdp = compose(["trainer=fsdp", "trainer.devices=8"]).trainer
    assert (fsdp.strategy, fsdp.accelerator, fsdp.devices, fsdp.precision) == (
        "fsdp",
        "gpu",
        8,
        "bf16-mixed",
    )
    for stage in (1, 2, 3):
        ds = compose(["trainer=deepspeed", f"trainer.zero_stage={stage}"]).trainer
        assert ds.strategy == f"deepspeed_stage_{stage}"
        assert ds.strategy in StrategyRegistry.available_strategies()
    offload = compose(["trainer=deepspeed", "trainer.strategy=deepspeed_stage_2_offload"])
    assert offload.trainer.strategy in StrategyRegistry.available_strategies()
    assert compose(["trainer=ddp_cpu"]).trainer.process_group_backend == "gloo"


def test_a_new_model_option_registers_its_own_schema() -> None:
    @dataclasses.dataclass
    class ToyModel(S.TinyVLMConfig):
        width_multiplier: int = 2

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.width_multiplier < 1:
                raise S._Invalid("{at}width_multiplier must be >= 1")

    S.register("model", "toy_test_schema", ToyModel)
    try:
        cfg = compose(["model=toy_test_schema"])
        assert OmegaConf.get_type(cfg.model) is ToyModel and cfg.model.width_multiplier == 2
        with pytest.raises(ConfigError, match=r"model\.width_multiplier must be >= 1"):
            compose(["model=toy_test_schema", "model.width_multiplier=0"])
        with pytest.raises(TypeError, match="dataclass"):
            S.register("model", "not_a_schema", dict)
    finally:
        S._SCHEMAS.pop(("model", "toy_test_schema"))
        ConfigStore.instance().repo["model"].pop("toy_test_schema.yaml")


def test_validate_rejects_plus_keys_on_a_composed_config_and_checks_types() -> None:
    cfg = compose()
    OmegaConf.update(cfg, "loss.keypoint", 1.0, force_add=True)  # what `+loss.keypoint=1` does
    with pytest.raises(ConfigError, match=r"loss\.keypoint: unknown key"):
        S.validate(cfg)
    with pytest.raises(TypeError, match="DictConfig"):
        S.validate({"model": {}})  # type: ignore[arg-type]


def test_messages_name_full_keys_with_the_node_path() -> None:
    """A check is written once per dataclass; its message carries the node's full path."""
    with pytest.raises(ConfigError) as err:
        compose(["model.image_size=100"])
    assert re.search(r"model\.image_size=100 must be divisible by model\.patch_size=16", str(err))


def test_complete_fills_python_callers_mappings_from_the_schema() -> None:
    """``ReferringModule`` / builders take partial mappings: the rest comes from the schema
    (the YAML's values), never from defaults of their own; unknown keys and bad values fail."""
    loss = S.complete(S.LossConfig, {"token": 2.0}, "loss")
    assert loss["token"] == 2.0
    assert loss["box_region_target"] == "mask" and loss["patch_class"] == 4.0
    optim = S.complete(S.OptimConfig, {"lr": 1e-2}, "optim")
    assert optim["betas"] == [0.9, 0.98] and optim["min_lr_ratio"] == 0.05
    heads = {"box": {"impl": "light", "d_model": 32}}
    model = S.complete(S.TinyVLMConfig, {"heads": heads, "vision": {"depth": 1}}, "model")
    assert model["heads"] == heads  # a caller's heads replace the default heads
    assert model["vision"]["depth"] == 1 and model["vision"]["embed_dim"] == 128
    with pytest.raises(ConfigError, match=r"loss\.tokn: unknown key"):
        S.complete(S.LossConfig, {"tokn": 1.0}, "loss")
    with pytest.raises(ConfigError, match=r"loss\.mask_points must be a positive int"):
        S.complete(S.LossConfig, {"mask_points": 0}, "loss")
    with pytest.raises(ConfigError, match=r"loss\.mask_points: Value 'many'"):
        S.complete(S.LossConfig, {"mask_points": "many"}, "loss")
    with pytest.raises(ConfigError, match=r"model\.vision\.dept: unknown key; model\.vision"):
        S.complete(S.TinyVLMConfig, {"vision": {"dept": 1}}, "model")
    with pytest.raises(ConfigError, match="must be a mapping"):
        S.complete(S.LossConfig, [1, 2], "loss")
