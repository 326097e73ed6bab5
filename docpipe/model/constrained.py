"""Answers valid by construction: a ``transformers`` logits processor that lets each row of a
batch emit only tokens its JSON schema allows, with llguidance.

Why llguidance: its grammar engine is Rust, computes a token mask in tens of microseconds with
no per-schema warm-up worth caching, reads any fast Hugging Face tokenizer (byte-level BPE
included, as MiniCPM-V's), keeps one matcher per row so a batch may mix document types, and
installs as one 3 MB wheel with no dependencies; vLLM offers it as a structured-output backend
(``guidance``). xgrammar (vLLM's default) pulls triton (286 MB) into a CPU image;
lm-format-enforcer walks the vocabulary in Python at every step.

A row whose answer is complete may only end (its end-of-sequence tokens); a row that ended is
left alone, as ``generate`` pads it from then on.
"""

from __future__ import annotations

from typing import Any

import torch


class GrammarError(ValueError):
    """A schema llguidance cannot compile; the message names it."""


def _matcher(tokenizer: Any, schema: dict) -> Any:
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
    problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if problem:
        raise GrammarError(f"schema {schema.get('title', '')!r}: {problem}")
    return llguidance.LLMatcher(tokenizer, grammar, log_level=0)


class JsonSchemaConstraint:
    """``logits_processor`` for one ``generate`` call: row ``i`` follows ``schemas[i]``."""

    def __init__(self, hf_tokenizer: Any, schemas: list[dict], stop_ids: list[int]):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=stop_ids)
        self.stop_ids = set(stop_ids)
        self.ended = [False] * len(schemas)
        self.matchers = [_matcher(self.tokenizer, schema) for schema in schemas]
        words = (self.tokenizer.vocab_size + 31) // 32  # one bit per token
        self.bitmask = torch.full((len(schemas), words), -1, dtype=torch.int32)
        self.prompt_length: int | None = None
        self.bits = torch.arange(32, dtype=torch.int32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from llguidance.torch import fill_next_token_bitmask

        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        live = []
        for row, matcher in enumerate(self.matchers):
            if input_ids.shape[1] > self.prompt_length and not self.ended[row]:
                token = int(input_ids[row, -1])
                self.ended[row] = token in self.stop_ids
                matcher.consume_token(token)
            if self.ended[row]:
                continue  # generate pads this row from now on; its scores no longer matter
            fill_next_token_bitmask(matcher, self.bitmask, row)
            live.append(row)
        if live:
            allowed = ((self.bitmask[live].unsqueeze(-1) >> self.bits) & 1).flatten(1).bool()
            allowed = allowed[:, : scores.shape[1]].to(scores.device)
            width = allowed.shape[1]
            rows = torch.tensor(live, device=scores.device)
            masked = scores[rows]
            masked[:, :width] = masked[:, :width].masked_fill(~allowed, float("-inf"))
            masked[:, width:] = float("-inf")
            scores[rows] = masked
        return scores


class ChosenLogprobs:
    """``logits_processor`` that keeps the log-probability of each token greedy ``generate`` picks,
    from the scores it is given (put it first: the model's own, before any constraint), one step's
    distribution at a time."""

    def __init__(self):
        self.previous: torch.Tensor | None = None
        self.chosen: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.chosen.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def result(self, answers: torch.LongTensor) -> torch.Tensor:
        """(batch, generated) log-probabilities of ``answers``, the ids generate returned after the prompt."""
        if self.previous is None:
            return torch.zeros(answers.shape, dtype=torch.float32)
        last = self.previous.gather(1, answers[:, len(self.chosen) : len(self.chosen) + 1].to(self.previous.device))
        return torch.cat([*(c.unsqueeze(1) for c in self.chosen), last], dim=1).cpu()
