"""Reads shared by the branches one worker batch reconciles together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from elmforest.adapters.forest_storage import ForestStorage
from elmforest.planner.observed import StorageView
from elmforest.planner.siblings import ForestBranches, Sibling
from elmforest.reconcile.context import OperatorContext


class Batch:
    """One manifest read per forest storage, and one look at each forest's branches, for a
    whole batch. The batch is formed after the changes that dirtied its branches, so what it
    reads is as fresh as a read per branch would be; merges do not use it (they read, verify
    and swap the manifest themselves), and slots taken during the batch are counted apart
    (``OperatorContext.reserve``)."""

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self._views: dict[ForestStorage, asyncio.Future[StorageView]] = {}
        self._used: dict[ForestStorage, asyncio.Future[dict[str, int]]] = {}
        self._branches: dict[tuple[str, str], ForestBranches] = {}

    def branches(
        self, namespace: str, forest: str, read: Callable[[str, str], list[Sibling]]
    ) -> ForestBranches:
        key = (namespace, forest)
        if key not in self._branches:
            self._branches[key] = ForestBranches(read(namespace, forest))
        return self._branches[key]

    async def view(self, storage: ForestStorage) -> StorageView:
        read = self._views.get(storage)
        if read is None:
            read = asyncio.ensure_future(self.ctx.io(storage.view))
            self._views[storage] = read
        return await asyncio.shield(read)

    async def used_versions(self, storage: ForestStorage) -> dict[str, int]:
        """One listing of the forest's runs and experts for all new branches of the batch."""
        read = self._used.get(storage)
        if read is None:
            read = asyncio.ensure_future(self.ctx.io(storage.used_versions))
            self._used[storage] = read
        return await asyncio.shield(read)
