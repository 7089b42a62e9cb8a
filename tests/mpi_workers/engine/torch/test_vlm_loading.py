"""Loading vision-language checkpoints: every tensor layout in the wild, the llava config's
decoder and vision facts, and the vision encoder's feature selection (a list of layers,
SigLIP with the "default" strategy, no projector bias) against transformers'
`get_image_features` on random tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from contract.vlm import vlm_info_from_config
from mpi_workers.engine.torch.loader import load_weights
from mpi_workers.engine.torch.model import LlamaForCausalLM
from mpi_workers.engine.torch.model_config import load_model_config, parse_vlm_config
from mpi_workers.engine.torch.vision import load_vision_encoder

# stored name prefix of each part, per layout: (tower, projector, decoder, head)
LAYOUTS = {
    "transformers5": ("model.vision_tower.", "model.multi_modal_projector.",
                      "model.language_model.", "lm_head."),
    "transformers5-vision_model": ("model.vision_tower.vision_model.",
                                   "model.multi_modal_projector.", "model.language_model.",
                                   "lm_head."),
    "original-vision_model": ("vision_tower.vision_model.", "multi_modal_projector.",
                              "language_model.model.", "language_model.lm_head."),
}  # fmt: skip


def relayout(source: Path, target: Path, layout: str) -> Path:
    """`source` (the original LLaVA layout, as transformers saves it) with its tensors
    renamed to `layout`."""
    from safetensors.torch import load_file, save_file

    tower, projector, decoder, head = LAYOUTS[layout]
    target.mkdir()
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    renamed = {}
    for name, tensor in load_file(str(source / "model.safetensors")).items():
        for old, new in (("vision_tower.", tower), ("multi_modal_projector.", projector),
                         ("language_model.model.", decoder), ("language_model.lm_head.", head)):
            if name.startswith(old):
                name = new + name[len(old):]
                break
        renamed[name] = tensor
    save_file(renamed, str(target / "model.safetensors"))
    return target


def decoder_state(model_dir: Path) -> dict[str, torch.Tensor]:
    model = LlamaForCausalLM(load_model_config(model_dir), 64)
    load_weights(model, model_dir)
    return model.state_dict()


def encoder_state(model_dir: Path) -> dict[str, torch.Tensor]:
    cfg = load_model_config(model_dir)
    assert cfg.vision is not None
    encoder = load_vision_encoder(model_dir, cfg.vision, torch.device("cpu"), torch.float32)
    return encoder.state_dict()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_checkpoint_layout_loads_the_same(tiny_vlm_dir: Path, tmp_path: Path, layout):
    other = relayout(tiny_vlm_dir, tmp_path / layout, layout)
    for state in (decoder_state, encoder_state):
        want, got = state(tiny_vlm_dir), state(other)
        assert want.keys() == got.keys()
        for name in want:
            assert torch.equal(want[name], got[name]), name


def test_llava_config_gives_decoder_and_vision_facts(tiny_vlm_dir: Path) -> None:
    cfg = load_model_config(tiny_vlm_dir)
    raw = json.loads((tiny_vlm_dir / "config.json").read_text())
    vocab = raw["text_config"]["vocab_size"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (64, 2, vocab)
    assert cfg.vision is not None
    assert cfg.vision.tokens_per_image == vlm_info_from_config(raw).tokens_per_image == 64
    assert cfg.vision.layers_to_run == 1  # feature layer -2 of 2: the last layer never runs


def test_partial_text_config_takes_the_decoder_defaults() -> None:
    """llava-1.5's config.json spells only what differs from Llama's defaults."""
    raw = {
        "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
        "text_config": {"model_type": "llama", "vocab_size": 32064,
                        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024,
                          "image_size": 336, "patch_size": 14, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24,
                          "projection_dim": 768},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    }  # fmt: skip
    cfg = parse_vlm_config(raw)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (4096, 32, 32)
    assert cfg.intermediate_size == 11008 and cfg.vocab_size == 32064
    assert cfg.vision is not None and cfg.vision.tokens_per_image == 576


def test_unknown_projector_activation_is_named() -> None:
    raw = {"model_type": "llava", "image_token_index": 5, "projector_hidden_act": "swish2",
           "text_config": {"model_type": "llama", "hidden_size": 64}}  # fmt: skip
    with pytest.raises(ValueError, match="projector_hidden_act 'swish2'"):
        parse_vlm_config(raw)


def write_llava(path: Path, tower: str, **llava: object) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision_args = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
    vision = (CLIPVisionConfig if tower == "clip" else SiglipVisionConfig)(**vision_args)
    text = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=99, **llava)
    torch.manual_seed(3)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # random, not the init's zeros/ones: every parameter matters
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(
    ("tower", "llava"),
    [
        ("clip", dict(vision_feature_layer=[-3, -1], multimodal_projector_bias=False,
                      projector_hidden_act="gelu_pytorch_tanh")),
        ("siglip", dict(vision_feature_select_strategy="default", vision_feature_layer=-1)),
        ("clip", dict(vision_feature_select_strategy="full", vision_feature_layer=0)),
    ],
)  # fmt: skip
def test_feature_selection_matches_transformers(tmp_path: Path, tower: str, llava: dict):
    from transformers import LlavaForConditionalGeneration

    model_dir = write_llava(tmp_path / "llava", tower, **llava)
    cfg = load_model_config(model_dir)
    assert cfg.vision is not None
    ours = load_vision_encoder(model_dir, cfg.vision, torch.device("cpu"), torch.float32)
    ref = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.model.get_image_features(
            pixels, vision_feature_layer=ref.config.vision_feature_layer,
            vision_feature_select_strategy=ref.config.vision_feature_select_strategy,
            output_hidden_states=True,
        ).pooler_output  # fmt: skip
    got = ours.encode(pixels)
    info = vlm_info_from_config(json.loads((model_dir / "config.json").read_text()))
    assert got.shape == (2, cfg.vision.tokens_per_image, 48)
    assert info is not None and info.tokens_per_image == cfg.vision.tokens_per_image
    torch.testing.assert_close(got, torch.stack(list(want)), rtol=1e-5, atol=1e-5)
