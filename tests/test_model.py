"""EchoCareMIM: shapes, no leak through masked pixels, mask token, checkpointing, export, presets."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch

from echocare_dist.config import load_config
from echocare_dist.models.archs import swin_layout
from echocare_dist.models import build_model, param_groups

NUM_CLASSES = 7
BATCH = 2


def tiny_model_cfg(**changes):
    cfg = load_config("tiny_cpu").model
    return dataclasses.replace(cfg, **changes)


VARIANTS = [
    pytest.param(dict(decoder="multiscale"), id="p2-multiscale"),
    pytest.param(dict(decoder="linear"), id="p2-linear"),
    pytest.param(dict(decoder="multiscale", patch_size=4), id="p4-multiscale"),
    pytest.param(dict(decoder="linear", patch_size=4), id="p4-linear"),
]


def make_batch(cfg, seed=0, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    grid = cfg.img_size // cfg.patch_size
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    mask = (torch.rand(batch, grid, grid, generator=g) < 0.5).to(torch.uint8)
    return x, mask


def pixel_mask(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """(B,1,H,W) bool: pixels inside masked tokens (test helper only; the model never does this)."""
    return mask.bool().repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)


@pytest.mark.parametrize("changes", VARIANTS)
def test_shapes_and_range(changes):
    cfg = tiny_model_cfg(**changes)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    x, mask = make_batch(cfg)
    out = model(x, mask)
    assert out["recon"].shape == x.shape and out["recon"].dtype == torch.float32
    assert out["recon"].min() >= 0 and out["recon"].max() <= 1
    assert out["logits"].shape == (BATCH, NUM_CLASSES)

    layout = swin_layout(cfg)
    feats = model.encode(x, mask)
    grid = cfg.img_size // cfg.patch_size
    assert [tuple(f.shape) for f in feats] == [
        (BATCH, grid >> i, grid >> i, layout["embed_dim"] * 2 ** i) for i in range(4)]


def test_hie_head_switch_and_bad_inputs():
    cfg = tiny_model_cfg(hie_head=False)
    model = build_model(cfg, NUM_CLASSES)
    assert model.hie_head is None
    x, mask = make_batch(cfg)
    assert model(x, mask)["logits"] is None
    with pytest.raises(ValueError, match=r"mask must be \(B, 32, 32\)"):
        model(x, mask[:, :16, :16])
    with pytest.raises(ValueError, match="input must be"):
        model(x[:, :, :32, :32], mask)


def test_drop_path_rate_reaches_encoder():
    cfg = tiny_model_cfg(drop_path_rate=0.3)
    model = build_model(cfg, NUM_CLASSES)
    rates = [m.drop_prob for m in model.encoder.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.3)


@pytest.mark.parametrize("changes", VARIANTS)
def test_no_leak_from_masked_pixels(changes):
    """Pixels under masked tokens must not influence recon or logits; visible pixels must."""
    cfg = tiny_model_cfg(**changes)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES).eval()
    x, mask = make_batch(cfg)
    hidden = pixel_mask(mask, cfg.patch_size)
    assert 0 < hidden.float().mean() < 1
    noise = torch.randn_like(x) * 5
    with torch.no_grad():
        ref = model(x, mask)
        inside = model(torch.where(hidden, x + noise, x), mask)
        outside = model(torch.where(hidden, x, x + noise), mask)
    torch.testing.assert_close(inside["recon"], ref["recon"], rtol=0, atol=0)
    torch.testing.assert_close(inside["logits"], ref["logits"], rtol=0, atol=0)
    assert (outside["recon"] - ref["recon"]).abs().max() > 1e-4
    assert (outside["logits"] - ref["logits"]).abs().max() > 1e-5


def test_mask_token_receives_gradient_only_when_used():
    cfg = tiny_model_cfg()
    model = build_model(cfg, NUM_CLASSES)
    x, mask = make_batch(cfg)
    out = model(x, mask)
    (out["recon"].mean() + out["logits"].mean()).backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0

    model.zero_grad(set_to_none=False)
    out = model(x, torch.zeros_like(mask))
    (out["recon"].mean() + out["logits"].mean()).backward()
    assert model.mask_token.grad.abs().sum() == 0


def _saved_activation_bytes(model, x, mask) -> tuple[dict, int]:
    """Run forward, counting the distinct non-parameter storages autograd keeps for backward."""
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, mask)
    return out, sum(seen.values())


def test_grad_checkpointing_same_results_less_memory():
    cfg = tiny_model_cfg(drop_path_rate=0.2)
    torch.manual_seed(0)
    plain = build_model(cfg, NUM_CLASSES).train()
    ckpt = build_model(dataclasses.replace(cfg, grad_checkpointing=True), NUM_CLASSES).train()
    ckpt.load_state_dict(plain.state_dict())
    x, mask = make_batch(cfg, batch=4)

    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same drop-path draws in both runs
        out, saved = _saved_activation_bytes(model, x, mask)
        (out["recon"].square().mean() + out["logits"].square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out, saved, grads))
    (out_a, saved_a, grads_a), (out_b, saved_b, grads_b) = results

    torch.testing.assert_close(out_b["recon"], out_a["recon"])
    torch.testing.assert_close(out_b["logits"], out_a["logits"])
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)
    # Checkpointing keeps only each block's input: far less than all of its intermediates.
    assert saved_b < 0.5 * saved_a, (saved_a, saved_b)


def test_encoder_state_dict_loads_into_plain_timm():
    """What export does: a fresh timm model from the config loads the encoder strictly and agrees."""
    cfg = tiny_model_cfg(fused_attn=False)  # timm's own default kernel for Swin: bit-identical
    model = build_model(cfg, NUM_CLASSES).eval()
    layout = swin_layout(cfg)
    plain = timm.create_model(cfg.arch, pretrained=False, img_size=cfg.img_size, patch_size=cfg.patch_size,
                              window_size=cfg.window_size, in_chans=cfg.in_chans, num_classes=0,
                              drop_path_rate=cfg.drop_path_rate, embed_dim=layout["embed_dim"],
                              depths=layout["depths"], num_heads=layout["num_heads"]).eval()
    plain.load_state_dict(model.encoder.state_dict(), strict=True)
    x, _ = make_batch(cfg)
    with torch.no_grad():
        ours = model.encode(x)[-1]
        theirs = plain.forward_features(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("preset,low,high", [
    ("echocare_swin_l", 193e6, 197e6),     # SPEC 2: Swin-L ~195 M
    ("echocare_swin_l_p4", 193e6, 197e6),
    ("echocare_swin_b", 85e6, 89e6),
])
def test_full_presets_build_on_meta(preset, low, high):
    cfg = load_config(preset).model
    with torch.device("meta"):
        model = build_model(cfg, 100)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)  # nothing allocated
    encoder_params = sum(p.numel() for p in model.encoder.parameters())
    assert low < encoder_params < high, encoder_params
    assert model.encoder.patch_embed.proj.kernel_size == (cfg.patch_size, cfg.patch_size)
    assert model.encoder.layers[0].grad_checkpointing == cfg.grad_checkpointing


def test_param_groups_classify_swin_params():
    cfg = tiny_model_cfg()
    model = build_model(cfg, NUM_CLASSES)
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[i] for i in s} for s in ids)
    assert not decay & no_decay and decay | no_decay == set(names.values())

    assert "mask_token" in no_decay
    assert any("relative_position_bias_table" in n for n in no_decay)
    assert not any("relative_position_bias_table" in n for n in decay)
    assert not any(n.endswith(".bias") for n in decay)
    assert {"encoder.norm.weight", "encoder.patch_embed.norm.weight", "hie_head.norm.weight"} <= no_decay
    assert {"encoder.layers.0.blocks.0.attn.qkv.weight", "encoder.layers.0.blocks.0.mlp.fc1.weight",
            "encoder.layers.1.downsample.reduction.weight", "encoder.patch_embed.proj.weight",
            "hie_head.fc.weight", "decoder.predict.weight"} <= decay
    for n in decay:
        assert dict(model.named_parameters())[n].dim() >= 2, n


def test_param_groups_read_zero3_true_shape():
    # Under ZeRO-3 a weight is a flat shard; its real shape (ds_shape) decides, not its 1-D storage.
    layer = torch.nn.Linear(4, 4)
    layer.weight.data = layer.weight.data.flatten()
    layer.weight.ds_shape = torch.Size([4, 4])
    groups = param_groups(layer, weight_decay=0.1)
    assert groups[0]["params"] == [layer.weight] and groups[1]["params"] == [layer.bias]


def test_fused_attention_matches_explicit_softmax():
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    fused = build_model(cfg, NUM_CLASSES).eval()
    explicit = build_model(dataclasses.replace(cfg, fused_attn=False), NUM_CLASSES).eval()
    explicit.load_state_dict(fused.state_dict())
    attn = [m for m in fused.modules() if type(m).__name__ == "WindowAttention"]
    assert attn and all(m.fused_attn for m in attn)
    assert not any(m.fused_attn for m in explicit.modules() if type(m).__name__ == "WindowAttention")
    x, mask = make_batch(cfg)
    with torch.no_grad():
        a, b = fused(x, mask), explicit(x, mask)
    torch.testing.assert_close(a["recon"], b["recon"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)


def test_predict_anatomy_is_coherent_on_model_output(ontology):
    from echocare_dist.kernels import coherent_probs_reference, index_table
    cfg = tiny_model_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, len(ontology)).eval()
    with torch.no_grad():  # a trained head is confident; the init one gives logits near 0
        model.hie_head.fc.weight.normal_(0, 1.0)
    x, _ = make_batch(cfg, batch=4)
    pred = model.predict_anatomy(x, ontology, impl="torch")
    assert pred.names == ontology.names and pred.probs.shape == (4, len(ontology))
    assert pred.probs.dtype == torch.float32 and not pred.probs.requires_grad

    with torch.no_grad():
        logits = model.hie_head(model.encode(x)[-1]).float()
    desc = index_table(ontology.descendant_table, "cpu")
    torch.testing.assert_close(pred.probs, coherent_probs_reference(logits, desc), rtol=0, atol=0)
    raw = torch.sigmoid(logits)
    edges = [(p, v) for v, parents in enumerate(ontology.parents) for p in parents]
    assert any(bool((raw[:, v] > raw[:, p]).any()) for p, v in edges)  # the plain head is not coherent

    for t in torch.quantile(pred.probs, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])).tolist() + [0.5]:
        for present in pred.present(t):
            kept = {ontology.node(n) for n in present}
            assert all(p in kept for v in kept for p in ontology.parents[v]), t
    per_image = pred.per_image()
    assert len(per_image) == 4 and per_image[0][ontology.names[0]] == pytest.approx(float(pred.probs[0, 0]))


def test_predict_anatomy_refuses_a_foreign_ontology_or_no_head(ontology):
    cfg = tiny_model_cfg()
    x, _ = make_batch(cfg)
    with pytest.raises(ValueError, match=f"descendant_table has {len(ontology)} rows but logits have C={NUM_CLASSES}"):
        build_model(cfg, NUM_CLASSES).predict_anatomy(x, ontology)
    with pytest.raises(ValueError, match="model.hie_head=false"):
        build_model(tiny_model_cfg(hie_head=False), NUM_CLASSES).predict_anatomy(x, ontology)
