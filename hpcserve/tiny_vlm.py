"""`hpcserve model prepare --tiny-vlm`: a tiny vision-language model with RANDOM weights, for
trying the multimodal path end to end (its answers are noise, by construction).

No VLM weights can be downloaded here, so this builds a LLaVA-layout folder with transformers
from a config (`LlavaForConditionalGeneration`: a CLIP or SigLIP tower, a projector, a Llama
decoder) and saves it with its processor, the default model's tokenizer plus an `<image>`
token, and a ChatML chat template that places one `<image>` per image part. Tests compare
the built-in engine against transformers' own forward on such folders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from contract.config import prepared_model_dir

logger = logging.getLogger(__name__)

Tower = Literal["clip", "siglip"]
IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
PATCH_SIZE = 8

# ChatML (SmolLM2's own layout) with image parts: one IMAGE_TOKEN per image, where it stands.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_vlm_dir(tower: Tower = "clip") -> Path:
    return prepared_model_dir("tiny-vlm-siglip" if tower == "siglip" else "tiny-vlm")


def prepare_tiny_vlm(
    target: Path | None = None, tower: Tower = "clip", force: bool = False, seed: int = 0
) -> Path:
    """Build the tiny random VLM once (idempotent: a finished folder is returned as is)."""
    from hpcserve.model_prepare import build_folder, is_prepared, prepare_default_model

    target = Path(target) if target is not None else tiny_vlm_dir(tower)
    if is_prepared(target) and not force:
        return target
    tokenizer_dir = prepare_default_model()
    build_folder(
        target, lambda staging: _build(staging, tokenizer_dir, tower, seed),
        f"random weights, seed {seed}, tower {tower}",
    )  # fmt: skip
    logger.info("tiny random VLM (%s tower) in %s", tower, target)
    return target


def _build(out_dir: Path, tokenizer_dir: Path, tower: Tower, seed: int) -> None:
    # transformers is heavy and only this one-time step needs it.
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_args = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )  # fmt: skip
    if tower == "clip":
        vision = CLIPVisionConfig(projection_dim=32, **vision_args)
        square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=square)
        strategy, extra_tokens = "default", 1
    else:
        vision = SiglipVisionConfig(**vision_args)
        image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        strategy, extra_tokens = "full", 0
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_select_strategy=strategy, vision_feature_layer=-2,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # tokenizer_config.json carries the template too
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out_dir / "README.md").write_text(
        "# tiny-random-llava\n\nRANDOM WEIGHTS: built by `hpcserve model prepare --tiny-vlm` "
        "to try the multimodal path. Its answers mean nothing.\n"
    )
