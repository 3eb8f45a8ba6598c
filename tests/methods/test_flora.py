"""FLoRA: where the LoRA adapters go, what trains and travels, and the peft export."""

from __future__ import annotations

import copy
import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from flora_lightning.methods import LoraSettings
from flora_lightning.offline.digits import CLASS_NAMES
from flora_lightning.rundir.checkpoint import load_state

TEMPLATE = "a photo of the digit {}."
WIDTH = 64  # tiny CLIP hidden size of both towers
F32_UNIT = 2.0**-24  # float32 unit roundoff u


def lora_modules(module) -> set[str]:
    """Names (relative to the CLIPModel) of the modules peft wrapped with LoRA."""
    base = module.clip_model()
    return {name for name, sub in base.named_modules() if isinstance(sub, LoraLayer)}


def layer_names(tower: str, projections: list[str], num_layers: int) -> set[str]:
    parent = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "out_proj": "self_attn",
        "fc1": "mlp",
        "fc2": "mlp",
    }
    return {
        f"{tower}.encoder.layers.{i}.{parent[p]}.{p}"
        for i, p in itertools.product(range(num_layers), projections)
    }


@pytest.fixture(scope="module")
def num_layers(tiny_clip) -> dict[str, int]:
    config = tiny_clip.model.config
    return {
        "text_model": config.text_config.num_hidden_layers,
        "vision_model": config.vision_config.num_hidden_layers,
    }


def test_default_targets_text_out_proj_only(make_flora, num_layers):
    model = make_flora()
    wrapped = lora_modules(model)
    # ViT-B/32 has 12 text layers; the tiny CLIP has 2: one adapter per text out_proj.
    assert num_layers["text_model"] == 2
    assert wrapped == layer_names("text_model", ["out_proj"], 2)
    assert not any(name.startswith("vision_model") for name in wrapped)
    assert re.fullmatch(
        LoraSettings().target_regex(), "text_model.encoder.layers.11.self_attn.out_proj"
    )
    assert not re.fullmatch(
        LoraSettings().target_regex(), "vision_model.encoder.layers.0.self_attn.out_proj"
    )


@pytest.mark.parametrize(
    ("tower", "targets", "towers"),
    [
        ("both", ["out_proj"], ["text_model", "vision_model"]),
        ("text", ["q_proj", "k_proj", "v_proj"], ["text_model"]),
        ("both", ["q_proj", "v_proj", "fc1", "fc2"], ["text_model", "vision_model"]),
        ("vision", ["fc2"], ["vision_model"]),
    ],
)
def test_tower_and_target_choice(make_flora, num_layers, tower, targets, towers):
    model = make_flora(LoraSettings(rank=2, targets=targets, tower=tower))
    expected = set().union(*(layer_names(t, targets, num_layers[t]) for t in towers))
    assert lora_modules(model) == expected
    # Each adapted 64x64 (attention) or 64x128 / 128x64 (mlp) projection adds r*(in+out).
    sizes = {
        "q_proj": 2 * WIDTH,
        "k_proj": 2 * WIDTH,
        "v_proj": 2 * WIDTH,
        "out_proj": 2 * WIDTH,
        "fc1": 3 * WIDTH,
        "fc2": 3 * WIDTH,
    }
    per_layer = sum(2 * sizes[t] for t in targets)
    assert model.num_trainable_parameters() == sum(num_layers[t] for t in towers) * per_layer
    assert model.image_encoder_frozen == (tower == "text")


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_trainable_parameters_are_the_adapters(make_flora, rank):
    model = make_flora(LoraSettings(rank=rank))
    names = [name for name, _ in model.trainable_named_parameters()]
    assert names and all("lora_" in name for name in names)
    assert sorted(names) == sorted(model.communicated_state())
    # 2 layers x (A: r x 64 + B: 64 x r)
    assert model.num_trainable_parameters() == 2 * 2 * rank * WIDTH
    shapes = {n: tuple(p.shape) for n, p in model.trainable_named_parameters()}
    assert {s for n, s in shapes.items() if "lora_A" in n} == {(rank, WIDTH)}
    assert {s for n, s in shapes.items() if "lora_B" in n} == {(WIDTH, rank)}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not any("lora_" in n for n in frozen)
    assert any("vision_model" in n for n in frozen)


def test_lora_starts_as_identity(make_flora, tiny_clip):
    """B = 0 at init: the adapted model computes exactly the base model's text features."""
    model = make_flora()
    model.configure_task(CLASS_NAMES, TEMPLATE)
    for name, param in model.trainable_named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(param) == 0
    with torch.no_grad():
        base = tiny_clip.model.get_text_features(
            input_ids=model.caption_ids, attention_mask=model.caption_mask
        )
        base = base if torch.is_tensor(base) else base.pooler_output
        torch.testing.assert_close(model.class_text_features(), F.normalize(base, dim=-1))


def test_class_captions_give_distinct_features(make_flora):
    model = make_flora()
    model.configure_task(CLASS_NAMES, TEMPLATE)
    with torch.no_grad():
        feats = model.class_text_features()
    assert feats.shape == (10, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(10))
    distance = torch.cdist(feats, feats)[~torch.eye(10, dtype=torch.bool)]
    # Pooling a fixed position (e.g. 0, the BOS, under the causal mask) would give distance 0
    # for every pair; the shared template keeps them close (cosine ~0.97-0.996) but apart.
    assert distance.min() > 0.05
    assert torch.linalg.matrix_rank(feats) == 10


def test_text_pooling_reads_the_eos_token(make_flora, tiny_clip):
    model = make_flora()
    model.configure_task(CLASS_NAMES, TEMPLATE)
    eos = tiny_clip.model.config.text_config.eos_token_id
    assert tiny_clip.tokenizer.eos_token_id == eos
    ids, mask = model.caption_ids, model.caption_mask
    eos_position = (ids == eos).int().argmax(dim=-1)
    # Captions differ in length ("one." vs "seven."), so EOS sits at different positions.
    assert len(set(eos_position.tolist())) > 1
    torch.testing.assert_close(eos_position, mask.sum(dim=-1) - 1)
    clip = model.clip_model()
    with torch.no_grad():
        hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = clip.text_projection(hidden[torch.arange(len(ids)), eos_position])
        got = clip.get_text_features(input_ids=ids, attention_mask=mask)
    got = got if torch.is_tensor(got) else got.pooler_output
    torch.testing.assert_close(got, expected)


def test_class_text_features_for_labels_match_all_classes(make_flora):
    model = make_flora()
    model.configure_task(CLASS_NAMES, TEMPLATE)
    labels = torch.tensor([7, 0, 7, 3, 9, 0])
    with torch.no_grad():
        per_label = model.class_text_features(labels)
        every = model.class_text_features()
    torch.testing.assert_close(per_label, every[labels])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "model.lora.rank"),
        ({"rank": -2}, "model.lora.rank"),
        ({"alpha": 0.0}, "model.lora.alpha"),
        ({"alpha": -32.0}, "model.lora.alpha"),
        ({"targets": ["qkv"]}, "model.lora.targets"),
        ({"targets": ["out_proj", "lm_head"]}, "model.lora.targets"),
        ({"targets": []}, "model.lora.targets"),
        ({"dropout": 1.0}, "model.lora.dropout"),
        ({"tower": "audio"}, "model.lora.tower"),
        ({"init": "zeros"}, "model.lora.init"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as err:
        LoraSettings(**kwargs)
    assert str(err.value).startswith(field)
    value = next(iter(kwargs.values()))
    shown = value[-1] if isinstance(value, list) and value else value
    assert str(shown) in str(err.value)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.device.type != "meta"}


@pytest.mark.parametrize("cache_features", [False, True])
def test_one_round_changes_only_the_adapters(make_flora, datamodule, make_loop, cache_features):
    model = make_flora()
    before = snapshot(model)
    make_loop(rounds=1, cache_features=cache_features).fit(model, datamodule)
    after = snapshot(model)
    adapters = {n for n in before if "lora_" in n}
    assert len(adapters) == 4
    for name in adapters:
        assert not torch.equal(before[name], after[name]), f"{name} did not train"
    frozen = [n for n in before if n not in adapters and n in after]
    if not cache_features:
        assert set(after) == set(before)
    assert sum("text_model" in n for n in frozen) == sum("text_model" in n for n in before) - 4
    for name in frozen:
        assert torch.equal(before[name], after[name]), f"frozen {name} changed"


def test_peft_export_loads_with_stock_peft(make_flora, datamodule, make_loop, offline_assets):
    from peft import PeftModel
    from transformers import CLIPModel

    from flora_lightning.offline import tiny_clip_path

    model = make_flora()
    loop = make_loop(rounds=2)
    loop.fit(model, datamodule)
    final = loop.run_dir / "final"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_path()), final)
    loaded.eval()
    exported = {
        f"clip.{name}": p.detach() for name, p in loaded.named_parameters() if "lora_" in name
    }
    global_state = load_state(loop.run_dir / "checkpoints" / "round_002.safetensors")
    assert set(exported) == set(global_state) == set(model.communicated_state())
    for name, tensor in global_state.items():
        assert torch.equal(exported[name], tensor), name
    # A non-trivial adapter: B was trained away from its zero init.
    assert any("lora_B" in n and torch.count_nonzero(t) for n, t in global_state.items())

    with torch.no_grad():
        ours = model.class_text_features()
        theirs = loaded.get_text_features(
            input_ids=model.caption_ids, attention_mask=model.caption_mask
        )
        theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
        base = CLIPModel.from_pretrained(tiny_clip_path()).get_text_features(
            input_ids=model.caption_ids, attention_mask=model.caption_mask
        )
        base = base if torch.is_tensor(base) else base.pooler_output
    # The same get_text_features on bitwise-equal weights in one process: the same kernels in
    # the same order on any CPU, so exactly equal (a different path would be a real change).
    torch.testing.assert_close(F.normalize(theirs, dim=-1), ours, rtol=0, atol=0)
    assert (F.normalize(base, dim=-1) - ours).abs().max() > 1e-4  # the adapters do something


def test_building_the_tiny_clip_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """LoRA A is drawn from the global RNG right after the backbone loads: a cold cache
    (model built in-process) must give the same init as a warm one, or results depend on
    whether the cache existed."""
    from flora_lightning.offline import tiny_clip

    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiny_clip, "PRETRAIN_STEPS", 2)
    draws, paths = [], []
    for _ in ("cold", "warm"):
        torch.manual_seed(1234)
        paths.append(tiny_clip.tiny_clip_path())
        draws.append(torch.randn(8))
    assert paths[0] == paths[1] and paths[0].parent == tmp_path
    assert (paths[0] / "config.json").is_file()
    assert torch.equal(draws[0], draws[1])


def test_freeze_a_sends_only_b_and_fedavg_is_exact_on_the_product(
    make_flora, datamodule, make_loop
):
    """With A frozen (FFA-LoRA), mean(B_k) A == mean(B_k A): the aggregated update is exact."""
    from flora_lightning.callbacks import Callback

    class Collect(Callback):
        def __init__(self) -> None:
            self.updates = []

        def on_client_fit_end(self, loop, model, update) -> None:
            self.updates.append(update)

    model = make_flora(LoraSettings(freeze_a=True))
    names = [n for n, _ in model.trainable_named_parameters()]
    assert names and all("lora_B" in n for n in names) and len(names) == 2  # 2 text layers
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    collect = Collect()
    summary = make_loop(rounds=1, callbacks=[collect]).fit(model, datamodule)
    assert summary["bytes_per_client_per_direction"] == 2 * 64 * 2 * 4  # B only: 64x2 fp32 x 2

    params = dict(model.named_parameters())
    weights = torch.tensor([float(u.num_samples) for u in collect.updates])
    weights = weights / weights.sum()
    for b_name in names:
        a = params[b_name.replace("lora_B", "lora_A")]
        assert torch.equal(a, a_before[b_name.replace("lora_B", "lora_A")])  # A never moved
        products = torch.stack([u.state[b_name] @ a for u in collect.updates])
        expected = (weights[:, None, None] * products).sum(0)
        assert not torch.allclose(expected, torch.zeros_like(expected))  # B did train
        # Both sides are float32 sums of products in another order (FedAvg sums B_k in float64,
        # then one rounding): per element each is within gamma_m * M of the exact value, with
        # M = sum_k w_k |B_k| |A| and m = r + K + 3 roundings (gamma_m = m u / (1 - m u)).
        magnitude = (
            weights[:, None, None] * torch.stack([u.state[b_name] for u in collect.updates]).abs()
        ).sum(0) @ a.abs()
        m = a.shape[0] + len(collect.updates) + 3
        gamma = m * F32_UNIT / (1 - m * F32_UNIT)
        error = (params[b_name] @ a - expected).abs()
        assert (error <= 2 * gamma * magnitude).all(), (error.max(), (2 * gamma * magnitude).max())


# ------------------------------------------------ the released code's init, scaling, eval
@pytest.fixture(scope="module")
def wide_text_clip():
    """A CLIP whose text tower has ViT-B/32's width and depth (512 x 12) and little else."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config={
            "hidden_size": 512,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "intermediate_size": 16,
            "vocab_size": 64,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    return CLIPModel(config)


def lora_a_values(wide_text_clip, seed: int, **lora) -> torch.Tensor:
    from flora_lightning.clip.backbone import CLIPBundle
    from flora_lightning.methods import FLoRA
    from flora_lightning.methods.base import build_model_from_bundle

    settings = LoraSettings(targets=["q_proj", "out_proj"], **lora)
    torch.manual_seed(seed)
    bundle = CLIPBundle(copy.deepcopy(wide_text_clip), tokenizer=None, image_transform=None)
    model = build_model_from_bundle(FLoRA("unused", lora=settings), bundle)
    a = [p.detach().flatten() for n, p in model.trainable_named_parameters() if "lora_A" in n]
    b = [p for n, p in model.trainable_named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in b)  # B = 0, so the model starts unchanged
    return torch.cat(a)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_paper_init_draws_a_with_std_one_over_sqrt_rank(wide_text_clip, rank):
    assert LoraSettings().init == "paper"
    # 12 layers x 2 projections x 512 x r >= 24,576 draws; the std estimate's relative error
    # is about 1 / sqrt(2 n) = 0.45%, so 2% is a real bound.
    a = lora_a_values(wide_text_clip, seed=0, rank=rank)[:24_576]
    assert a.numel() == 24_576
    assert a.std().item() == pytest.approx(1 / rank**0.5, rel=0.02)
    assert abs(a.mean().item()) < 0.03
    # peft's "gaussian" (kept as an option) is std 1/r: not the released init.
    peft_gaussian = lora_a_values(wide_text_clip, seed=0, rank=rank, init="gaussian")[:24_576]
    assert peft_gaussian.std().item() == pytest.approx(1 / rank, rel=0.02)


def test_paper_init_is_seeded(wide_text_clip):
    first = lora_a_values(wide_text_clip, seed=3)
    assert torch.equal(first, lora_a_values(wide_text_clip, seed=3))
    assert not torch.equal(first, lora_a_values(wide_text_clip, seed=4))


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_scaling_is_32_at_every_rank_unless_alpha_is_set(make_flora, rank):
    def scalings(lora: LoraSettings) -> set[float]:
        model = make_flora(lora)
        layers = [m for m in model.clip.modules() if isinstance(m, LoraLayer)]
        assert layers
        return {layer.scaling["default"] for layer in layers}

    assert LoraSettings(rank=rank).scaling == 32.0
    assert scalings(LoraSettings(rank=rank)) == {32.0}
    # With lora.alpha set, peft's alpha / r: 64 matches the paper only at r = 2.
    assert scalings(LoraSettings(rank=rank, alpha=64.0)) == {64.0 / rank}


def test_evaluation_similarity_is_fp32_under_bf16_autocast(make_flora):
    """Find image/class features whose bf16 logits flip the argmax; evaluation must not."""
    model = make_flora()
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(4096, WIDTH, generator=generator), dim=-1)
    classes = F.normalize(torch.randn(10, WIDTH, generator=generator), dim=-1)
    scale = model.clip.logit_scale.exp()
    exact = scale * images @ classes.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = scale * images @ classes.T  # what an autocast matmul gives
        logits = model.evaluate_batch(images, classes)  # cached features pass straight through
    flipped = exact.argmax(1) != rounded.argmax(1)
    assert rounded.dtype == torch.bfloat16 and flipped.any()  # near-ties do flip in bf16
    assert logits.dtype == torch.float32
    # fp32 means within the float32 dot-product bound of the exact (float64) logits:
    # |fl(s x.y) - s x.y| <= gamma_{n+1} s |x|.|y| (n = WIDTH products, one scaling);
    # bf16 misses it by ~2**-8 / 2**-24 times. Argmax must agree where the exact top-2 margin
    # exceeds twice that bound, and the rows bf16 flips are among them.
    exact64 = scale.double() * images.double() @ classes.double().T
    gamma = (WIDTH + 1) * F32_UNIT / (1 - (WIDTH + 1) * F32_UNIT)
    bound = gamma * scale.double() * images.double().abs() @ classes.double().abs().T
    assert ((logits.double() - exact64).abs() <= bound).all()
    top2 = exact64.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * bound.max(dim=1).values
    assert (flipped & decided).any()  # the check below would catch bf16's flips
    assert torch.equal(logits.argmax(1)[decided], exact64.argmax(1)[decided])
