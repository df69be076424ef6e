"""``elmtrain generate``: sample text from a model, or from the posterior ensemble.

Each model keeps its key/value cache, so a new token costs one forward step per model. With
``--top-k-experts k`` every expert reads the prompt once, and only the k most probable under the
prompt's posterior generate: per token, the ensemble then costs k models, not all of them.
"""

from __future__ import annotations

import argparse
import sys

import structlog

from elmcore.errors import BadInputError
from elmtrain.commands.common import add_forest_args, open_forest

log = structlog.get_logger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("generate", help="sample text from a model or the ensemble")
    add_forest_args(parser)
    parser.add_argument("--model", default=None, help="seed | expert:<domain> | location")
    parser.add_argument("--ensemble", action="store_true", help="use every expert")
    parser.add_argument(
        "--top-k-experts",
        type=int,
        default=None,
        help="ensemble: generate with the k experts most probable under the prompt",
    )
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--prior-data",
        nargs="*",
        default=[],
        help="ensemble: text like the expected prompts for the cached prior (default: the "
        "experts' validation text; stored per manifest revision)",
    )
    parser.add_argument("--prior-sample", type=int, default=64, help="sequences for the prior")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> str:
    if args.ensemble == bool(args.model):
        raise BadInputError("generate: give exactly one of --model and --ensemble")
    if args.temperature <= 0:
        raise BadInputError("generate: --temperature must be > 0")
    if args.top_k_experts is not None and (args.top_k_experts < 1 or not args.ensemble):
        raise BadInputError("generate: --top-k-experts needs --ensemble and k >= 1")
    import torch  # and transformers: only once the command line is known to be good

    with torch.no_grad():
        return _generate(args)


def _generate(args: argparse.Namespace) -> str:
    import torch

    from elmtrain.model.families import context_length, load_model
    from elmtrain.runtime import setup_runtime
    from elmtrain.scoring.logprobs import log_posterior, route
    from elmtrain.scoring.priors import forest_prior
    from elmtrain.scoring.streams import ContextStream

    forest = open_forest(args)
    runtime = setup_runtime()
    tokenizer = forest.tokenizer()
    eos = int(tokenizer.eos_token_id)
    experts = forest.manifest().sorted_experts() if args.ensemble else []
    names = [e.domain for e in experts] if args.ensemble else [args.model]
    dirs = [forest.fetch(e) for e in experts] if args.ensemble else [forest.model_dir(args.model)]
    if not dirs:
        raise BadInputError("the forest has no experts yet")
    ids = [eos, *tokenizer(args.prompt, add_special_tokens=False)["input_ids"]]
    routing = args.top_k_experts is not None and args.top_k_experts < len(dirs)
    if routing and len(ids) < 2:
        raise BadInputError("generate: --top-k-experts routes on the prompt; give a --prompt")
    streams = [ContextStream(load_model(d, runtime.device), ids, runtime.device) for d in dirs]
    limit = context_length(streams[0].model)
    if len(ids) + args.max_new_tokens > limit:
        raise BadInputError(f"generate: prompt + --max-new-tokens exceed the context ({limit})")
    prior = torch.ones(len(streams), dtype=torch.float64)
    if args.ensemble:
        length = min(128, limit)
        weights = forest_prior(forest, args.prior_data, args.prior_sample, length, runtime)
        prior = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    if routing:
        # The posterior after the prompt picks the experts; the rest are never run again.
        prompt_loglik = torch.tensor([s.context_loglik for s in streams])
        keep = route(log_posterior(prompt_loglik, prior).exp(), args.top_k_experts)
        log.info("generate.routed", experts=[names[i] for i in keep])
        streams, prior = [streams[i] for i in keep], prior[keep]
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.max_new_tokens):
        # Posterior over experts from the context so far, then the mixture's next-token law.
        log_post = log_posterior(torch.tensor([s.context_loglik for s in streams]), prior)
        next_lp = torch.logsumexp(
            log_post[:, None] + torch.stack([s.next_logp for s in streams]), 0
        )
        probs = torch.softmax(next_lp / args.temperature, dim=-1)
        token = int(torch.multinomial(probs.float(), 1, generator=generator))
        if token == eos:
            break
        ids.append(token)
        for stream in streams:
            stream.advance(token)
    text = str(tokenizer.decode(ids[1:]))
    sys.stdout.write(text + "\n")
    return text
