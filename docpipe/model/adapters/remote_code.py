"""MiniCPM-V models that ship their own code (``trust_remote_code``): MiniCPM-V 2.6 (LLM type
``qwen2``), MiniCPM-Llama3-V 2.5 (``llama3``) and MiniCPM-V 2.0 (``minicpm``).

As the official recipe: the checkpoint's own processor slices each image (``max_slice_nums``,
its query number per slice) and expands the ``(<image>./</image>)`` placeholder; the
conversation is written in the LLM type's chat format; the model takes one ``data`` dict and
returns logits, and the loss is taken on the answer tokens only. Unlike the recipe, an LLM
type it does not know is an error, never a fallback to another chat format, and nothing is
truncated (too-long documents are listed before training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from docpipe.data.examples import IMAGE_PLACEHOLDER, Sample
from docpipe.model.adapters import IGNORE_INDEX, Adapter, AdapterError, answer_labels
from docpipe.model.compatibility import llm_type_contradiction

REMOTE_IMAGE_PLACEHOLDER = "(<image>./</image>)"  # what the remote processors replace with slices


@dataclass(frozen=True)
class ChatFormat:
    """One LLM type's conversation markup for a single user turn and its answer."""

    user: str  # with {} for the user's content
    assistant: str  # what opens the answer
    end: str  # what closes it: the model learns to emit it
    bos: str = ""

    def prompt(self, content: str) -> str:
        return self.bos + self.user.format(content) + self.assistant

    def answer(self, answer: str) -> str:
        return answer + self.end


CHAT_FORMATS = {
    "qwen2": ChatFormat(
        user="<|im_start|>user\n{}<|im_end|>\n", assistant="<|im_start|>assistant\n", end="<|im_end|>\n"
    ),
    "llama3": ChatFormat(
        user="<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        end="<|eot_id|>",
        bos="<|begin_of_text|>",
    ),
    "minicpm": ChatFormat(user="<用户>{}", assistant="<AI>", end="</s>"),
}


def chat_format(llm_type: str | None, config: dict) -> ChatFormat:
    """The chat format for ``llm_type``, refusing unknown types and ones the checkpoint contradicts."""
    if llm_type not in CHAT_FORMATS:
        raise AdapterError(f"llm_type {llm_type!r} is unknown; known: {sorted(CHAT_FORMATS)}")
    if contradiction := llm_type_contradiction(config, llm_type):
        raise AdapterError(contradiction)
    return CHAT_FORMATS[llm_type]


class RemoteCodeAdapter(Adapter):
    processor_files = (
        "*.py",
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "generation_config.json",
        "chat_template.jinja",
        "chat_template.json",
    )
    trust_remote_code = True
    zero3_leaf_modules = ("vpm", "resampler")

    def load_processor(self) -> Any:
        from transformers import AutoProcessor

        config = json.loads((self.model_dir / "config.json").read_text())
        self.chat = chat_format(self.model.llm_type, config)
        if "auto_map" not in config:
            raise AdapterError(f"{self.model_dir}/config.json has no auto_map: not a remote-code checkpoint")
        processor = AutoProcessor.from_pretrained(self.model_dir, trust_remote_code=True)
        if getattr(processor, "image_processor", None) is None:
            raise AdapterError(
                f"{self.model_dir}: the processor loaded without an image processor "
                "(preprocessor_config.json or processing_minicpmv.py missing?)"
            )
        return processor

    def freeze(self, model: Any) -> None:
        """The resampler always trains, as in the recipe."""
        model.vpm.requires_grad_(self.training.tune_vision)
        model.llm.requires_grad_(self.training.tune_llm)

    def collate(self, samples: list[Sample]) -> dict:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        rows, answers, pixel_values, image_bounds, tgt_sizes = [], [], [], [], []
        for sample in samples:
            content = sample.example.prompt.replace(IMAGE_PLACEHOLDER, REMOTE_IMAGE_PLACEHOLDER)
            answer = self.chat.answer(sample.example.answer)
            encoded = self.processor(
                [self.chat.prompt(content) + answer],
                [[sample.image]],
                return_tensors="pt",
                max_slice_nums=self.training.max_slice_nums,
            )
            rows.append(encoded["input_ids"][0])
            answers.append(self.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
            pixel_values.append(encoded["pixel_values"][0])
            image_bounds.append(encoded["image_bound"][0])
            tgt_sizes.append(encoded["tgt_sizes"][0])
        input_ids = pad_sequence(rows, batch_first=True, padding_value=0)
        attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": torch.arange(input_ids.shape[1]).expand_as(input_ids).clone(),
            "labels": answer_labels(input_ids, attention_mask, answers, [s.example.id for s in samples]),
            "pixel_values": pixel_values,
            "image_bound": image_bounds,
            "tgt_sizes": tgt_sizes,
        }

    def generate(self, model: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
        """Through the checkpoint's own ``chat`` (its chat format and slicing), one sample at a time."""
        return [
            model.chat(
                image=None,
                msgs=[{"role": "user", "content": [s.image, s.example.prompt.replace(IMAGE_PLACEHOLDER, "").strip()]}],
                tokenizer=self.processor.tokenizer,
                max_new_tokens=max_new_tokens,
                sampling=False,
                max_slice_nums=self.training.max_slice_nums,
            )
            for s in samples
        ]

    def loss(self, model: Any, inputs: dict) -> Any:
        """The remote models take one ``data`` dict and return logits: next-token loss on the answer."""
        import torch.nn.functional as F

        labels = inputs.pop("labels")
        logits = model(data=inputs, use_cache=False).logits
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().long(), ignore_index=IGNORE_INDEX
        )
