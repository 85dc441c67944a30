"""trp.ops.point_mask_loss_layers vs Mask2Former's eager mask loss, summed over decoder layers.

Three sides, each a full training step of the mask loss (forward + backward, L decoder layers):

* ``eager`` — Mask2Former's actual path: the decoder's ``forward_prediction_heads`` makes
  ``pred_masks = einsum("bqc,bchw->bqhw")`` for ALL queries of every image at every layer (the
  decoder returns them for all layers at once), then ``SetCriterion.loss_masks`` per layer:
  ``src_masks = pred_masks[src_idx]`` (a copy), ``get_uncertain_point_coords_with_randomness``,
  ``point_sample`` of targets and logits, ``sigmoid_ce_loss`` + ``dice_loss``. Here every query is
  matched (Q = B x Q/B). The targets are handed in already gathered ([Q, Ht, Wt]) to every side,
  so Mask2Former's per-layer ``target_masks[tgt_idx]`` copy is NOT counted against eager.
* ``eager_lean`` — the same loss with the einsum of the matched queries only
  (``trp.ops.reference.mask_logits``), the earlier baseline.
* ``fused`` — ONE call of ``trp.ops.point_mask_loss_layers`` for the L layers.

Peak memory is the growth of the process's peak RSS over one call, in a fresh subprocess with
glibc's mmap threshold pinned (see ``_harness``). Two accountings: ``grad None`` (the default,
what a training step with ``optimizer.zero_grad(set_to_none=True)`` sees: the leaves' ``.grad``
are None before the call, so each side also grows by its final ``.grad``, 130 MB at full size)
and ``grads kept`` (the harness's: ``.grad`` buffers of the previous step exist before the call).

    python benchmarks/bench_point_mask_loss.py [--quick] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness
from trp.ops import point_mask_loss_layers, reference

OP = "point_mask_loss"
MODES = ("forward+backward",)  # a training loss
WEIGHT_MASK = WEIGHT_DICE = 5.0  # Mask2Former's
OVERSAMPLE, IMPORTANCE = 3.0, 0.75


def cases(quick: bool) -> list[dict]:
    if quick:
        return [{"L": 2, "Q": 40, "C": 64, "B": 2, "H": 64, "W": 64, "P": 1000}]
    return [{"L": 10, "Q": 200, "C": 256, "B": 2, "H": 256, "W": 256, "P": 12544}]


def make_inputs(case: dict, mode: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, c, b, h, w = case["Q"], case["C"], case["B"], case["H"], case["W"]
    grad = mode == "forward+backward"
    # Targets at twice the feature resolution, like Mask2Former's (stride-4 features, targets
    # at a higher resolution): normalised points address both grids.
    targets = torch.rand(q, 2 * h, 2 * w, generator=gen) > 0.5
    return {
        "mask_embed": (torch.randn(case["L"], q, c, generator=gen) / c**0.5).requires_grad_(grad),
        "pixel_features": torch.randn(b, c, h, w, generator=gen).requires_grad_(grad),
        # Query k belongs to image k // (Q / B): the matched queries of image 0, then image 1.
        "image_index": torch.arange(q) // (q // b),
        "target_masks": targets.float(),
        "num_points": torch.tensor(case["P"]),
    }


# ---- Mask2Former (facebookresearch/Mask2Former, modeling/criterion.py, point_features.py) ----


def point_sample(inputs, point_coords, **kwargs):
    """detectron2's point_sample: grid_sample at [0, 1] coordinates of [N, C, H, W] inputs."""
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    output = torch.nn.functional.grid_sample(inputs, 2.0 * point_coords - 1.0, **kwargs)
    return output.squeeze(3) if add_dim else output


def get_uncertain_point_coords_with_randomness(
    coarse_logits, uncertainty_func, num_points, oversample_ratio, importance_sample_ratio, gen
):
    num_boxes = coarse_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    point_coords = torch.rand(num_boxes, num_sampled, 2, generator=gen)
    point_logits = point_sample(coarse_logits, point_coords, align_corners=False)
    point_uncertainties = uncertainty_func(point_logits)
    num_uncertain_points = int(importance_sample_ratio * num_points)
    num_random_points = num_points - num_uncertain_points
    idx = torch.topk(point_uncertainties[:, 0, :], k=num_uncertain_points, dim=1)[1]
    shift = num_sampled * torch.arange(num_boxes, dtype=torch.long)
    idx += shift[:, None]
    point_coords = point_coords.view(-1, 2)[idx.view(-1), :].view(
        num_boxes, num_uncertain_points, 2
    )
    if num_random_points > 0:
        point_coords = torch.cat(
            [point_coords, torch.rand(num_boxes, num_random_points, 2, generator=gen)], dim=1
        )
    return point_coords


def calculate_uncertainty(logits):
    return -(torch.abs(logits))


def dice_loss(inputs, targets, num_masks):
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(inputs, targets, num_masks):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def loss_masks(pred_masks, src_idx, target_masks, num_masks, num_points, gen):
    """SetCriterion.loss_masks with the targets already gathered."""
    src_masks = pred_masks[src_idx][:, None]  # the index copy of the matched queries' logits
    with torch.no_grad():
        point_coords = get_uncertain_point_coords_with_randomness(
            src_masks, calculate_uncertainty, num_points, OVERSAMPLE, IMPORTANCE, gen
        )
        point_labels = point_sample(
            target_masks[:, None], point_coords, align_corners=False
        ).squeeze(1)
    point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)
    return (
        sigmoid_ce_loss(point_logits, point_labels, num_masks),
        dice_loss(point_logits, point_labels, num_masks),
    )


def eager(mask_embed, pixel_features, image_index, target_masks, num_points) -> torch.Tensor:
    """Mask2Former: pred_masks of all queries at all layers, then loss_masks per layer."""
    gen = torch.Generator().manual_seed(0)
    num_layers, q, c = mask_embed.shape
    b = pixel_features.shape[0]
    per_image = q // b
    # forward_prediction_heads at every decoder layer (the decoder's outputs for all layers).
    pred_masks = [
        torch.einsum("bqc,bchw->bqhw", embed.view(b, per_image, c), pixel_features)
        for embed in mask_embed
    ]
    src_idx = (image_index, torch.arange(q) % per_image)  # every query matched
    total = mask_embed.new_zeros(())
    for layer in range(num_layers):
        loss_mask, loss_dice = loss_masks(
            pred_masks[layer], src_idx, target_masks, float(q), int(num_points), gen
        )
        total = total + WEIGHT_MASK * loss_mask + WEIGHT_DICE * loss_dice
    return total


def eager_lean(mask_embed, pixel_features, image_index, target_masks, num_points) -> torch.Tensor:
    """The same loss per layer with logits of the matched queries only, one layer at a time."""
    gen = torch.Generator().manual_seed(0)
    q = mask_embed.shape[1]
    total = mask_embed.new_zeros(())
    for embed in mask_embed:
        logits = reference.mask_logits(embed, pixel_features, image_index)[:, None]  # Q x 1 x H x W
        with torch.no_grad():
            points = get_uncertain_point_coords_with_randomness(
                logits, calculate_uncertainty, int(num_points), OVERSAMPLE, IMPORTANCE, gen
            )
            labels = point_sample(target_masks[:, None], points, align_corners=False).squeeze(1)
        point_logits = point_sample(logits, points, align_corners=False).squeeze(1)
        total = (
            total
            + WEIGHT_MASK * sigmoid_ce_loss(point_logits, labels, float(q))
            + WEIGHT_DICE * dice_loss(point_logits, labels, float(q))
        )
    return total


def fused(mask_embed, pixel_features, image_index, target_masks, num_points) -> torch.Tensor:
    out = point_mask_loss_layers(
        mask_embed,
        pixel_features,
        image_index,
        target_masks,
        num_points=int(num_points),
        oversample_ratio=OVERSAMPLE,
        importance_sample_ratio=IMPORTANCE,
        weight_mask=WEIGHT_MASK,
        weight_dice=WEIGHT_DICE,
        generator=torch.Generator().manual_seed(0),
    )
    return out["loss"]


SIDES = {"eager": eager, "eager_lean": eager_lean, "fused": fused}


def check(case: dict) -> dict:
    """Max abs differences of layer 0's (loss_mask, loss_dice): the fused op (fp32 and fp64) vs
    the eager reference in fp64 at the same generated points; and the three sides' totals."""
    x = make_inputs(case, "forward")
    args = (x["mask_embed"][:1], x["pixel_features"], x["image_index"], x["target_masks"])
    p = case["P"]
    sizes = (p, int(IMPORTANCE * p), int(p * OVERSAMPLE))
    with torch.no_grad():
        _, ref = reference.point_mask_loss_layers(
            *(t.double() if t.is_floating_point() else t for t in args), 0, *sizes, 1, 1, case["Q"]
        )
        errors = {}
        for dtype in (torch.float32, torch.float64):
            out = point_mask_loss_layers(
                *(t.to(dtype) if t.is_floating_point() else t for t in args),
                num_points=p,
                seed=0,
            )
            ours = torch.stack([out["loss_mask"], out["loss_dice"]], 1).double()
            errors[str(dtype).removeprefix("torch.")] = float((ours - ref).abs().max())
        totals = {side: float(fn(**x)) for side, fn in SIDES.items()}
    return {"max_abs_error": errors, "totals": totals}


# ---- measurement ----


def _measure_here(side: str, mode: str, case: dict, grads_kept: bool) -> int:
    torch.set_num_threads(1)
    inputs = make_inputs(case, mode)
    call = _harness.make_call(SIDES[side], inputs, mode)
    call()  # warm-up: lazy initialisation is not the op's memory
    if not grads_kept:
        for t in inputs.values():
            if isinstance(t, torch.Tensor):
                t.grad = None
    before = _harness._status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    call()  # sets .grad None first (frees kept grads), then forward + backward
    return max(0, _harness._status_kb("VmHWM") - before) * 1024


def peak_memory(side: str, mode: str, case: dict, grads_kept: bool) -> int | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--memory", side, mode, json.dumps(case), str(grads_kept)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def run(quick: bool, threads: tuple[int, ...]) -> list[dict]:
    rows = []
    for case in cases(quick):
        checked = check(case)
        for mode in MODES:
            memory = {
                (side, kept): peak_memory(side, mode, case, kept)
                for kept in (False, True)
                for side in SIDES
            }
            for n in threads:
                torch.set_num_threads(n)
                inputs = make_inputs(case, mode)
                timings = {}
                for side, fn in SIDES.items():
                    call = _harness.make_call(fn, inputs, mode)
                    call()
                    timings[side] = benchmark.Timer(
                        stmt="call()", globals={"call": call}, num_threads=n
                    ).blocked_autorange(min_run_time=0.2 if quick else 1.0)
                row = {"op": OP, "case": case, "mode": mode, "threads": n}
                for side, m in timings.items():
                    row[f"{side}_median_s"] = m.median
                    row[f"{side}_iqr_s"] = m.iqr
                    row[f"{side}_runs"] = len(m.times)
                    row[f"{side}_peak_bytes"] = memory[(side, False)]
                    row[f"{side}_peak_bytes_grads_kept"] = memory[(side, True)]
                row["speedup"] = row["eager_median_s"] / row["fused_median_s"]
                row["speedup_vs_lean"] = row["eager_lean_median_s"] / row["fused_median_s"]
                row["max_abs_error"] = checked["max_abs_error"]["float32"]
                row["max_abs_error_fp64"] = checked["max_abs_error"]["float64"]
                row["totals"] = checked["totals"]
                row["loadavg_1min"] = os.getloadavg()[0]
                rows.append(row)
                print(json.dumps(row), flush=True)
    write(rows, quick)
    return rows


def _mb(v: int | None) -> str:
    return _harness._fmt_mb(v)


def _ratio(a: int | None, b: int | None) -> str:
    if a is None or b is None:
        return "n/a"
    if b < 2**20:
        return f">{a / 2**20:.0f}x"
    return f"{a / b:.1f}x"


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"### {OP}",
        "",
        _harness.machine_line(meta),
        "",
        "eager = Mask2Former's path (pred_masks of all queries at all layers, loss_masks per "
        "layer); eager lean = einsum of the matched queries only, one layer at a time; fused = "
        "one `point_mask_loss_layers` call. Peak = growth of the process's peak RSS over one "
        "forward+backward with `.grad` None before the call (`grads kept`: the previous step's "
        "`.grad` exist before it). Error: layer 0's losses, fused fp32 vs eager fp64 reference "
        "at the same generated points.",
        "",
        "| case | threads | eager ms | eager lean ms | fused ms | speed-up vs eager | vs lean "
        "| eager MB | lean MB | fused MB | memory ratio vs eager | vs lean | grads kept: "
        "eager / lean / fused MB | max abs err | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = ", ".join(f"{k}={v}" for k, v in r["case"].items())
        kept = " / ".join(_mb(r[f"{s}_peak_bytes_grads_kept"]) for s in SIDES)
        lines.append(
            f"| {case} | {r['threads']} | {r['eager_median_s'] * 1e3:.0f} "
            f"| {r['eager_lean_median_s'] * 1e3:.0f} | {r['fused_median_s'] * 1e3:.0f} "
            f"| {r['speedup']:.2f}x | {r['speedup_vs_lean']:.2f}x "
            f"| {_mb(r['eager_peak_bytes'])} | {_mb(r['eager_lean_peak_bytes'])} "
            f"| {_mb(r['fused_peak_bytes'])} "
            f"| {_ratio(r['eager_peak_bytes'], r['fused_peak_bytes'])} "
            f"| {_ratio(r['eager_lean_peak_bytes'], r['fused_peak_bytes'])} | {kept} "
            f"| {r['max_abs_error']:.1e} | {r['loadavg_1min']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[dict], quick: bool) -> None:
    results = _harness.RESULTS
    results.mkdir(parents=True, exist_ok=True)
    stem = f"{OP}.quick" if quick else OP
    meta = {
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
        "quick": quick,
        **_harness.machine(),
    }
    (results / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (results / f"{stem}.md").write_text(to_markdown(rows, meta))
    print(f"\n{to_markdown(rows, meta)}\nwrote {results / stem}.json/.md")


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark point_mask_loss_layers")
    parser.add_argument("--quick", action="store_true", help="CI mode: few sizes, short timing")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    run(args.quick, tuple(args.threads))


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        _, _, side_name, mode_name, case_json, kept_flag = sys.argv
        print(_measure_here(side_name, mode_name, json.loads(case_json), kept_flag == "True"))
    else:
        main()
