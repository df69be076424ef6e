"""A request's prompts as token ids, each with its room to complete, or the 400 that says why
not. The length is checked twice: by characters before tokenizing (a prompt that cannot fit is
refused at the cost of ``len``), then by tokens. Tokenizing runs on a thread of its own, off the
event loop that the probes share."""

from __future__ import annotations

from dataclasses import dataclass

from elmtrain.serving.modelset import ModelSet
from elmtrain.serving.protocol import ApiError, CompletionRequest


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # with the leading end-of-text (the context of the first token)
    max_tokens: int  # new tokens it may get


def _too_long(limit: int, prompt_tokens: int | None, wanted: int | None) -> ApiError:
    if prompt_tokens is None:  # known without tokenizing: it has too many characters
        message = (
            f"This model's maximum context length is {limit} tokens, and your prompt is "
            "longer than that. Please reduce your prompt."
        )
        return ApiError(400, message, param="prompt", code="context_length_exceeded")
    total = prompt_tokens + (wanted or 0)
    return ApiError(
        400,
        f"This model's maximum context length is {limit} tokens, however you requested "
        f"{total} tokens ({prompt_tokens} in your prompt; {wanted} for the completion). "
        "Please reduce your prompt or completion length.",
        param="prompt" if prompt_tokens >= limit else "max_tokens",
        code="context_length_exceeded",
    )


def check_lengths(model_set: ModelSet, request: CompletionRequest) -> None:
    """Refuse a prompt with more characters than the context can hold in any tokenization
    (cheap: on the event loop, before tokenizing)."""
    limit = model_set.context_length - 1  # the leading end-of-text takes one position
    most = limit * model_set.longest_token
    if any(len(prompt) > most for prompt in request.prompts):
        raise _too_long(limit, None, None)


def tokenize(model_set: ModelSet, request: CompletionRequest) -> list[Prompt]:
    """Each prompt's ids and room (on a worker thread); too long: 400, never truncated."""
    limit = model_set.context_length - 1
    out = []
    encoded = model_set.tokenizer(request.prompts, add_special_tokens=False)["input_ids"]
    for ids in encoded:
        wanted = request.max_tokens if request.max_tokens is not None else limit - len(ids)
        if len(ids) + wanted > limit or wanted < 1:
            raise _too_long(limit, len(ids), wanted)
        out.append(Prompt([model_set.eos, *ids], wanted))
    return out
