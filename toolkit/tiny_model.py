"""``python -m toolkit.tiny_model``: a tiny, randomly initialised MiniCPM-V 4.x built offline.

The embedded demo and the tests finetune it on CPU in seconds; nothing is downloaded. The
folder has what a real MiniCPM-V 4.6 checkpoint has for our purposes: ``config.json``,
safetensors weights, a byte-level BPE tokenizer (trained here on the document types'
prompts and sample values) with the placeholders the processor reads, a Qwen-style chat
template, and the image processor's ``preprocessor_config.json``. Families: ``minicpmv4_6``
(the default) and ``minicpmv4_7``, the native ones this transformers has (MiniCPM-OCR is not
in it yet). Sizes (``SIZES``), each for what it must show: ``smoke`` runs the machinery in
seconds, ``demo`` learns a handful of documents by heart in CPU minutes (the demo and the
memorisation test), ``reader`` and ``reader_large`` are the learning benchmark's (CPU, GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from docpipe.doctypes import load_registry

IMAGE_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|image_pad|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus(doctypes_dir: Path) -> list[str]:
    """Text the tokenizer learns from: prompts, field names and sample values, digits, JSON."""
    lines = ['{"": ""}, 0123456789 -:/.,$ NT$ 年月日 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ']
    for doc_type in load_registry(doctypes_dir).values():
        lines += [doc_type.prompt, *doc_type.prompt_variants, doc_type.display_name]
        for spec in doc_type.fields:
            lines += [spec.name, spec.label, *spec.samples, *(spec.values or [])]
    return lines


def build_tokenizer(doctypes_dir: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = CHAT_TOKENS + list(IMAGE_TOKENS.values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(_corpus(doctypes_dir) * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        extra_special_tokens=dict(IMAGE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


FAMILIES = ("minicpmv4_6", "minicpmv4_7")


class TinySize(BaseModel):
    """A tiny model's dimensions, and the resolution its image processor scales documents to."""

    text_hidden: int = 64
    text_layers: tuple[str, ...] = ("full_attention", "linear_attention")  # qwen3.5's two kinds
    vision_hidden: int = 32
    vision_layers: int = 1
    scale_resolution: int = 112  # 112 px: 4 image tokens; 224 px: about 16
    # Pixels centred on paper white and scaled five times (mean 0.93, std 0.1 instead of 0.5, 0.5): a
    # page is mostly blank paper, which otherwise dominates every patch a random encoder sees, so that
    # a tiny model told documents apart only by chance; with ink as the signal it learns them in minutes.
    ink_contrast: bool = False


SIZES = {
    "smoke": TinySize(),
    "demo": TinySize(
        text_hidden=128, text_layers=("full_attention",) * 2, vision_hidden=64, vision_layers=2, ink_contrast=True
    ),
    "reader": TinySize(
        text_hidden=128,
        text_layers=("full_attention",) * 2,
        vision_hidden=96,
        vision_layers=3,
        scale_resolution=224,
        ink_contrast=True,
    ),
    "reader_large": TinySize(
        text_hidden=512,
        text_layers=("full_attention",) * 4,
        vision_hidden=256,
        vision_layers=4,
        scale_resolution=448,
        ink_contrast=True,
    ),
}


def _family_ids(family: str, tokenizer) -> dict[str, int]:
    """Token ids a family's config names beyond the image placeholder (4.7: the image and slice
    delimiters and the newline, for its 2-D positions)."""
    if family != "minicpmv4_7":
        return {}
    ids = {
        f"{name}_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKENS[f"{name}_token"])
        for name in ("image_start", "image_end", "slice_start", "slice_end")
    }
    return {**ids, "newline_id": tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]}


def model_config(family: str, dims: TinySize, tokenizer):
    """The model's configuration at ``dims``: a hybrid-attention text model, a small vision tower,
    the merger after the first vision layer, and the tokenizer's image placeholders."""
    from transformers import AutoConfig

    text = {
        "model_type": "qwen3_5_text",
        "vocab_size": len(tokenizer),
        "hidden_size": dims.text_hidden,
        "intermediate_size": 2 * dims.text_hidden,
        "num_hidden_layers": len(dims.text_layers),
        "layer_types": list(dims.text_layers),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_conv_kernel_dim": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 2,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [2, 1, 1],
            "partial_rotary_factor": 0.25,
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": dims.vision_hidden,
        "intermediate_size": 2 * dims.vision_hidden,
        "num_hidden_layers": dims.vision_layers,
        "num_attention_heads": 2,
        "patch_size": 14,
        "image_size": 56,
    }
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        insert_layer_id=0,
        image_size=56,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["image_token"]),
        video_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["video_token"]),
        **_family_ids(family, tokenizer),
    )


def build(output: Path, doctypes_dir: Path, seed: int = 0, family: str = "minicpmv4_6", size: str = "smoke") -> Path:
    """Write the tiny model folder; returns it."""
    import torch
    from transformers import AutoModelForImageTextToText
    from transformers.models.minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    dims = SIZES[size]
    tokenizer = build_tokenizer(doctypes_dir)
    config = model_config(family, dims, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    contrast = {"image_mean": [0.93] * 3, "image_std": [0.1] * 3} if dims.ink_contrast else {}
    MiniCPMV4_6ImageProcessorPil(
        scale_resolution=dims.scale_resolution, max_slice_nums=1, patch_size=14, **contrast
    ).save_pretrained(output)
    processor_class = {"minicpmv4_6": "MiniCPMV4_6Processor", "minicpmv4_7": "MiniCPMV4_7Processor"}[family]
    (output / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}, indent=2))
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toolkit.tiny_model", description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="folder to write the model into")
    parser.add_argument("--doctypes", type=Path, default=Path("configs/doctypes"), help="document-type folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=FAMILIES, default=FAMILIES[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke", help="see SIZES")
    args = parser.parse_args(argv)
    print(build(args.output, args.doctypes, args.seed, args.family, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
