"""Against a real cluster (skipped unless ELMFOREST_TEST_KUBECONFIG names a kubeconfig).

The API server itself checks what the emulator cannot: the CRDs are accepted, and their CEL
rules and bounds reject bad objects (server-side dry run, nothing is stored).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from elmforest.api import API_VERSION, BRANCH, GROUP, VERSION, crds

KUBECONFIG = os.environ.get("ELMFOREST_TEST_KUBECONFIG", "")
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not Path(KUBECONFIG).is_file(), reason="no ELMFOREST_TEST_KUBECONFIG"),
]


@pytest.fixture(scope="module")
def api() -> Any:
    from kubernetes import client, config, utils

    config.load_kube_config(KUBECONFIG)
    api_client = client.ApiClient()
    for text in crds.files().values():
        body = yaml.safe_load(text)
        with contextlib.suppress(utils.FailToCreateError):  # already installed
            utils.create_from_dict(api_client, body)
    return client.CustomObjectsApi(api_client)


def branch(domain: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": BRANCH.kind,
        "metadata": {"name": "dry-run-branch"},
        "spec": {"forest": "f", "domain": domain, "data": {"train": ["s3://bkt/x.txt"]}},
    }


def test_cel_and_patterns_reject_bad_branches(api: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    create = api.create_namespaced_custom_object
    create(GROUP, VERSION, "default", BRANCH.plural, branch("good"), dry_run="All")
    with pytest.raises(ApiException) as bad:
        create(GROUP, VERSION, "default", BRANCH.plural, branch("Not_A_Label"), dry_run="All")
    assert bad.value.status == 422
