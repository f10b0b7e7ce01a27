import copy
import dataclasses

import pytest
import torch

from conftest import tiny
from stitch_lib import TrainConfig, build_hybrid, finetune_stitch, split_model
from stitch_lib.train import FineTune, evaluate, finetune_full, resolve_device, train_anchor


def anchors_state(hybrid):
    """Every anchor parameter and buffer (BatchNorm running stats included), cloned."""
    return {k: v.clone() for part in (hybrid.front, hybrid.back)
            for k, v in list(part.state_dict().items())}


def test_finetune_stitch_touches_only_the_stitch(splits):
    front, back = split_model(tiny("test_resnet")), split_model(tiny("mobilenetv3_small_050"))
    hybrid, _ = build_hybrid(front, 1, back, 1, splits.calib.x, batch_size=32)
    before = anchors_state(hybrid)
    stitch_before = copy.deepcopy(hybrid.stitch.state_dict())
    ls_acc = evaluate(hybrid, splits.val)
    hybrid.train()  # a careless caller: fine-tuning must still keep the anchors in eval
    res = finetune_stitch(hybrid, splits, TrainConfig(epochs=2, lr=1e-2, batch_size=64))
    after = anchors_state(hybrid)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    assert any(k.endswith("running_mean") for k in before)  # BatchNorm buffers were checked
    assert any(not torch.equal(v, hybrid.stitch.state_dict()[k]) for k, v in stitch_before.items())
    assert res.val_acc >= ls_acc  # the best state is kept, the starting one included
    assert res.val_acc == evaluate(hybrid, splits.val)
    assert all(not p.requires_grad for p in (*hybrid.front.parameters(), *hybrid.back.parameters()))


def test_distillation_from_the_front_anchor_runs(splits):
    teacher = tiny("test_resnet")
    front, back = split_model(teacher), split_model(tiny("mobilenetv3_small_050"))
    hybrid, _ = build_hybrid(front, 1, back, 1, splits.calib.x, batch_size=32)
    res = finetune_stitch(hybrid, splits, TrainConfig(epochs=1, distill=0.5), teacher=teacher)
    assert res.epochs_run == 1 and 0 <= res.val_acc <= 1


def test_without_patience_every_step_runs(splits):
    front, back = split_model(tiny("test_resnet")), split_model(tiny("mobilenetv3_small_050"))
    hybrid, _ = build_hybrid(front, 1, back, 1, splits.calib.x, batch_size=32)
    start = copy.deepcopy(hybrid.stitch.state_dict())
    # lr so small that validation accuracy never gains: patience 0 stops at the first
    # validation, None runs all four (every 2 of the 8 steps)
    cfg = TrainConfig(lr=1e-12, steps=8, n_train=256, patience=0)
    assert finetune_stitch(hybrid, splits, cfg).epochs_run == 1
    hybrid.stitch.load_state_dict(start)
    res = finetune_stitch(hybrid, splits, dataclasses.replace(cfg, patience=None))
    assert res.epochs_run == 4 and len(res.history) == 4
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=-1)


def test_a_paused_finetune_ends_where_one_uninterrupted_run_does(splits):
    front, back = split_model(tiny("test_resnet")), split_model(tiny("mobilenetv3_small_050"))
    hybrid, _ = build_hybrid(front, 1, back, 1, splits.calib.x, batch_size=32)
    start = copy.deepcopy(hybrid.stitch.state_dict())
    cfg = TrainConfig(lr=1e-2, steps=12, n_train=256, patience=None)  # validates every 3
    whole = finetune_stitch(hybrid, splits, cfg)
    ended = copy.deepcopy(hybrid.stitch.state_dict())
    hybrid.stitch.load_state_dict(start)
    run = FineTune(hybrid, splits, cfg)
    probe = run.advance(5)  # between validations: a reading that does not choose the state
    assert probe == evaluate(hybrid, splits.val) and run.step == 5
    run.pause(start)  # the model shows its start meanwhile
    assert all(torch.equal(v, hybrid.stitch.state_dict()[k]) for k, v in start.items())
    res = run.result()
    assert res.history == whole.history and res.val_acc == whole.val_acc
    assert all(torch.equal(v, hybrid.stitch.state_dict()[k]) for k, v in ended.items())


def test_full_finetune_changes_the_anchors(splits):
    front, back = split_model(tiny("test_resnet")), split_model(tiny("mobilenetv3_small_050"))
    hybrid, _ = build_hybrid(front, 1, back, 1, splits.calib.x, batch_size=32)
    before = anchors_state(hybrid)
    finetune_full(hybrid, splits, TrainConfig(epochs=1, lr=1e-3, n_train=256))
    after = anchors_state(hybrid)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_train_anchor_learns(splits):
    model = tiny("test_resnet")
    chance = evaluate(model, splits.val)
    res = train_anchor(model, splits, TrainConfig(epochs=3, batch_size=32, lr=3e-3))
    assert res.val_acc > max(0.4, chance + 0.2)  # Fashion-MNIST: 10 classes, chance 0.1
    assert not model.training


def test_devices_resolve_or_say_what_to_pass(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU.*use 'cpu' or 'auto'"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"one of \('cpu', 'cuda', 'auto'\), got 'gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
