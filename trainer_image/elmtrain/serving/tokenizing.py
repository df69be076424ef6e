"""vLLM's tokenizer endpoints, in its shapes: ``POST /tokenize``, ``POST /detokenize`` and
``GET /tokenizer_info`` (what lm-eval's remote tokenizer reads, so that it needs no local copy).
Each body is validated and bounded like a completion's; the work runs off the event loop."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from elmtrain.serving.modelset import ModelSet
from elmtrain.serving.protocol import ApiError

MAX_TOKENS = 1 << 16  # ids in one /detokenize
T = TypeVar("T", bound=BaseModel)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's other options (chat messages...) unused
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_TOKENS)


def _parse(kind: type[T], data: object) -> T:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param=param) from None


def tokenize(model_set: ModelSet, data: object) -> dict[str, Any]:
    request = _parse(TokenizeRequest, data)
    tokenizer = model_set.tokenizer
    ids = tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
    return {
        "count": len(ids),
        "max_model_len": model_set.context_length,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None,
    }


def detokenize(model_set: ModelSet, data: object) -> dict[str, Any]:
    request = _parse(DetokenizeRequest, data)
    vocabulary = len(model_set.tokenizer)
    if any(not 0 <= token < vocabulary for token in request.tokens):
        raise ApiError(
            400,
            f"tokens: token ids are 0 to {vocabulary - 1}",
            param="tokens",
            code="invalid_token_id",
        )
    return {"prompt": model_set.tokenizer.decode(request.tokens)}


def tokenizer_info(model_set: ModelSet) -> dict[str, Any]:
    tokenizer = model_set.tokenizer
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "unk_token": tokenizer.unk_token,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "model_max_length": model_set.context_length,
        "vocab_size": len(tokenizer),
    }
