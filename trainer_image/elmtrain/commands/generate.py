"""``elmtrain generate``: sample text from a model, or from the posterior ensemble."""

from __future__ import annotations

import argparse
import sys

import torch

from elmcore.errors import BadInputError
from elmtrain.commands.common import add_forest_args, open_forest
from elmtrain.models import load_model
from elmtrain.runtime import setup_runtime
from elmtrain.scoring import log_posterior


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("generate", help="sample text from a model or the ensemble")
    add_forest_args(parser)
    parser.add_argument("--model", default=None, help="seed | expert:<domain> | location")
    parser.add_argument("--ensemble", action="store_true", help="use every expert")
    parser.add_argument("--top-k-experts", type=int, default=None)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


@torch.no_grad()
def run(args: argparse.Namespace) -> str:
    if args.ensemble == bool(args.model):
        raise BadInputError("generate: give exactly one of --model and --ensemble")
    if args.temperature <= 0:
        raise BadInputError("generate: --temperature must be > 0")
    forest = open_forest(args)
    runtime = setup_runtime()
    tokenizer = forest.tokenizer()
    eos = int(tokenizer.eos_token_id)
    dirs = (
        [forest.fetch(e) for e in forest.manifest().sorted_experts()]
        if args.ensemble
        else [forest.model_dir(args.model)]
    )
    if not dirs:
        raise BadInputError("the forest has no experts yet")
    models = [load_model(d, runtime.device) for d in dirs]
    ids = [eos, *tokenizer(args.prompt, add_special_tokens=False)["input_ids"]]
    generator = torch.Generator().manual_seed(args.seed)
    prior = torch.full((len(models),), 1.0 / len(models), dtype=torch.float64)
    for _ in range(args.max_new_tokens):
        context = torch.tensor([ids], device=runtime.device)
        logps = torch.stack(
            [torch.log_softmax(m(input_ids=context).logits[0].float(), -1) for m in models]
        )
        # Posterior over experts from the context so far, then the mixture's next-token law.
        targets = context[0, 1:].expand(len(models), -1)[..., None]
        context_loglik = logps[:, :-1].gather(-1, targets).squeeze(-1).sum(-1).double().cpu()
        log_post = log_posterior(context_loglik, prior, args.top_k_experts)
        next_lp = torch.logsumexp(log_post[:, None] + logps[:, -1].double().cpu(), dim=0)
        probs = torch.softmax(next_lp / args.temperature, dim=-1)
        token = int(torch.multinomial(probs.float(), 1, generator=generator))
        if token == eos:
            break
        ids.append(token)
    text = str(tokenizer.decode(ids[1:]))
    sys.stdout.write(text + "\n")
    return text
