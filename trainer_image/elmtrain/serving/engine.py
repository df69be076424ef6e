"""The decoding engine: one thread that runs every model, so requests batch together.

Each loop: admit waiting jobs (read their prompts, route them), then one token for every active
sequence. A sequence routed to experts {a, b} sits in a's and b's decode batches; each model runs
once per step for all the sequences that use it, whatever else they use, and each sequence mixes
its experts' next-token laws by its posterior (Bayes rule, updated as its context grows).

Jobs carry the model set they were admitted under: a swap (``swap``) sends new jobs to the new
set while running ones finish on theirs; an old set is dropped once nothing uses it.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from elmtrain.scoring.logprobs import log_posterior, route
from elmtrain.serving.kvbatch import DecodeBatch, Prefill, concat, prefill
from elmtrain.serving.modelset import AVERAGE, EXPERT, SEED, Member, ModelSet, Target
from elmtrain.serving.sampling import TextStream, sample

log = structlog.get_logger(__name__)


@dataclass
class Event:
    kind: str  # "routed", "text", "done", "error"
    text: str = ""
    finish_reason: str | None = None
    routing: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Job:
    """One choice of one request, as the HTTP side hands it over."""

    model_set: ModelSet
    target: Target
    prompt_ids: list[int]  # begins with the end-of-text token (the context of the first token)
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    emit: Callable[[Event], None]  # called from the engine thread; must be thread-safe
    stream: bool = True  # text as it comes; False: all of it with "done" (fewer wake-ups)
    cancelled: threading.Event = field(default_factory=threading.Event)


class OverloadedError(Exception):
    """More jobs wait than the engine accepts."""


@dataclass(eq=False)
class _Sequence:
    job: Job
    members: list[Member]
    log_prior: torch.Tensor  # [k] over members
    context_loglik: torch.Tensor  # [k]: log p_j(tokens so far)
    next_logp: torch.Tensor  # [k, V]
    text: TextStream
    generator: torch.Generator
    generated: int = 0
    token: int | None = None  # sampled, not yet fed
    slot: dict[str, int] = field(default_factory=dict)  # member key -> its row in next_logp

    def __post_init__(self) -> None:
        self.slot = {member.key: i for i, member in enumerate(self.members)}


Hook = Callable[[str, Any], None]  # (what, value): the server's metrics


def _step_batch(batch: DecodeBatch[_Sequence], tokens: list[int]) -> torch.Tensor:
    return batch.step(tokens)


INLINE, LANES = "inline", "lanes"


class _ModeChooser:
    """Which way to step several models is faster here, learnt as it serves: small models
    gain from running side by side on a core each, large ones from every core in each matmul.
    Mostly the faster mode (by the running mean of seconds per sequence), now and then the
    other, in case the load changed."""

    EXPLORE_EVERY = 32

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0

    def choose(self) -> str:
        self.steps += 1
        untried = [m for m in (LANES, INLINE) if m not in self.seconds]
        if untried:
            return untried[0]
        best = min(self.seconds, key=self.seconds.__getitem__)
        if self.steps % self.EXPLORE_EVERY == 0:
            return LANES if best == INLINE else INLINE
        return best

    def observe(self, mode: str, seconds_per_row: float) -> None:
        previous = self.seconds.get(mode)
        self.seconds[mode] = (
            seconds_per_row if previous is None else 0.8 * previous + 0.2 * seconds_per_row
        )


class Engine:
    def __init__(
        self,
        top_k: int,
        max_active: int = 64,
        max_waiting: int = 256,
        hook: Hook | None = None,
        lanes: int | None = None,
    ) -> None:
        self.top_k, self.max_active = top_k, max_active
        # Decode batches of different models run on this many threads (default: the cores).
        self._cores = len(os.sched_getaffinity(0))
        self._lanes = ThreadPoolExecutor(lanes or self._cores, thread_name_prefix="lane")
        self._intra_op = torch.get_num_threads()
        self._modes = _ModeChooser()
        self._inbox: queue.Queue[Job] = queue.Queue(maxsize=max_waiting)
        self._active: list[_Sequence] = []
        self._batches: dict[tuple[int, str], DecodeBatch[_Sequence]] = {}  # (set id, member)
        self._hook = hook or (lambda what, value: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._rng = random.Random()

    # ---- the HTTP side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._lanes.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        try:
            self._inbox.put_nowait(job)
        except queue.Full:
            raise OverloadedError(f"{self._inbox.maxsize} requests are waiting already") from None

    # ---- the engine thread ----------------------------------------------------------------

    def _threads(self, count: int) -> None:
        """torch's threads inside one operation (process-wide: changed only when it must)."""
        if count != self._intra_op:
            torch.set_num_threads(count)
            self._intra_op = count

    def _run(self) -> None:
        while not self._stop.is_set():
            admitted = self._admit()
            try:
                with torch.inference_mode():
                    if admitted:
                        self._start(admitted)
                    if self._active:
                        self._step()
            except Exception as error:  # a bug or OOM must not take the server down with it
                log.exception("serve.engine_failed")
                for sequence in self._active:
                    sequence.job.emit(Event("error", text=f"generation failed: {error}"))
                self._active, self._batches = [], {}

    def _admit(self) -> list[Job]:
        room = self.max_active - len(self._active)
        jobs: list[Job] = []
        if room > 0 and not self._active:  # idle: wait for work
            try:
                jobs.append(self._inbox.get(timeout=0.2))
            except queue.Empty:
                return []
        while len(jobs) < room:
            try:
                jobs.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if not j.cancelled.is_set()]

    def _batch(self, model_set: ModelSet, member: Member) -> DecodeBatch[_Sequence]:
        key = (id(model_set), member.key)
        if key not in self._batches:
            self._batches[key] = DecodeBatch(member.model, model_set.runtime.device)
        return self._batches[key]

    def _start(self, jobs: list[Job]) -> None:
        """Read the prompts (on every expert, where routing needs the posterior), route, and
        join each new sequence to its members' decode batches."""
        by_set: dict[int, list[Job]] = {}
        for job in jobs:
            by_set.setdefault(id(job.model_set), []).append(job)
        for group in by_set.values():
            model_set = group[0].model_set
            routed = [j for j in group if j.target.kind in ("ensemble", AVERAGE)]
            reads: dict[str, tuple[Member, list[Job], Prefill]] = {}
            if routed:  # every expert reads the prompts, to route them (many tokens: all cores)
                self._threads(self._cores)
                for member in model_set.experts:
                    reads[member.key] = (member, routed, self._prefill(model_set, member, routed))
            joins: dict[str, tuple[Member, list[_Sequence], list[Prefill]]] = {}
            for job in group:
                sequence, states = self._route(job, model_set, reads)
                self._active.append(sequence)
                for member, state in zip(sequence.members, states, strict=True):
                    entry = joins.setdefault(member.key, (member, [], []))
                    entry[1].append(sequence)
                    entry[2].append(state)
            for member, sequences, states in joins.values():
                self._batch(model_set, member).join(sequences, concat([s.rows for s in states]))

    def _prefill(self, model_set: ModelSet, member: Member, jobs: list[Job]) -> Prefill:
        self._hook("prefill", len(jobs))
        return prefill(member.model, [j.prompt_ids for j in jobs], model_set.runtime.device)

    def _route(
        self,
        job: Job,
        model_set: ModelSet,
        reads: dict[str, tuple[Member, list[Job], Prefill]],
    ) -> tuple[_Sequence, list[Prefill]]:
        kind = job.target.kind
        if kind in ("ensemble", AVERAGE):
            row = [reads[m.key][1].index(job) for m in model_set.experts]
            states = [
                reads[m.key][2].select([r]) for m, r in zip(model_set.experts, row, strict=True)
            ]
            loglik = torch.cat([s.prompt_loglik for s in states])
            posterior = log_posterior(loglik, model_set.log_prior.exp())
            if kind == "ensemble":
                chosen = route(posterior.exp(), self.top_k)
                members = [model_set.experts[i] for i in chosen]
                prior = model_set.log_prior[chosen]
                states = [states[i] for i in chosen]
                weights = log_posterior(loglik[chosen], prior.exp()).exp().tolist()
            else:
                mix = model_set.average_weights(posterior, self.top_k)
                members = [model_set.average(mix)]
                states = [self._prefill(model_set, members[0], [job])]
                chosen, weights, prior = list(mix), list(mix.values()), torch.zeros(1)
            routing = [
                {
                    "expert": model_set.experts[i].domain or SEED,
                    "version": model_set.experts[i].version,
                    "weight": round(float(w), 6),
                }
                for i, w in zip(chosen, weights, strict=True)
            ]
        else:
            member = model_set.seed if kind == SEED else model_set.experts[job.target.member or 0]
            members, prior = [member], torch.zeros(1, dtype=torch.float64)
            states = [self._prefill(model_set, member, [job])]
            routing = (
                [{"expert": member.domain or SEED, "version": member.version, "weight": 1.0}]
                if kind == EXPERT
                else []
            )
        for entry in routing:
            self._hook("expert", entry["expert"])
        seed = job.seed if job.seed is not None else self._rng.getrandbits(63)
        sequence = _Sequence(
            job=job,
            members=members,
            log_prior=prior.double(),
            context_loglik=torch.cat([s.prompt_loglik for s in states]),
            next_logp=torch.cat([s.next_logp for s in states]),
            text=TextStream(model_set.tokenizer, job.stop),
            generator=torch.Generator().manual_seed(seed),
        )
        job.emit(Event("routed", routing=routing, prompt_tokens=len(job.prompt_ids) - 1))
        return sequence, states

    def _step(self) -> None:
        """Draw one token for every sequence, then feed them all, one forward per model."""
        finished = [s for s in self._active if s.job.cancelled.is_set()]
        live = [s for s in self._active if not s.job.cancelled.is_set()]
        for sequence, token in zip(live, self._draw(live), strict=True):
            reason = self._advance(sequence, token)
            if reason is None:
                continue
            finished.append(sequence)
            tail = sequence.text.finish()
            if not sequence.job.stream:
                tail = sequence.text.text  # the whole completion, in one event
            if tail:
                sequence.job.emit(Event("text", text=tail))
            sequence.job.emit(
                Event(
                    "done",
                    finish_reason=reason,
                    prompt_tokens=len(sequence.job.prompt_ids) - 1,
                    completion_tokens=sequence.generated,
                )
            )
        self._leave(finished)
        batches = list(self._batches.items())
        feeds = [[s.token or 0 for s in batch.members] for _, batch in batches]
        models = [b for _, b in batches]
        mode = self._modes.choose() if len(batches) > 1 else INLINE
        started = time.perf_counter()
        if mode == INLINE:  # one model at a time, all cores inside its operations
            self._threads(self._cores)
            steps = [batch.step(feed) for batch, feed in zip(models, feeds, strict=True)]
        else:  # models side by side, a core each: small operations spend less on threading,
            # and one model's Python overhead overlaps another's arithmetic
            self._threads(1)
            steps = list(self._lanes.map(_step_batch, models, feeds))
        if len(batches) > 1:
            rows = sum(len(feed) for feed in feeds)
            self._modes.observe(mode, (time.perf_counter() - started) / rows)
        for ((_, member_key), batch), logp in zip(batches, steps, strict=True):
            self._hook("batch", len(batch))
            for row, sequence in enumerate(batch.members):
                sequence.next_logp[sequence.slot[member_key]] = logp[row]

    def _draw(self, live: list[_Sequence]) -> list[int]:
        """Every sequence's next token, the sequences with as many members drawn together:
        each mixes its members' next-token laws by its posterior (Bayes rule over the context
        so far), then samples with its own settings and its own generator."""
        tokens: dict[int, int] = {}
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(live):
            groups.setdefault(len(sequence.members), []).append(i)
        for rows in groups.values():
            group = [live[i] for i in rows]
            joint = torch.stack([s.log_prior + s.context_loglik for s in group])  # [S, k]
            weights = (joint - torch.logsumexp(joint, dim=1, keepdim=True)).float()
            laws = torch.stack([s.next_logp for s in group])  # [S, k, V]
            mixture = torch.logsumexp(weights[:, :, None] + laws, dim=1)
            drawn = sample(
                mixture,
                torch.tensor([s.job.temperature for s in group]),
                torch.tensor([s.job.top_p for s in group]),
                torch.cat([torch.rand(1, generator=s.generator) for s in group]),
            )
            tokens.update(zip(rows, drawn, strict=True))
        return [tokens[i] for i in range(len(live))]

    def _advance(self, sequence: _Sequence, token: int) -> str | None:
        """Take the drawn token; a finish reason if the sequence is done instead."""
        job = sequence.job
        if token == job.model_set.eos:
            return "stop"
        sequence.context_loglik = sequence.context_loglik + sequence.next_logp[:, token].double()
        sequence.generated += 1
        sequence.token = token
        self._hook("token", 1)
        piece = sequence.text.add(token)
        if piece and job.stream:
            job.emit(Event("text", text=piece))
        if sequence.text.stopped:
            return "stop"
        context = len(job.prompt_ids) + sequence.generated
        if sequence.generated >= job.max_tokens or context >= job.model_set.context_length:
            return "length"
        return None

    def _leave(self, finished: list[_Sequence]) -> None:
        if not finished:
            return
        gone = set(finished)
        self._active = [s for s in self._active if s not in gone]
        for key in list(self._batches):
            batch = self._batches[key]
            batch.leave(gone)
            if not batch:
                del self._batches[key]
