"""``elmforest up`` / ``down`` / ``report`` / ``serve``: local mode, driven by the same YAML as
a cluster.

The state lives in ``<folder>/.elmforest/`` beside the YAML (``--state-dir`` moves it): the
objects and their statuses, one log per trainer run, the report, and a shared trainer cache.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from elmcore.errors import BadInputError
from elmforest.api.branch import ElmBranchSpec
from elmforest.api.forest import ElmForestSpec
from elmforest.local import report as reports
from elmforest.local.display import Display, rows
from elmforest.local.engine import Engine
from elmforest.local.resources import Declaration, load, yaml_files
from elmforest.local.runner import ProcessRunner, usable_cpus
from elmforest.local.state import LocalState, ObjectRecord, StateStore
from elmforest.planner.actions import Event

STATE_DIR = ".elmforest"


def default_state_dir(paths: Sequence[Path]) -> Path:
    first = paths[0]
    return (first if first.is_dir() else first.parent) / STATE_DIR


def default_parallel() -> int:
    """Trainer processes at once: up to 4, one per core (each gets its share of threads)."""
    return max(1, min(4, usable_cpus()))


@dataclass
class Options:
    paths: list[Path]
    state_dir: Path
    parallel: int = 1
    poll_seconds: float = 1.0
    timeout_seconds: float | None = None
    report: bool = True
    top_k: int | None = 2
    force_report: bool = False


class Session:
    """One command's view of a state folder: the state, the declarations, the screen."""

    def __init__(self, options: Options, out: TextIO) -> None:
        self.options, self.out = options, out
        self.store = StateStore(options.state_dir)
        self.state: LocalState = self.store.load()
        sources = [Path(r.source) for r in self._records() if Path(r.source).is_file()]
        # Files that declared objects before are read too: an object is pruned only when the
        # file that declared it is gone or no longer declares it.
        self.declaration: Declaration = load([*options.paths, *sources])
        self.display = Display(out)
        self.runner = ProcessRunner(
            logs=self.store.logs, cache=options.state_dir / "cache", parallel=options.parallel
        )
        self.engine = Engine(self.state, self.runner, self._event, self._log)
        self._saved = ""

    def _records(self) -> list[ObjectRecord]:
        state = self.state
        return [*state.forests.values(), *state.cluster_sets.values(), *state.branches.values()]

    def _event(self, record: ObjectRecord, event: Event) -> None:
        self._log(f"{record.name}: {event.reason}: {event.message}", show=True)

    def _log(self, line: str, show: bool = False) -> None:
        self.store.folder.mkdir(parents=True, exist_ok=True)
        with (self.store.folder / "events.log").open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        if show or "fail" in line or "retry" in line:
            self.display.event(line)

    def save(self) -> None:
        text = self.state.model_dump_json()
        if text != self._saved:
            self.store.save(self.state)
            self._saved = text

    def run_until_settled(self) -> int:
        started = time.monotonic()
        try:
            while True:
                before = self.state.model_dump_json()
                self.engine.step()
                self.save()
                self.display.render(rows(self.engine))
                # Settled is a fixed point, not only final phases: forests are reconciled before
                # their branches, so a step that merges the last expert leaves the forest's
                # status (its experts, their count) one step behind; one more step catches up,
                # and a rerun with nothing to do then changes nothing.
                if self.engine.settled():
                    if self.state.model_dump_json() == before:
                        return 0
                    continue
                timeout = self.options.timeout_seconds
                if timeout is not None and time.monotonic() - started > timeout:
                    self.runner.stop_all()
                    self.save()
                    self.out.write(f"elmforest up: gave up after {timeout:.0f} s; run it again\n")
                    return 75
                time.sleep(self.options.poll_seconds)
        except KeyboardInterrupt:
            self.out.write("\nstopping the trainers (they commit a checkpoint first)...\n")
            self.runner.stop_all()
            self.save()
            self.out.write("interrupted: `elmforest up` again resumes where this stopped\n")
            return 130
        finally:
            self.display.close()

    def failures(self) -> list[str]:
        return [
            f"{r.kind} {r.name}: {r.status.get('message', '')}"
            for r in self._records()
            if r.status.get("phase") == "Failed"
        ]

    def forest_report(self, name: str) -> Path | None:
        """Compute (or reuse) and write one forest's report; returns the Markdown's path."""
        forest = self.declaration.forests.get(name)
        if forest is None:
            return None
        spec = forest.spec
        assert isinstance(spec, ElmForestSpec)
        branches = [
            self.declaration.branch_spec(b)
            for b, d in self.declaration.branches.items()
            if isinstance(d.spec, ElmBranchSpec) and d.spec.forest == name
        ]
        # and the branches its cluster sets generated (in the state, not in any file)
        branches += [
            ElmBranchSpec.model_validate(record.spec)
            for record in self.engine.branches_of(name)
            if record.owner is not None and not record.deleting
        ]
        manifest = self.engine.storage(spec.storage).view().manifest
        if manifest is None or not manifest.experts:
            self.out.write(f"forest {name}: no experts merged yet, so no report\n")
            return None
        request = reports.build_request(spec, branches, self.options.top_k)
        folder = self.options.state_dir / "reports" / name
        result = (
            None
            if self.options.force_report
            else reports.cached(folder, request, manifest.revision)
        )
        if result is None:
            self.out.write(f"forest {name}: scoring {len(request.sets)} domains...\n")
            env = {
                **os.environ,
                "ELMTRAIN_CACHE": str(self.options.state_dir / "cache"),
                "ELMFOREST_LOG_FORMAT": "console",
            }
            result = reports.compute(spec, request, folder, env)
        markdown = reports.render_markdown(result, f"Forest {name}")
        (folder / "report.md").write_text(markdown)
        from elmforest.local.plot import render_png

        png = render_png(result, folder / "report.png", f"Forest {name}")
        self.out.write("\n" + markdown + f"\nreport: {folder / 'report.md'}\nplot:   {png}\n")
        return folder / "report.md"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop ``up`` gracefully, even where a shell started it with SIGINT
    ignored (a background job) or a supervisor stops it with SIGTERM."""
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def up(options: Options, out: TextIO) -> int:
    store = StateStore(options.state_dir)
    with store.lock(), stop_on_signals():
        session = Session(options, out)
        session.runner.resume(session.state)
        session.engine.declare(session.declaration)
        session.save()
        code = session.run_until_settled()
        if code:
            return code
        failed = session.failures()
        for line in failed:
            out.write(f"failed: {line}\n")
        if options.report:
            for name, record in session.state.forests.items():
                if record.status.get("phase") == "Ready":
                    session.forest_report(name)
        out.write(f"state, logs and reports: {options.state_dir}\n")
        return 1 if failed else 0


def down(options: Options, out: TextIO) -> int:
    store = StateStore(options.state_dir)
    with store.lock():
        session = Session(options, out)
        given = set(yaml_files(options.paths))
        targets = Declaration(
            {n: d for n, d in session.declaration.forests.items() if d.source in given},
            {n: d for n, d in session.declaration.branches.items() if d.source in given},
            tuple(given),
        )
        session.engine.delete(targets)
        session.engine.finalize()
        session.save()
        out.write(f"removed {len(targets.branches)} branches, {len(targets.forests)} forests\n")
        return 0


def report(options: Options, out: TextIO) -> int:
    session = Session(options, out)
    names = list(session.declaration.forests)
    if not names:
        raise BadInputError("no ElmForest in the given files")
    written = [session.forest_report(name) for name in names]
    return 0 if any(written) else 1


def _one_forest(options: Options, forest: str | None) -> tuple[str, ElmForestSpec]:
    """The forest these files declare (``forest`` names it where they declare several)."""
    forests = load(options.paths).forests
    if forest is None and len(forests) != 1:
        raise BadInputError(f"these files declare {len(forests)} forests: name one (--forest)")
    name = forest or next(iter(forests))
    if name not in forests:
        raise BadInputError(f"no ElmForest {name!r} in these files ({', '.join(forests)})")
    spec = forests[name].spec
    assert isinstance(spec, ElmForestSpec)
    return name, spec


def lineage(options: Options, forest: str | None, expert: str) -> int:
    """Print what made one expert of a local forest (``elmtrain lineage``'s tree)."""
    from elmtrain.cli import main as elmtrain

    _, spec = _one_forest(options, forest)
    return elmtrain(["--log-level", "warning", "lineage", "--forest", spec.storage.uri, expert])


def serve(options: Options, out: TextIO, forest: str | None, host: str, port: int) -> int:
    """Serve a forest of these files (what ``up`` trained) with ``elmtrain serve``, in this
    process; it follows the forest as ``up`` merges more experts."""
    from elmtrain.cli import main as elmtrain

    name, spec = _one_forest(options, forest)
    out.write(f"serving forest {name!r} at http://{host}:{port}/v1 (model {name!r})\n")
    out.flush()
    return elmtrain(serve_argv(name, spec, host, port, options.top_k or 2))


def serve_argv(name: str, spec: ElmForestSpec, host: str, port: int, top_k: int) -> list[str]:
    """``elmtrain serve``'s arguments for a local forest. The experts its data owners opted
    out of (``spec.serving.excludeExperts``) stay out here too, as on a cluster, and the
    forest's routing (``spec.serving.routing``) is the server's default."""
    argv = ["serve", "--forest", spec.storage.uri, "--name", name, "--host", host]
    argv += ["--port", str(port), "--top-k", str(top_k), "--poll-seconds", "2"]
    excluded = spec.serving.exclude_experts if spec.serving else []
    argv += ["--exclude-experts", *excluded] if excluded else []
    routing = spec.serving.routing if spec.serving else "posterior"
    return argv + (["--routing", routing] if routing != "posterior" else [])
