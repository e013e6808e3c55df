"""Shared fixtures: one Ray instance for the whole test session, and an empty working folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from search.sweep import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, with no tracking URI from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def s3():
    """A real S3 API (moto in server mode) on 127.0.0.1 with an empty bucket ``sweeps``: its endpoint."""
    from tests.s3server import moto_server

    with moto_server() as endpoint:
        yield endpoint
