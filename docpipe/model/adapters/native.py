"""MiniCPM-V models native in transformers 5.x (``compatibility.NATIVE_MODEL_TYPES``):
AutoModelForImageTextToText, the image processor, the tokenizer and its chat template."""

from __future__ import annotations

from typing import Any

from docpipe.data.examples import IMAGE_PLACEHOLDER, Sample
from docpipe.model.adapters import Adapter, AdapterError, Completion, answer_labels
from docpipe.model.compatibility import NATIVE_MODEL_TYPES

_PROCESSOR_TOKENS = (
    "image_token",
    "video_token",
    "image_token_id",
    "video_token_id",
    "image_start_token",
    "image_end_token",
    "slice_start_token",
    "slice_end_token",
    "image_id_start_token",
    "image_id_end_token",
)


def image_only_processor(model_type: str, image_processor: Any, tokenizer: Any) -> Any:
    """The model's processor without its video half.

    The stock processor also builds a video processor, which needs torchvision; documents
    are images, so this one takes the PIL image processor and the tokenizer and keeps the
    stock processor's image handling (placeholders, slices, image ids) unchanged.
    """
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
            self.slice_mode = image_processor.slice_mode
            self.video_slice_mode = False
            self.default_use_image_id = image_processor.use_image_id
            self.image_token_divisor = 4 if image_processor.downsample_mode == "4x" else 16
            for name in _PROCESSOR_TOKENS:
                setattr(self, name, getattr(tokenizer, name))

    return ImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def chat(prompt: str, answer: str | None = None) -> list[dict]:
    """The recipe's ``<image>\\n<prompt>`` user turn as chat-template messages (and the answer)."""
    before, after = prompt.split(IMAGE_PLACEHOLDER)
    content = [{"type": "text", "text": before}] if before else []
    content += [{"type": "image"}, {"type": "text", "text": after}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class NativeAdapter(Adapter):
    processor_files = (
        "preprocessor_config.json",
        "processor_config.json",
        "video_preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
    )
    auto_class = "AutoModelForImageTextToText"
    zero3_leaf_modules = ("vision_tower", "merger")

    def load_processor(self) -> Any:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        model_type = AutoConfig.from_pretrained(self.model_dir).model_type
        if model_type not in NATIVE_MODEL_TYPES:
            raise AdapterError(
                f"{self.model_dir}: model_type {model_type!r} is not a native MiniCPM-V "
                f"({', '.join(NATIVE_MODEL_TYPES)}); for remote-code models set model.adapter: "
                "remote_code"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if not tokenizer.chat_template:
            raise AdapterError(f"{self.model_dir}: the tokenizer has no chat template (chat_template.jinja)")
        image_processor = AutoImageProcessor.from_pretrained(self.model_dir, backend="pil")
        return image_only_processor(model_type, image_processor, tokenizer)

    def freeze(self, model: Any) -> None:
        """The merger between vision and language always trains, as the recipe's resampler does."""
        model.model.vision_tower.requires_grad_(self.training.tune_vision)
        model.model.language_model.requires_grad_(self.training.tune_llm)
        model.lm_head.requires_grad_(self.training.tune_llm)

    def collate(self, samples: list[Sample]) -> dict:
        template = self.processor.apply_chat_template
        prompts = [template(chat(s.example.prompt), add_generation_prompt=True, tokenize=False) for s in samples]
        texts = [template(chat(s.example.prompt, s.example.answer), tokenize=False) for s in samples]
        answers = []
        for sample, prompt, text in zip(samples, prompts, texts, strict=True):
            if not text.startswith(prompt):
                raise ValueError(
                    f"example {sample.example.id}: the chat template renders the prompt differently "
                    "with and without the answer"
                )
            answers.append(self.processor.tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"])
        batch = self.processor(
            text=texts,
            images=[[s.image] for s in samples],
            padding=True,
            padding_side="right",
            max_slice_nums=self.training.max_slice_nums,
            return_tensors="pt",
        )
        batch["labels"] = answer_labels(
            batch["input_ids"], batch["attention_mask"], answers, [s.example.id for s in samples]
        )
        return dict(batch)

    def generate(self, model: Any, samples: list[Sample], max_new_tokens: int) -> list[str]:
        return [completion.text for completion in self.complete(model, samples, max_new_tokens)]

    def complete(
        self, model: Any, samples: list[Sample], max_new_tokens: int, schemas: list[dict] | None = None
    ) -> list[Completion]:
        """One batch, padded on the left so that every row's answer starts at the same column; each
        row's tokens are counted up to its first end-of-sequence token."""
        from transformers import LogitsProcessorList

        from docpipe.model.constrained import ChosenLogprobs, JsonSchemaConstraint

        template, tokenizer = self.processor.apply_chat_template, self.processor.tokenizer
        prompts = [template(chat(s.example.prompt), add_generation_prompt=True, tokenize=False) for s in samples]
        inputs = self.processor(
            text=prompts,
            images=[[s.image] for s in samples],
            padding=True,
            padding_side="left",
            max_slice_nums=self.training.max_slice_nums,
            return_tensors="pt",
        ).to(model.device)
        stop = model.generation_config.eos_token_id
        stop = set(stop if isinstance(stop, list) else [stop])
        recorder = ChosenLogprobs()  # first: it reads the model's own scores, before any constraint
        processors = [recorder] + ([JsonSchemaConstraint(tokenizer, schemas, sorted(stop))] if schemas else [])
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=LogitsProcessorList(processors)
        )
        answers = generated[:, inputs["input_ids"].shape[1] :]
        logprobs = recorder.result(answers).tolist()
        completions = []
        for row, row_logprobs in zip(answers.tolist(), logprobs, strict=True):
            end = next((i + 1 for i, token in enumerate(row) if token in stop), None)
            text = tokenizer.decode(row, skip_special_tokens=True)
            content = row[: end - 1] if end else row
            ends = [
                len(tokenizer.decode(content[:i], skip_special_tokens=True).encode())
                for i in range(1, len(content) + 1)
            ]
            completions.append(
                Completion(
                    text, end or len(row), end is None, tuple(zip(ends, row_logprobs[: len(content)], strict=True))
                )
            )
        return completions
