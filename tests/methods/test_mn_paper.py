"""mn_paper as the authors' code runs it (issue 19): the epoch-linear b_u of their create_loaders, the co-training
order and epoch counting, LoRA training every bias and LayerNorm, the SegFormer head with a learned transposed
convolution, and the presets a running benchmark uses resolving exactly as before these switches existed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mnseg.config.checks import check_config
from mnseg.config.schema import Config, ModelConfig, load_config
from mnseg.engine.build import build_model
from mnseg.errors import ConfigError
from mnseg.methods.base import MethodContext
from mnseg.methods.mn import MN
from mnseg.methods.mn_sampling import epoch_linear_unlabeled_count
from mnseg.models import apply_finetuning, create_model
from mnseg.models.finetune import bias_and_layernorm_names
from mnseg.workflows.benchmark import resolved_params

# Captured on main (18080c7, before these switches) with PYTHONPATH=/work/main/src:
#   d = load_config(name).to_dict(); d["method"]["params"] = resolved_params("mn", d["method"]["params"])
# i.e. what the benchmark compares (defaults filled in).
BASELINE = {
    "cpu_grid_mn": (
        '{"data":{"cache_dir":null,"clahe":false,"class_balanced":true,"dataset":"","fg_prob":0.5,"normalization"'
        ':"auto","num_labeled":null,"num_val":0,"num_workers":0,"patch_size":[32,32,32],"target_spacing":null,"tr'
        'ansductive":false},"infer":{"blend":"constant","mirror_tta":false,"model":null,"overlap":0.5,"sw_batch_s'
        'ize":4},"method":{"name":"mn","params":{"fg_refresh":"net3d","fg_refresh_every":6,"fixed_pseudo":false,"'
        'fixed_ratio":0.5,"lrg":"lr","min_labeled":0,"oracle_pseudo":false,"pre2d_epochs":0,"predict":"3d","pseud'
        'o":"ensemble","pseudo_weight":"none","schedule":"restart","slices_2d":8,"soft_dice":"linear","sup_epochs'
        '":30,"unlabeled_on_top":false,"w_ce":1.0,"w_dice":1.0,"w_kl":1.0,"w_u":1.0}},"models":{"net2d":{"activat'
        'ion_checkpoint":false,"augment":{"overrides":{},"preset":"conservative_3d"},"finetune":"lora","frozen_dt'
        'ype":null,"kwargs":{"pretrained":true,"variant":"lite0"},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":'
        '8,"name":"effunet","optim":{"final_lr":0.0,"grad_clip":12.0,"lr":0.001,"name":"adamw","warmup_epochs":1,'
        '"weight_decay":0.0001},"slice_axis":-1,"slice_batch":null},"net3d":{"activation_checkpoint":false,"augme'
        'nt":{"overrides":{},"preset":"conservative_3d"},"finetune":null,"frozen_dtype":null,"kwargs":{"base_filt'
        'ers":16,"depth":4},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":8,"name":"unet3d","optim":{"final_lr":'
        '0.0,"grad_clip":12.0,"lr":0.002,"name":"adamw","warmup_epochs":1,"weight_decay":0.0001},"slice_axis":-1,'
        '"slice_batch":null}},"train":{"amp":true,"batch_size":4,"channels_last":false,"check_every":10,"checkpoi'
        'nt_every":1,"compile":false,"compile_mode":"default","deterministic":false,"device":"auto","epochs":120,'
        '"iters_per_epoch":20,"keep_epochs":[],"on_nan":"stop","seed":0,"val_every":15}}'
    ),
    "cpu_grid_mn_paper": (
        '{"data":{"cache_dir":null,"clahe":false,"class_balanced":true,"dataset":"","fg_prob":0.5,"normalization"'
        ':"auto","num_labeled":null,"num_val":0,"num_workers":0,"patch_size":[32,32,32],"target_spacing":null,"tr'
        'ansductive":false},"infer":{"blend":"constant","mirror_tta":false,"model":null,"overlap":0.5,"sw_batch_s'
        'ize":4},"method":{"name":"mn","params":{"fg_refresh":"net3d","fg_refresh_every":6,"fixed_pseudo":false,"'
        'fixed_ratio":0.5,"lrg":"lr","min_labeled":0,"oracle_pseudo":false,"pre2d_epochs":0,"predict":"3d","pseud'
        'o":"partner","pseudo_weight":"none","schedule":"restart","slices_2d":8,"soft_dice":"linear","sup_epochs"'
        ':30,"unlabeled_on_top":false,"w_ce":1.0,"w_dice":1.0,"w_kl":1.0,"w_u":1.0}},"models":{"net2d":{"activati'
        'on_checkpoint":false,"augment":{"overrides":{},"preset":"conservative_3d"},"finetune":"lora","frozen_dty'
        'pe":null,"kwargs":{"pretrained":true,"variant":"lite0"},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":8'
        ',"name":"effunet","optim":{"final_lr":0.0,"grad_clip":12.0,"lr":0.001,"name":"adamw","warmup_epochs":1,"'
        'weight_decay":0.0001},"slice_axis":-1,"slice_batch":null},"net3d":{"activation_checkpoint":false,"augmen'
        't":{"overrides":{},"preset":"conservative_3d"},"finetune":null,"frozen_dtype":null,"kwargs":{"base_filte'
        'rs":16,"depth":4},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":8,"name":"unet3d","optim":{"final_lr":0'
        '.0,"grad_clip":12.0,"lr":0.002,"name":"adamw","warmup_epochs":1,"weight_decay":0.0001},"slice_axis":-1,"'
        'slice_batch":null}},"train":{"amp":true,"batch_size":4,"channels_last":false,"check_every":10,"checkpoin'
        't_every":1,"compile":false,"compile_mode":"default","deterministic":false,"device":"auto","epochs":120,"'
        'iters_per_epoch":20,"keep_epochs":[],"on_nan":"stop","seed":0,"val_every":15}}'
    ),
    "demo_cpu_mn": (
        '{"data":{"cache_dir":null,"clahe":false,"class_balanced":true,"dataset":"","fg_prob":0.5,"normalization"'
        ':"auto","num_labeled":null,"num_val":0,"num_workers":0,"patch_size":[48,48,32],"target_spacing":null,"tr'
        'ansductive":false},"infer":{"blend":"constant","mirror_tta":false,"model":null,"overlap":0.5,"sw_batch_s'
        'ize":4},"method":{"name":"mn","params":{"fg_refresh":"net3d","fg_refresh_every":6,"fixed_pseudo":false,"'
        'fixed_ratio":0.5,"lrg":"lr","min_labeled":0,"oracle_pseudo":false,"pre2d_epochs":0,"predict":"3d","pseud'
        'o":"partner","pseudo_weight":"none","schedule":"restart","slices_2d":8,"soft_dice":"linear","sup_epochs"'
        ':10,"unlabeled_on_top":false,"w_ce":1.0,"w_dice":1.0,"w_kl":1.0,"w_u":1.0}},"models":{"net2d":{"activati'
        'on_checkpoint":false,"augment":{"overrides":{},"preset":"conservative_3d"},"finetune":"lora","frozen_dty'
        'pe":null,"kwargs":{"pretrained":true,"variant":"lite0"},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":8'
        ',"name":"effunet","optim":{"final_lr":0.0,"grad_clip":12.0,"lr":0.001,"name":"adamw","warmup_epochs":1,"'
        'weight_decay":0.0001},"slice_axis":-1,"slice_batch":null},"net3d":{"activation_checkpoint":false,"augmen'
        't":{"overrides":{},"preset":"conservative_3d"},"finetune":null,"frozen_dtype":null,"kwargs":{"base_filte'
        'rs":16,"depth":4},"lora_alpha":16,"lora_dropout":0.0,"lora_rank":8,"name":"unet3d","optim":{"final_lr":0'
        '.0,"grad_clip":12.0,"lr":0.002,"name":"adamw","warmup_epochs":1,"weight_decay":0.0001},"slice_axis":-1,"'
        'slice_batch":null}},"train":{"amp":true,"batch_size":2,"channels_last":false,"check_every":10,"checkpoin'
        't_every":1,"compile":false,"compile_mode":"default","deterministic":false,"device":"auto","epochs":40,"i'
        'ters_per_epoch":20,"keep_epochs":[],"on_nan":"stop","seed":0,"val_every":0}}'
    ),
    "mn": (
        '{"data":{"cache_dir":null,"clahe":false,"class_balanced":true,"dataset":"","fg_prob":0.5,"normalization"'
        ':"auto","num_labeled":null,"num_val":0,"num_workers":0,"patch_size":[96,96,64],"target_spacing":null,"tr'
        'ansductive":false},"infer":{"blend":"constant","mirror_tta":false,"model":null,"overlap":0.5,"sw_batch_s'
        'ize":4},"method":{"name":"mn","params":{"fg_refresh":"net3d","fg_refresh_every":2,"fixed_pseudo":false,"'
        'fixed_ratio":0.5,"lrg":"lr","min_labeled":0,"oracle_pseudo":false,"pre2d_epochs":0,"predict":"3d","pseud'
        'o":"partner","pseudo_weight":"none","schedule":"restart","slices_2d":null,"soft_dice":"linear","sup_epoc'
        'hs":50,"unlabeled_on_top":false,"w_ce":1.0,"w_dice":1.0,"w_kl":1.0,"w_u":1.0}},"models":{"net2d":{"activ'
        'ation_checkpoint":false,"augment":{"overrides":{},"preset":"conservative_3d"},"finetune":"lora","frozen_'
        'dtype":null,"kwargs":{"pretrained":true,"variant":"lite0"},"lora_alpha":16,"lora_dropout":0.0,"lora_rank'
        '":8,"name":"effunet","optim":{"final_lr":0.0,"grad_clip":12.0,"lr":0.001,"name":"adamw","warmup_epochs":'
        '5,"weight_decay":0.0001},"slice_axis":-1,"slice_batch":null},"net3d":{"activation_checkpoint":false,"aug'
        'ment":{"overrides":{},"preset":"conservative_3d"},"finetune":null,"frozen_dtype":null,"kwargs":{},"lora_'
        'alpha":16,"lora_dropout":0.0,"lora_rank":8,"name":"unet3d_mn","optim":{"final_lr":0.0,"grad_clip":12.0,"'
        'lr":0.0001,"name":"adamw","warmup_epochs":5,"weight_decay":0.0001},"slice_axis":-1,"slice_batch":null}},'
        '"train":{"amp":true,"batch_size":5,"channels_last":false,"check_every":10,"checkpoint_every":1,"compile"'
        ':false,"compile_mode":"default","deterministic":false,"device":"auto","epochs":400,"iters_per_epoch":100'
        ',"keep_epochs":[],"on_nan":"stop","seed":0,"val_every":10}}'
    ),
}
# The keys added since, each with the default that keeps today's behaviour.
NEW_MODEL_KEYS = {"lora_train_bias_norm": False, "init": None, "init_role": None}
NEW_PARAMS = {"cotrain_first": "net3d", "partner_weight": 0.5, "generator": "live", "generator_decay": 0.99,
              "partner_weight_by_class": None, "by_class_mix": "renormalise", "pseudo_align": "none",
              "align_decay": 0.99, "align_max_ratio": 10.0, "align_classes": None,
              "align_down_only": False, "copy_paste": "none", "paste_ratio": 2 / 3,
              "partner_rare_share": None}
NEW_OPTIM_KEYS = {"schedule": "cosine", "momentum": 0.99, "nesterov": True, "step_size": 0, "step_gamma": 0.1,
                  "restart_epochs": []}
NEW_TRAIN_KEYS = {"cpu_amp": False}
# Presets changed on purpose since, by what changed: cpu_grid_mn became the recipe the selection set chose
# (2026-12-08, docs/results.md): a 2D UNet partner and the rare classes from both models' mean.
CHANGED = {
    "cpu_grid_mn": {
        "params": {"partner_rare_share": 0.01, "by_class_mix": "remainder"},
        "net2d": {"name": "unet2d", "kwargs": {"depth": 4, "base_filters": 16}, "finetune": None},
    },
}
NEW_SECTIONS = ("domain",)  # whole config sections added since, at their defaults (adaptation off)


@pytest.mark.parametrize("preset", sorted(BASELINE))
def test_benchmarked_presets_resolve_exactly_as_before(preset):
    d = load_config(preset).to_dict()
    d["method"]["params"] = resolved_params(d["method"]["name"], d["method"]["params"])
    expected = json.loads(BASELINE[preset])
    expected["method"]["params"].update(NEW_PARAMS)
    for model in expected["models"].values():
        model.update(NEW_MODEL_KEYS)
        model["optim"].update(NEW_OPTIM_KEYS)
    expected["train"].update(NEW_TRAIN_KEYS)
    changed = CHANGED.get(preset, {})
    expected["method"]["params"].update(changed.get("params", {}))
    expected["models"]["net2d"].update(changed.get("net2d", {}))
    defaults = Config().to_dict()
    expected.update({section: defaults[section] for section in NEW_SECTIONS})
    assert json.loads(json.dumps(d)) == expected


# ------------------------------------------------------------------------------------------- epoch-linear b_u


def _authors_b_u(epoch, transition, max_epochs, batch_size):
    """train.py, create_loaders: num_pseudo for a model's epoch counter ``epoch`` (its own epochs)."""
    return 0 if epoch < transition else math.floor((epoch - transition) / (max_epochs - transition) * batch_size)


def test_epoch_linear_count_is_the_authors_and_peaks_at_b_minus_1():
    # N = 4 co-training epochs per model, B = 5: floor(0), floor(1.25), floor(2.5), floor(3.75)
    assert [epoch_linear_unlabeled_count(e, 4, 5) for e in range(4)] == [0, 1, 2, 3]
    # N = 3, B = 5: floor(0), floor(5/3), floor(10/3)
    assert [epoch_linear_unlabeled_count(e, 3, 5) for e in range(3)] == [0, 1, 3]
    # the authors' schedule (500 + 3,500 epochs per model, B = 5), every epoch
    ours = [epoch_linear_unlabeled_count(e, 3500, 5) for e in range(3500)]
    assert ours == [_authors_b_u(e, 500, 4000, 5) for e in range(500, 4000)]
    assert max(ours) == 4 and ours.count(4) == 700


def _method(epochs=10, sup=4, batch_size=5, **params):
    cfg = Config.from_dict({
        "method": {"name": "mn", "params": {"sup_epochs": sup, **params}},
        "models": {"net2d": {"name": "unet2d"}, "net3d": {"name": "unet3d"}},
        "train": {"epochs": epochs, "iters_per_epoch": 2, "batch_size": batch_size},
    })
    ctx = MethodContext(num_classes=2, in_channels=1, ignore_index=None, batch_size=batch_size, epochs=epochs,
                        iters_per_epoch=2, n_labeled=2, n_unlabeled=6)
    return MN(cfg, ctx)


@pytest.mark.parametrize("first", ["net3d", "net2d"])
def test_epoch_linear_counts_each_models_own_epochs(first):
    # 6 co-training epochs: 3 per model; each model's b_u is floor(e / 3 * 5) for its e = 0, 1, 2
    method = _method(lrg="epoch-linear", cotrain_first=first)
    second = "net2d" if first == "net3d" else "net3d"
    assert [method.trained_role(e) for e in range(4, 10)] == [first, second] * 3
    assert [method.batch_split(e, 0) for e in range(4, 10)] == [(5, 0), (5, 0), (4, 1), (4, 1), (2, 3), (2, 3)]
    assert [method.batch_split(e, 0) for e in range(4)] == [(5, 0)] * 4  # stage 1: labels only


def test_an_odd_count_of_cotraining_epochs_gives_the_first_role_one_more():
    method = _method(epochs=9, lrg="epoch-linear")  # 5 co-training epochs: net3d 3, net2d 2
    assert (method.role_cotrain_epochs("net3d"), method.role_cotrain_epochs("net2d")) == (3, 2)
    assert [method.batch_split(e, 0)[1] for e in range(4, 9)] == [0, 0, 1, 2, 3]  # 3d: 0,1,3  2d: 0,2


def test_bad_cotrain_first_is_refused():
    with pytest.raises(ConfigError, match="cotrain_first"):
        _method(cotrain_first="both")


# ------------------------------------------------------------------------------------------- mn_paper itself


def test_mn_paper_runs_the_authors_schedule_and_lora():
    cfg = load_config("mn_paper")
    check_config(cfg)
    ctx = MethodContext(num_classes=2, in_channels=1, ignore_index=None, batch_size=5, epochs=cfg.train.epochs,
                        iters_per_epoch=cfg.train.iters_per_epoch, n_labeled=4, n_unlabeled=76)
    method = MN(cfg, ctx)
    assert cfg.train.iters_per_epoch == 8 and cfg.train.batch_size == 5
    assert method.cotrain_start == 500
    assert method.role_cotrain_epochs("net2d") == method.role_cotrain_epochs("net3d") == 3500
    assert [method.trained_role(e) for e in (499, 500, 501, 7499)] == [None, "net2d", "net3d", "net3d"]
    net2d = cfg.models["net2d"]
    assert (net2d.finetune, net2d.lora_rank, net2d.lora_alpha, net2d.lora_dropout, net2d.lora_train_bias_norm) == (
        "lora", 64, 64, 0.1, True)
    assert net2d.kwargs["head"] == "transposed" and net2d.kwargs["size"] == "b2"


def test_train_bias_norm_needs_lora():
    cfg = Config.from_dict({"models": {"net": {"name": "effunet", "finetune": "decoder",
                                               "lora_train_bias_norm": True}}})
    with pytest.raises(ConfigError, match="lora_train_bias_norm"):
        check_config(cfg)


# ------------------------------------------------------------------------------------------- SegFormer and LoRA


def _tiny_segformer(path, seed=1):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                             decoder_hidden_size=16, num_labels=5)
    torch.manual_seed(seed)
    SegformerForSemanticSegmentation(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return _tiny_segformer(tmp_path / "tiny")


def test_transposed_head_shape_structure_and_it_trains(tiny):
    torch.manual_seed(0)
    model = create_model("segformer", pretrained=tiny, num_classes=3, head="transposed")
    assert isinstance(model.net.decode_head.classifier, torch.nn.Identity)
    up = model.up
    assert (up.in_channels, up.out_channels, up.kernel_size, up.stride) == (16 + 3, 3, (4, 4), (4, 4))
    x = torch.randn(2, 1, 40, 36)  # padded to 64 x 64 inside, cropped back
    assert model(x).shape == (2, 3, 40, 36)
    # the decoder's 1/4-resolution features and every 4th input pixel (as the network sees it) go into the conv
    seen = {}
    up.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out))
    model.eval()
    model(x)
    assert seen["inp"].shape == (2, 19, 16, 16) and seen["out"].shape == (2, 3, 64, 64)
    padded = torch.nn.functional.pad(x, (0, 28, 0, 24))
    torch.testing.assert_close(seen["inp"][:, 16:], model.input_map(padded)[:, :, ::4, ::4])

    apply_finetuning(model, "lora", rank=2, alpha=2)
    assert up.weight.requires_grad and up.bias.requires_grad
    model.train()
    before = up.weight.detach().clone()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    assert up.weight.grad.abs().sum() > 0
    optimiser.step()
    assert not torch.equal(before, up.weight)


def test_default_head_is_unchanged(tiny):
    model = create_model("segformer", pretrained=tiny, num_classes=3)
    assert not hasattr(model, "up") and model.net.decode_head.classifier.out_channels == 3
    assert model.encoder_module_names == ("net.segformer",)
    assert model(torch.randn(1, 1, 40, 36)).shape == (1, 3, 40, 36)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_authors_lora_trains_adapters_every_bias_and_layernorm_and_the_new_head_only(tiny):
    model = create_model("segformer", pretrained=tiny, num_classes=3, head="transposed")
    apply_finetuning(model, "lora", rank=4, alpha=4, dropout=0.1, train_bias_norm=True)
    names = {n for n, _ in model.named_parameters()}
    lora = {n for n in names if "lora_" in n}
    biases = {n for n in names if n.endswith(".bias")}
    layernorms = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm)
                  for p in ("weight", "bias")}
    assert lora and layernorms and biases
    assert _trainable(model) == lora | biases | layernorms | {"up.weight"}
    assert bias_and_layernorm_names(model) == biases | layernorms
    # by structure (module names differ between transformers 4.x and 5.x): every Linear/Conv2d weight of the
    # pretrained network (encoder and decode head, LoRA's base layers included) is frozen, every bias trains; the
    # decode head's BatchNorm trains its bias only, as peft's bias="all" leaves it in the authors' code
    weights = [f"{m}.weight" for m, mod in model.net.named_modules()
               if isinstance(mod, torch.nn.Linear | torch.nn.Conv2d) and "lora_" not in m]
    assert len(weights) > 20 and not {f"net.{w}" for w in weights} & _trainable(model)
    assert any(".base_layer.weight" in w for w in weights)
    assert "net.decode_head.batch_norm.bias" in _trainable(model)
    assert "net.decode_head.batch_norm.weight" not in _trainable(model)
    assert "net.decode_head.linear_fuse.weight" in names
    dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(isinstance(d, torch.nn.Dropout) and d.p == 0.1 for d in dropouts)
    assert model.finetuning["train_bias_norm"] is True


def test_default_lora_trains_adapters_and_the_decode_head_only(tiny):
    model = create_model("segformer", pretrained=tiny, num_classes=3)
    apply_finetuning(model, "lora", rank=4, alpha=4)
    encoder = {n for n, _ in model.named_parameters() if n.startswith("net.segformer.")}
    assert _trainable(model) & encoder == {n for n in encoder if "lora_" in n}
    assert {n for n, _ in model.named_parameters() if n.startswith("net.decode_head.")} <= _trainable(model)
    assert "train_bias_norm" not in model.finetuning


def test_the_config_keys_reach_the_model(tiny):
    mcfg = ModelConfig(name="segformer", kwargs={"pretrained": tiny, "head": "transposed"}, finetune="lora",
                       lora_rank=4, lora_alpha=4, lora_dropout=0.1, lora_train_bias_norm=True)
    model = build_model(mcfg, in_channels=1, num_classes=3)  # SliceWise around the 2D model
    inner = model.inner
    assert inner.finetuning == {"strategy": "lora", "rank": 4, "alpha": 4, "dropout": 0.1,
                                "target_modules": inner.lora_target_modules, "train_bias_norm": True}
    layernorm = next(n for n, m in inner.named_modules() if isinstance(m, torch.nn.LayerNorm))
    assert {f"{layernorm}.weight", f"{layernorm}.bias"} <= _trainable(inner)
    assert model(torch.randn(1, 1, 32, 32, 3)).shape == (1, 3, 32, 32, 3)
