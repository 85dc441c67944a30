"""The unified recipe's pieces: per-task overlays (keypoints, depth maps, prompts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trp.data import UnifiedShapesDataset
from trp.recipes.overlays import (
    DEPTH_COLORMAP,
    GT_COLOR,
    PRED_COLOR,
    PROMPT_COLOR,
    depth_to_rgb,
    draw_overlay,
    draw_task_overlay,
)


def test_depth_colour_map_uses_one_range_and_the_map_ends() -> None:
    d = torch.tensor([[2.0, 5.0], [8.0, float("nan")]])
    rgb = depth_to_rgb(d)
    assert tuple(rgb[0, 0]) == DEPTH_COLORMAP[0] and tuple(rgb[1, 0]) == DEPTH_COLORMAP[-1]
    assert tuple(rgb[1, 1]) == (0, 0, 0)
    fixed = depth_to_rgb(d, vmin=0.0, vmax=16.0)
    assert tuple(fixed[0, 0]) != DEPTH_COLORMAP[0]  # 2 of [0, 16] is not the near end
    with pytest.raises(ValueError, match="H, W"):
        depth_to_rgb(torch.zeros(1, 2, 2))


def test_depth_overlay_puts_prediction_and_ground_truth_beside_the_image() -> None:
    image = torch.full((3, 8, 10), 0.5)
    gt = torch.full((8, 10), 10.0)
    gt[2:5, 2:5] = 2.0
    pred = gt.clone()
    pred[2:5, 2:5] = 10.0  # misses the near shape
    img = np.asarray(draw_overlay(image, depth=pred, target_depth=gt, scale=1))
    assert img.shape == (8, 30, 3)
    assert tuple(img[3, 23]) == DEPTH_COLORMAP[0]  # ground truth: near
    assert tuple(img[3, 13]) == DEPTH_COLORMAP[-1]  # prediction: far (one shared range)
    assert tuple(img[0, 0]) == (128, 128, 128)


def test_keypoints_drawn_and_task_overlays_for_every_task() -> None:
    ds = UnifiedShapesDataset(num_samples=80, seed=5, empty_image_prob=0.0, negative_prob=0.0)
    by_task: dict[str, dict] = {}
    for i in range(80):
        s = ds[i]
        by_task.setdefault(s["task"], s)
    s = by_task["keypoints"]
    pred = s["keypoints"].clone()
    pred[..., :2] += 3.0
    img = np.asarray(draw_task_overlay(s, {"text": s["answer"], "keypoints": pred}, scale=3))
    vis = s["keypoints"][s["keypoints"][..., 2] == 2]
    x, y = (int(v * 3) for v in vis[0, :2].tolist())
    assert tuple(img[y, x]) == GT_COLOR
    x, y = (int(v * 3) for v in (vis[0, :2] + 3).tolist())
    assert tuple(img[y, x]) == PRED_COLOR
    for task, sample in by_task.items():
        out = draw_task_overlay(sample, None)
        width = 128 * 3 * (2 if task == "depth" else 1)  # no prediction: the GT map only
        assert out.width == width and out.height > 128 * 3, task
    rc = by_task["region_caption"]
    img = np.asarray(draw_task_overlay(rc, {"text": rc["reference"]}, scale=1)).astype(int)
    ys, xs = np.nonzero(rc["prompt_mask"].numpy())
    expected = (rc["image"][:, ys[0], xs[0]] * 255).round().numpy() * 0.5 + np.array(
        PROMPT_COLOR
    ) * 0.5
    assert np.abs(img[ys[0], xs[0]] - expected).max() <= 1
    with pytest.raises(KeyError, match="task"):
        draw_task_overlay({"image": rc["image"]}, None)
    with pytest.raises(ValueError, match="boxes"):
        draw_overlay(rc["image"], box=torch.zeros(2, 3))


# --------------------------------------------------------------------------- the recipe
def _tiny_model_cfg() -> dict:
    from omegaconf import OmegaConf

    import trp.recipes.unified  # noqa: F401  (registers the data schema)
    from trp.recipes import compose

    cfg = compose(["recipe=shapes_unified", "model.image_size=64"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    model["language"].update(
        num_layers=1, hidden_size=64, intermediate_size=128, num_heads=2, num_kv_heads=2
    )
    model["vision"].update(embed_dim=64, depth=1, num_heads=2)
    for head in model["heads"].values():
        head.update({k: v for k, v in {"d_model": 32, "dim_feedforward": 64}.items() if k in head})
    return model


@pytest.fixture(scope="module")
def tiny() -> dict:
    from trp.models.build import build_model, build_tokenizer
    from trp.recipes.unified import UnifiedCollator, UnifiedModule, unified_corpus

    torch.manual_seed(0)
    ds = UnifiedShapesDataset(
        num_samples=48,
        seed=0,
        image_size=64,
        targets={"rec": "vrt", "det": "vrt", "grounded_caption": "vrt"},
    )
    cfg = _tiny_model_cfg()
    tok = build_tokenizer(cfg["tokenizer"], list(unified_corpus(ds, num_samples=48)))
    model = build_model(cfg, tokenizer=tok)
    loss = {
        "token": 1.0,
        "box_l1": 5.0,
        "box_giou": 2.0,
        "box_score": 1.0,
        "mask_ce": 5.0,
        "mask_dice": 5.0,
        "mask_points": 128,
    }
    module = UnifiedModule(
        model=model,
        optim={"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1},
        loss=loss,
        eval={"max_new_tokens": 16, "constrained": True, "mask_threshold": 0.5},
        num_prompt_tokens=2,
    )
    col = UnifiedCollator(tokenizer=tok, grid=(4, 4), image_size=(64, 64), num_prompt_tokens=2)
    return {"ds": ds, "module": module, "col": col, "tok": tok}


def _grads(module) -> dict[str, bool]:
    return {
        unit: all(p.grad is not None for p in head.parameters())
        and any(float(p.grad.abs().sum()) > 0 for p in head.parameters())
        for unit, head in module.model.heads.items()
    }


def test_mixed_batch_trains_every_head_with_targets_and_skips_the_others(tiny) -> None:
    ds, module, col = tiny["ds"], tiny["module"], tiny["col"]
    by_task: dict[str, list[int]] = {}
    for i in range(len(ds)):
        by_task.setdefault(ds.task_of(i), []).append(i)
    # Text-only, an object-less negative (if drawn) and box tasks: no mask/keypoint/depth target.
    picks = (
        by_task["text"][:1]
        + by_task["rec"][:1]
        + by_task["det"][:2]
        + by_task["region_caption"][:1]
    )
    batch = col([ds[i] for i in picks])
    assert set(batch["targets"]) == {"box"}
    module.zero_grad()
    losses = module.losses(module.forward_batch(batch), batch)
    assert {k.split("/")[0] for k in losses} == {"token", "box"}
    # The light box head's region map trains against the box targets' masks.
    assert batch["targets"]["box"]["masks"].shape[1:] == (16, 16)
    assert float(losses["box/loss_region_dice"]) > 0
    sum(losses.values()).backward()
    grads = _grads(module)
    assert grads["box"] and not grads["mask"] and not grads["depth"]
    assert all(p.grad is not None for p in module.model.heads["depth"].parameters())
    assert float(module.prompt_encoder.queries.grad.abs().sum()) > 0  # the region prompt
    # Every task in one batch: every head trains.
    every = [v[0] for v in by_task.values()]
    batch = col([ds[i] for i in every])
    assert set(batch["targets"]) == {"box", "mask", "keypoint", "depth"}
    module.zero_grad()
    losses = module.losses(module.forward_batch(batch), batch)
    sum(losses.values()).backward()
    assert all(_grads(module).values())
    assert all(torch.isfinite(v) for v in losses.values())


def test_visual_prompt_tokens_reach_the_language_model(tiny) -> None:
    ds, module, col = tiny["ds"], tiny["module"], tiny["col"]
    i = next(i for i in range(len(ds)) if ds.task_of(i) == "region_caption")
    s = ds[i]
    batch = col([s])
    vpt = module.vpt_id
    assert int((batch["input_ids"] == vpt).sum()) == 2  # K = 2 placeholders
    module.eval()
    with torch.no_grad():
        a = module.forward_batch(batch).hidden
        moved = dict(batch, prompt_masks=torch.roll(batch["prompt_masks"], 32, dims=2))
        b = module.forward_batch(moved).hidden
    module.train()
    first = int((batch["input_ids"][0] == vpt).nonzero()[0])
    assert torch.allclose(a[0, :first], b[0, :first], atol=1e-5)  # causal: before the prompt
    assert not torch.allclose(a[0, first:], b[0, first:], atol=1e-4)
    assert not hasattr(module.model.vlm, "__dict__") or "encode_images" not in vars(
        module.model.vlm
    )  # the hook is gone after the block


def test_query_encoder_objects_on_high_image_indices() -> None:
    from trp.heads.queries import QueryEncoder

    enc = QueryEncoder(in_dim=8, d_model=8)
    x = torch.randn(4, 8)
    # Two objects of image 7 among four queries (the image index exceeds the query count).
    out = enc(x, torch.tensor([2, 2, 7, 7]), num_images=8, object_index=torch.tensor([0, 0, 1, 2]))
    assert out.image_index.tolist() == [2, 7, 7]


def test_train_unified_end_to_end_writes_every_task_family(tmp_path) -> None:
    import json

    import trp.recipes.unified as unified
    from trp.recipes import compose

    small = [
        "model.image_size=64",
        "model.language.num_layers=1",
        "model.language.hidden_size=64",
        "model.language.intermediate_size=128",
        "model.language.num_heads=2",
        "model.language.num_kv_heads=2",
        "model.vision.embed_dim=64",
        "model.vision.depth=1",
        "model.vision.num_heads=2",
        "model.tokenizer.corpus_samples=64",
    ]
    cfg = compose(
        [
            "recipe=shapes_unified",
            *small,
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "data.train_size=32",
            # 2 held-out scenes of each of the 9 tasks (data.eval_per_task).
            "data.eval_size=2",
            "data.batch_size=6",
            "eval.batch_size=12",
            "eval.max_new_tokens=12",
            "eval.num_overlays=3",
            "data.targets.rec=vrt",
            "data.targets.det=vrt",
            f"output_dir={tmp_path}",
        ]
    )
    summary = unified.train_unified(cfg)
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in (
        "rec/ACC@0.5",
        "res/gIoU",
        "res/cIoU",
        "det/AP",
        "det/AP50",
        "det/mask_AP",
        "kpt/AP",
        "depth/AbsRel",
        "depth/RMSE",
        "depth/delta1",
        "caption/BLEU-4",
        "caption/METEOR",
        "caption/ROUGE-L",
        "caption/CIDEr",
        "caption/exact_match",
        "noobj/accuracy",
    ):
        assert key in saved["metrics"], key
    assert all(saved["metrics"][f"{t}/count"] == 2 for t in unified.UNIFIED_TASKS)
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    assert (tmp_path / "checkpoint" / "prompt_encoder.safetensors").is_file()
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert len(predictions) == 18
    # examples/evaluate.py on the checkpoint: the same answers and metrics in a fresh model.
    from trp.recipes import evaluate

    again = evaluate(
        tmp_path / "checkpoint",
        compose(
            ["data=shapes_unified", "data.eval_size=2", "eval.batch_size=12",
             "eval.max_new_tokens=12", "eval.num_overlays=1", f"output_dir={tmp_path / 'eval'}"],
            config_name="evaluate",
        ),
    )  # fmt: skip
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == predictions
    assert again["metrics"] == pytest.approx(saved["metrics"], nan_ok=True)


def test_target_groups_match_the_routed_predictions(tiny) -> None:
    ds, module, col = tiny["ds"], tiny["module"], tiny["col"]
    batch = col([ds[i] for i in range(16)])
    with torch.no_grad():
        out = module.forward_batch(batch)
    for unit, rp in out.predictions.items():
        if not len(rp):
            assert unit not in batch["targets"]
            continue
        # REF slots: one prediction per target, in the same (sample, triplet) groups.
        assert sorted(rp.group.tolist()) == sorted(batch["targets"][unit]["group"].tolist()), unit


def test_predictions_and_targets_for_the_evaluator() -> None:
    from trp.grammar import parse
    from trp.recipes.unified import _evaluation_prediction, _label, _plain_text, _target

    ds = UnifiedShapesDataset(num_samples=40, seed=7, mixture={"grounded_caption": 1, "seg": 1})
    s = next(ds[i] for i in range(40) if ds.task_of(i) == "grounded_caption")
    assert _plain_text(parse(s["answer"])) == s["reference"]
    assert [_label(t.concept) for t in parse(s["answer"]).triplets] == s["labels"].tolist()
    assert _label("depth map") == -1
    t = _target("grounded_caption", s)
    assert t["text"] == s["reference"] and torch.equal(t["boxes"], s["boxes"])
    pred = {"text": "x", "answer": "x", "parsed": True}
    assert _evaluation_prediction("det", pred)["boxes"].shape == (0, 4)
    assert _evaluation_prediction("rec", pred) is None  # no box predicted
    assert _evaluation_prediction("det", {**pred, "parsed": False}) is None
    box = {
        **pred,
        "boxes": torch.ones(2, 4),
        "unit_scores": {"box": torch.ones(2)},
        "unit_labels": {"box": torch.tensor([1, 3])},
    }
    det = _evaluation_prediction("det", box)
    assert det["labels"].tolist() == [1, 3] and det["scores"].shape == (2,)
    seg = next(ds[i] for i in range(40) if ds.task_of(i) == "seg")
    assert set(_target("seg", seg)) == {"boxes", "labels", "negative", "masks"}


def test_train_unified_rejects_what_it_cannot_train(tmp_path) -> None:
    from trp.recipes import compose, train_unified

    cfg = compose(["recipe=shapes_unified", "data=shapes"])
    with pytest.raises(ValueError, match="data=shapes_unified"):
        train_unified(cfg)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_train_unified_with_a_hf_vlm(tmp_path, family: str) -> None:
    """model=hf_vlm: the processor's chat template and token grid, every unit's head, the
    visual prompts spliced into the HF VLM's embeddings, its own generate."""
    import json

    from trp.models.tiny_hf import save_tiny_vlm
    from trp.recipes import compose, train_unified

    directory = save_tiny_vlm(family, tmp_path / family)
    small_heads = [
        f"model.heads.{unit}.{key}={value}"
        for unit in ("box", "mask", "keypoint", "depth")
        for key, value in (("d_model", 32), ("n_heads", 2))
    ] + [f"model.heads.{u}.dim_feedforward=64" for u in ("box", "mask", "keypoint")]
    cfg = compose(
        [
            "recipe=shapes_unified",
            "model=hf_vlm",
            f"model.pretrained_dir={directory}",
            "model.image_size=112",
            "model.prototype_rank=8",
            *small_heads,
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            "trainer.precision=32-true",
            "data.train_size=16",
            "data.eval_size=1",
            "data.batch_size=9",
            "eval.batch_size=9",
            "eval.max_new_tokens=16",
            "eval.num_overlays=1",
            "data.targets.rec=vrt",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    summary = train_unified(cfg)
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "rec/ACC@0.5" in saved["metrics"] and "caption/CIDEr" in saved["metrics"]
    assert (tmp_path / "run" / "checkpoint" / "prompt_encoder.safetensors").is_file()
    assert len(json.loads((tmp_path / "run" / "predictions.json").read_text())) == 9


def test_patch_class_probe_supervises_the_vision_map_of_every_task(tiny) -> None:
    from trp.data import SHAPE_CLASSES
    from trp.recipes.unified import UnifiedModule

    ds, col = tiny["ds"], tiny["col"]
    module = UnifiedModule(
        model=tiny["module"].model,
        optim={"lr": 1e-3},
        loss={"patch_class": 1.0, "patch_class_foreground": 2.0},
        eval={},
        num_prompt_tokens=2,
        num_patch_classes=len(SHAPE_CLASSES) + 1,
    )
    module.prompt_encoder = tiny["module"].prompt_encoder
    samples = [ds[i] for i in range(6)]
    batch = col(samples)
    labels = batch["patch_classes"]
    assert labels.shape == (6, 16) and labels.dtype == torch.long
    # A 16 x 16 patch whose pixels are all one class carries that label.
    cells = torch.stack([s["class_map"] for s in samples]).reshape(6, 4, 16, 4, 16)
    pure = (cells == cells[:, :, :1, :, :1]).all(4).all(2).reshape(6, 16)
    assert torch.equal(labels[pure], cells[:, :, 0, :, 0].reshape(6, 16)[pure].long())
    assert bool((labels > 0).any())  # the scenes have objects, whatever their task
    module.zero_grad()
    out = module.forward_batch(batch)
    losses = module.losses(out, batch)
    logits = module.patch_probe(out.images.maps[0].flatten(2).transpose(1, 2))
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    expected = ce.mean() + 2.0 * ce[labels.reshape(-1) > 0].mean()
    torch.testing.assert_close(losses["patch_class"], expected)
    losses["patch_class"].backward()
    vision = module.model.vlm.vision
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in vision.parameters())
    batch["patch_classes"] = labels[:, :8]
    with pytest.raises(ValueError, match="patch_classes"):
        module.losses(module.forward_batch(batch), batch)
    off = UnifiedModule(
        model=tiny["module"].model,
        optim={},
        loss={"patch_class": 0.0, "patch_class_foreground": 0.0},
        eval={},
        num_patch_classes=len(SHAPE_CLASSES) + 1,
    )
    assert off.patch_probe is None
