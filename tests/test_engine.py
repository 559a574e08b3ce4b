import math

import pytest
import torch
from torch import nn

from maskrcnn import engine, masks


def test_schedule_warms_up_then_decays():
    s = engine.Schedule(base_lr=0.02, total_steps=100, warmup_steps=10, milestones=(0.5, 0.8))
    assert s.lr(0) == pytest.approx(0.02 * 0.001)
    assert s.lr(5) < s.lr(9) < s.lr(10) == pytest.approx(0.02)
    assert s.lr(49) == pytest.approx(0.02) and s.lr(50) == pytest.approx(0.002) and s.lr(80) == pytest.approx(0.0002)
    cos = engine.Schedule(base_lr=0.02, total_steps=100, warmup_steps=10, kind="cosine")
    assert cos.lr(10) == pytest.approx(0.02) and cos.lr(55) == pytest.approx(0.01) and cos.lr(100) == pytest.approx(0.0)


@pytest.mark.parametrize("steps_per_epoch, warmup", [(300, 100), (30, 15)])
def test_warmup_is_at_most_a_quarter_of_the_run(steps_per_epoch, warmup, tmp_path):
    """The default at a global batch of 4 is 100 steps: 2 epochs of 300 steps warm up for 100, of 30 for 15."""
    from maskrcnn.train_config import TrainConfig, TrainingPlan

    cfg = TrainConfig(train_annotations="a.json", train_images="i", storage=str(tmp_path), name="r", epochs=2)
    plan = TrainingPlan(cfg, ["a"], [1], 2 * steps_per_epoch, steps_per_epoch, {}, {}, {}, None, None)
    assert cfg.warmup_steps is None and plan.wanted_warmup_steps == 100 and plan.warmup_steps == warmup


@pytest.mark.parametrize("global_batch, steps", [(2, 100), (4, 100), (16, 312), (32, 625), (128, 625)])
def test_default_warmup_grows_with_the_global_batch_up_to_nvidias(global_batch, steps):
    assert engine.default_warmup_steps(global_batch) == steps


def test_an_explicit_warmup_is_kept_below_a_quarter(tmp_path):
    from maskrcnn.train_config import TrainConfig, TrainingPlan

    cfg = TrainConfig(train_annotations="a.json", train_images="i", storage=str(tmp_path), name="r", warmup_steps=7)
    plan = TrainingPlan(cfg, ["a"], [1], 200, 100, {}, {}, {}, None, None)
    assert plan.warmup_steps == 7


def test_default_lr_scales_sgd_with_global_batch_and_not_adamw():
    assert engine.default_lr("sgd", 16) == pytest.approx(0.02) and engine.default_lr("sgd", 4) == pytest.approx(0.005)
    assert engine.default_lr("adamw", 4) == engine.default_lr("adamw", 64) == pytest.approx(1e-4)


def test_make_optimizer_builds_either_and_names_a_bad_choice():
    params = [nn.Parameter(torch.ones(2))]
    sgd = engine.make_optimizer("sgd", params, 0.1, momentum=0.8, weight_decay=1e-4)
    adamw = engine.make_optimizer("adamw", params, 0.001, momentum=0.8, weight_decay=1e-4)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 0.001
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        engine.make_optimizer("adam", params, 0.1, momentum=0.9, weight_decay=0.0)


class _LossModel(nn.Module):
    """Stands in for Mask R-CNN's training forward: returns a dict of losses."""

    def __init__(self, value: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.value = value
        self.calls = 0

    def forward(self, images, targets):
        self.calls += 1
        names = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
        return {n: self.w.sum() * (self.value if n == "loss_classifier" else 0.25) for n in names}


def _rows():
    return [
        {
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8).numpy(),
            "boxes": torch.zeros(0, 4).numpy(),
            "labels": torch.zeros(0, dtype=torch.int64).numpy(),
            "masks": "",
        }
    ]


def _step(model, rows):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return engine.train_step(model, opt, scaler, rows, torch.device("cpu"), lr=0.1, clip_norm=1.0, amp=False, step=3)


def test_train_step_updates_and_reports_losses():
    model = _LossModel(2.0)
    result = _step(model, _rows())
    assert result.images == 1 and result.losses["loss"] == pytest.approx(3.0)
    assert model.w.item() < 1.0


def test_non_finite_loss_stops_with_a_clear_message():
    with pytest.raises(engine.NonFiniteLoss, match="non-finite loss at step 3"):
        _step(_LossModel(math.nan), _rows())


def test_a_batch_of_only_bad_images_still_joins_the_step():
    model = _LossModel(2.0)
    result = _step(model, [])
    # it still runs forward and backward (DDP's collectives), with zero weight
    assert model.calls == 1 and result.images == 0 and result.losses["loss"] == 0.0 and model.w.item() == 1.0


def test_real_model_trains_on_images_with_and_without_annotations():
    from maskrcnn.model import SMALL, build_model

    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=3, min_size=64, max_size=96, skip_resize=True).train()
    empty = _rows()[0]
    mask = torch.zeros(1, 48, 64, dtype=torch.uint8)
    mask[0, 10:30, 12:40] = 1
    full = {
        "image": torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8).numpy(),
        "boxes": torch.tensor([[12.0, 10.0, 40.0, 30.0]]).numpy(),
        "labels": torch.tensor([2]).numpy(),
        "masks": masks.pack(mask.numpy()),
    }
    result = _step(model, [empty, full])
    assert result.images == 2 and math.isfinite(result.losses["loss"]) and result.losses["loss_mask"] > 0


@pytest.mark.parametrize("arch", ["keypointrcnn_resnet18_fpn_small", "maskrcnn_keypoint_resnet18_fpn_small"])
def test_keypoint_models_learn_from_real_person_keypoints(arch, shared_data):
    """A few CPU steps on real COCO persons (people with no labelled keypoints among them):
    the loss falls, and the keypoint loss is part of it."""
    import json

    from maskrcnn import coco, data, transforms
    from maskrcnn.model import build_model

    folder = shared_data / "coco_keypoints" / "mmpose"
    dataset = coco.load_coco(str(folder / "test_coco.json"), str(folder / "images"))
    resize = transforms.resize_transform(160, 240)
    rows = [data.load_example(r, resize) for r in dataset.records if json.loads(r["annotations"])]
    torch.manual_seed(0)
    model = build_model(arch, num_classes=2, num_keypoints=17, min_size=160, max_size=240, skip_resize=True).train()
    optimizer = engine.make_optimizer("adamw", list(model.parameters()), 1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in range(16):
        batch = rows[(2 * step) % len(rows) :][:2] or rows[:2]
        result = engine.train_step(
            model, optimizer, scaler, batch, torch.device("cpu"), lr=1e-3, clip_norm=10.0, amp=False, step=step
        )
        losses.append(result.losses["loss"])
    assert "loss_keypoint" in result.losses and ("loss_mask" in result.losses) == arch.startswith("maskrcnn")
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
