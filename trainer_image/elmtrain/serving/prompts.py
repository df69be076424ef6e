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
    max_tokens: int  # new tokens it may get (0: scored only)
    text: str  # as the client sent it, or its token ids decoded (what echo answers)


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


def _limit(model_set: ModelSet, request: CompletionRequest) -> int:
    """Tokens a prompt and its completion may have: the context, less the leading end-of-text
    that generating reads (a prompt scored only, ``max_tokens`` 0, is read as it is)."""
    return model_set.context_length - (0 if request.max_tokens == 0 else 1)


def check_lengths(model_set: ModelSet, request: CompletionRequest) -> None:
    """Refuse a prompt with more characters than the context can hold in any tokenization
    (cheap: on the event loop, before tokenizing)."""
    limit = _limit(model_set, request)
    most = limit * model_set.longest_token
    for prompt in request.prompts:
        if isinstance(prompt, str) and len(prompt) > most:
            raise _too_long(limit, None, None)
        if isinstance(prompt, list) and len(prompt) > limit:
            raise _too_long(limit, len(prompt), request.max_tokens)


def tokenize(model_set: ModelSet, request: CompletionRequest) -> list[Prompt]:
    """Each prompt's ids and room (on a worker thread); too long: 400, never truncated; a token
    id the tokenizer does not have: 400."""
    limit = _limit(model_set, request)
    tokenizer = model_set.tokenizer
    vocabulary = len(tokenizer)
    texts = [p for p in request.prompts if isinstance(p, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for prompt in request.prompts:
        if isinstance(prompt, str):
            ids, text = list(next(encoded)), prompt
        else:
            if any(token >= vocabulary for token in prompt):
                raise ApiError(
                    400,
                    f"prompt: token ids are below the vocabulary's size, {vocabulary}",
                    param="prompt",
                    code="invalid_token_id",
                )
            ids, text = prompt, tokenizer.decode(prompt)
        wanted = request.max_tokens if request.max_tokens is not None else limit - len(ids)
        if len(ids) + wanted > limit or (wanted < 1 and request.max_tokens != 0):
            raise _too_long(limit, len(ids), wanted)
        out.append(Prompt([model_set.eos, *ids], wanted, text))
    return out
